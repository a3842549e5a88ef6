"""The GCRA limiter's arithmetic on a fake clock (the in-process fallback; the Redis script
runs the same algorithm and is tested against the real Redis in test_rate_limits.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tenants.limits import LocalGcra, _process_share

MINUTE = ("minute", 60_000)
HOUR = ("hour", 3_600_000)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def windows(*pairs: tuple[tuple[str, int], int]) -> tuple[list[str], list[tuple[str, int, int]]]:
    chosen = [(name, limit, period) for (name, period), limit in pairs]
    return [f"key:{name}" for name, _limit, _period in chosen], chosen


def test_a_full_burst_then_one_request_per_interval() -> None:
    clock = FakeClock()
    limiter = LocalGcra(clock)
    keys, wins = windows((MINUTE, 3))
    decisions = [limiter.check(keys, wins) for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, True]
    assert [d.remaining for d in decisions] == [2, 1, 0]
    refused = limiter.check(keys, wins)
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(20.0)  # 3 a minute: one every 20 s
    assert refused.headers()["Retry-After"] == "20"
    clock.advance(19.999)
    assert not limiter.check(keys, wins).allowed
    clock.advance(0.001)
    assert limiter.check(keys, wins).allowed


@pytest.mark.parametrize("waited", [0.0, 5.0, 19.0])
def test_retry_after_is_never_earlier_than_the_real_reset(waited: float) -> None:
    clock = FakeClock()
    limiter = LocalGcra(clock)
    keys, wins = windows((MINUTE, 3))
    for _ in range(3):
        limiter.check(keys, wins)
    clock.advance(waited)
    refused = limiter.check(keys, wins)
    assert not refused.allowed
    clock.advance(int(refused.headers()["Retry-After"]))
    assert limiter.check(keys, wins).allowed


def test_a_refused_request_spends_nothing() -> None:
    clock = FakeClock()
    limiter = LocalGcra(clock)
    keys, wins = windows((MINUTE, 1))
    assert limiter.check(keys, wins).allowed
    for _ in range(50):  # hammering while refused does not push the reset further out
        assert not limiter.check(keys, wins).allowed
    clock.advance(60)
    assert limiter.check(keys, wins).allowed


def test_the_tightest_of_two_windows_decides_and_is_reported() -> None:
    clock = FakeClock()
    limiter = LocalGcra(clock)
    keys, wins = windows((MINUTE, 60), (HOUR, 2))
    assert [limiter.check(keys, wins).allowed for _ in range(2)] == [True, True]
    refused = limiter.check(keys, wins)
    assert not refused.allowed
    assert (refused.limit, refused.window_s) == (2, 3600)
    assert refused.retry_after_s == pytest.approx(1800.0)
    clock.advance(60)  # the minute window has refilled; the hour window has not
    assert not limiter.check(keys, wins).allowed


def test_budget_refills_over_time_up_to_the_burst_and_no_further() -> None:
    clock = FakeClock()
    limiter = LocalGcra(clock)
    keys, wins = windows((MINUTE, 6))
    for _ in range(6):
        limiter.check(keys, wins)
    clock.advance(3600)  # an hour idle refills the minute's budget once, not sixty times
    assert sum(limiter.check(keys, wins).allowed for _ in range(20)) == 6


def test_the_fallback_starts_from_what_redis_last_reported_not_a_full_budget() -> None:
    clock = FakeClock()
    limiter = LocalGcra(clock)
    keys, chosen = windows((MINUTE, 30))
    # Redis said: 20 of the 30 spent (the theoretical arrival time is 20 intervals ahead).
    now_ms = clock() * 1000
    limiter.observe(keys, [now_ms + 20 * 2_000])
    admitted = sum(limiter.check(keys, chosen).allowed for _ in range(30))
    assert admitted == 10
    # An older report never gives budget back.
    limiter.observe(keys, [now_ms])
    assert not limiter.check(keys, chosen).allowed


def test_each_process_takes_its_share_of_a_limit_in_the_fallback(settings: Any) -> None:
    settings.SERVER_PROCESSES = 3
    assert _process_share([("minute", 31, 60_000), ("hour", 2, 3_600_000)]) == [
        ("minute", 10, 60_000),
        ("hour", 1, 3_600_000),  # never below one request
    ]
