"""The in-process quota holds (what runs while Redis is away): the same rules as the Redis
hash, without a database; and, against a private redis-server that the tests stop and
start, what a process counts while its Redis is away and once it is back."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from datetime import date
from typing import Any

import pytest

import core.redis
from core.redis import breaker
from tests.support.servers import RedisServer
from usage.quota_holds import (
    QuotaReservation,
    _Entry,
    _local,
    _LocalHolds,
    _now_ms,
    _redis_key,
    holds_reserve,
    holds_rows_written,
)


def test_entries_whose_process_lost_track_expire_and_written_ones_leave_once_read() -> None:
    holds = _LocalHolds()
    now = _now_ms()
    holds.reserved[uuid.uuid4()] = _Entry(30.0, expires_at_ms=now - 1)  # a request never settled
    holds.settled[uuid.uuid4()] = _Entry(5.0, expires_at_ms=now + 60_000)  # row not written yet
    written = _Entry(7.0, expires_at_ms=now + 60_000, written_at_ms=now - 10)
    holds.settled[uuid.uuid4()] = written
    # A reading that began before the write does not include it; one after does.
    assert holds.seconds(read_at_ms=now - 20) == 12.0
    assert holds.seconds(read_at_ms=now) == 5.0
    assert len(holds.reserved) == 0


def test_without_redis_a_reservation_is_held_settled_and_released_by_the_writers_mark(settings: Any) -> None:
    settings.REDIS_URL = ""
    key = (uuid.uuid4(), date(2026, 11, 1))

    async def scenario() -> None:
        first = await holds_reserve(
            key, limit=60, used=0, read_at_ms=_now_ms(), record_id=uuid.uuid4(), estimate=50
        )
        assert first is not None
        assert not first.in_redis
        refused = await holds_reserve(
            key, limit=60, used=10, read_at_ms=_now_ms(), record_id=uuid.uuid4(), estimate=1
        )
        assert refused is None  # 10 used + 50 held
        first.settle(20.0)
        first.settle(50.0)  # once only
        holds_rows_written([(first.record_id, key)])
        # A reading taken after the mark includes the 20 s: nothing is held any more.
        again = await holds_reserve(
            key, limit=60, used=20, read_at_ms=_now_ms() + 1, record_id=uuid.uuid4(), estimate=39
        )
        assert again is not None

    asyncio.run(scenario())


def test_without_redis_extending_a_reservation_stops_once_what_is_held_reaches_the_limit(
    settings: Any,
) -> None:
    settings.REDIS_URL = ""
    key = (uuid.uuid4(), date(2026, 11, 1))

    async def scenario() -> None:
        utterance = await holds_reserve(
            key, limit=60, used=0, read_at_ms=_now_ms(), record_id=uuid.uuid4(), estimate=0
        )
        other = await holds_reserve(
            key, limit=60, used=0, read_at_ms=_now_ms(), record_id=uuid.uuid4(), estimate=0
        )
        assert utterance is not None
        assert other is not None
        # Piece by piece, 25 s each: the one that starts under the limit is reserved (the
        # overshoot is one piece), the next of either request is refused.
        assert await utterance.extend(25, used=10, read_at_ms=_now_ms())
        assert await other.extend(25, used=10, read_at_ms=_now_ms())  # 10 + 25 < 60
        assert not await utterance.extend(25, used=10, read_at_ms=_now_ms())  # 10 + 50 held
        assert not await other.extend(1, used=10, read_at_ms=_now_ms())
        assert (utterance.seconds, other.seconds) == (25, 25)
        other.settle(5.0)  # it ended having sent 5 s: the rest is free again
        assert await utterance.extend(25, used=10, read_at_ms=_now_ms())  # 10 + 25 + 5
        utterance.settle(0.0)
        assert not await utterance.extend(1, used=0, read_at_ms=_now_ms())  # settled: no more

    asyncio.run(scenario())


# --- with a Redis that goes away -------------------------------------------------------------


@pytest.fixture
def private_redis(
    redis_server: RedisServer, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RedisServer]:
    """The holds on a private redis-server; the process's sync client and breaker are left
    as they were found (the client is made for this server's URL, the breaker closed)."""
    settings.REDIS_URL = redis_server.url
    monkeypatch.setattr(core.redis, "_sync_client", None)
    yield redis_server
    breaker.open_until = 0.0


def _back(server: RedisServer) -> None:
    """Redis is back (empty, as after a restart) and the process stops waiting out its
    breaker: the next call reaches it."""
    server.start()
    breaker.open_until = 0.0


def _redis_seconds(server: RedisServer, key: Any, reservation: QuotaReservation) -> float:
    """What Redis holds for the reservation ("seconds;written_at_ms;expires_at_ms")."""
    return float(server.cli("HGET", _redis_key(key), reservation.record_id.hex).split(";")[0])


async def _reserve(key: Any, *, limit: float, estimate: float, used: float = 0.0) -> QuotaReservation | None:
    return await holds_reserve(
        key, limit=limit, used=used, read_at_ms=_now_ms(), record_id=uuid.uuid4(), estimate=estimate
    )


@pytest.mark.timeout(60)
def test_a_process_s_in_redis_reservations_extended_while_redis_is_away_together_stay_within_the_limit(
    private_redis: RedisServer,
) -> None:
    key = (uuid.uuid4(), date(2026, 11, 1))
    limit, piece = 60.0, 7.0  # 8 pieces stay under the limit, the 9th passes it by 3 s

    async def scenario() -> None:
        utterances = [await _reserve(key, limit=limit, estimate=0) for _ in range(4)]
        assert all(utterance is not None and utterance.in_redis for utterance in utterances)
        held = [utterance for utterance in utterances if utterance is not None]
        private_redis.stop()
        # Every utterance asks for another piece in turn until each is refused: together
        # they reach the limit and overshoot it by one piece at most, not one limit each.
        for _ in range(int(limit // piece) + 1):  # bounded: more rounds than the limit allows
            for utterance in held:
                await utterance.extend(piece, used=0, read_at_ms=_now_ms())
        assert [utterance.seconds for utterance in held] == [3 * piece, 2 * piece, 2 * piece, 2 * piece]
        assert sum(utterance.seconds for utterance in held) == 9 * piece  # 63: limit + 3 s
        refused = [await utterance.extend(piece, used=0, read_at_ms=_now_ms()) for utterance in held]
        assert refused == [False] * 4

        # Redis is back, empty: what the utterances grew by while it was away still counts,
        # on top of what Redis holds (nothing), so no new request fits.
        _back(private_redis)
        assert await _reserve(key, limit=limit, estimate=1) is None
        for utterance in held[1:]:
            utterance.settle(0.0)
        # The one left sends its whole size (21 s + 7 s) with its next piece, and from then
        # on it is counted once, in Redis: 31 s used + its 28 s fit under 60, and past that
        # Redis's own count refuses.
        first = held[0]
        assert await first.extend(piece, used=0, read_at_ms=_now_ms())
        assert first.seconds == 4 * piece
        assert _redis_seconds(private_redis, key, first) == 28
        late = await _reserve(key, limit=limit, estimate=1, used=limit - first.seconds - 1)
        assert late is not None
        assert late.in_redis
        assert await _reserve(key, limit=limit, estimate=1, used=limit - first.seconds) is None
        first.settle(0.0)
        late.settle(0.0)
        assert key not in _local  # settled: nothing of theirs is tracked any more

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_a_reservation_made_while_redis_is_away_counts_the_process_s_in_redis_reservations(
    private_redis: RedisServer,
) -> None:
    key = (uuid.uuid4(), date(2026, 11, 1))

    async def scenario() -> None:
        first = await _reserve(key, limit=60, estimate=20)
        second = await _reserve(key, limit=60, estimate=20)
        assert first is not None
        assert first.in_redis
        assert second is not None
        assert second.in_redis
        private_redis.stop()
        assert await first.extend(10, used=0, read_at_ms=_now_ms())  # grown while Redis is away
        # Held by this process: 30 + 20 s, in Redis as they were before it went away.
        assert await _reserve(key, limit=60, estimate=1, used=10) is None
        fallback = await _reserve(key, limit=60, estimate=1, used=9)
        assert fallback is not None
        assert not fallback.in_redis
        assert await _reserve(key, limit=60, estimate=1, used=9) is None  # that one counts too
        for reservation in (first, second, fallback):
            reservation.settle(0.0)
        assert key not in _local

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_in_redis_reservations_settled_from_a_thread_without_a_loop_leave_nothing_tracked(
    private_redis: RedisServer,
) -> None:
    key = (uuid.uuid4(), date(2026, 11, 1))

    async def reserve_and_extend(count: int) -> list[QuotaReservation]:
        reservations = [await _reserve(key, limit=600, estimate=10) for _ in range(count)]
        held = [reservation for reservation in reservations if reservation is not None]
        for reservation in held:
            assert reservation.in_redis
            assert await reservation.extend(5, used=0, read_at_ms=_now_ms())
        return held

    def settle_on_a_thread(reservations: list[QuotaReservation], seconds: float) -> None:
        def settle_all() -> None:
            for reservation in reservations:
                reservation.settle(seconds)

        thread = threading.Thread(target=settle_all)
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive()

    # Redis up: the thread's settlement reaches Redis, and nothing stays in the process.
    held = asyncio.run(reserve_and_extend(3))
    assert len(held) == 3
    assert key in _local
    settle_on_a_thread(held, 12.0)
    assert key not in _local
    assert [_redis_seconds(private_redis, key, reservation) for reservation in held] == [12.0] * 3

    # Grown while Redis was away, then settled from a thread that cannot reach it either:
    # its Redis entry expires there; the process keeps nothing.
    held = asyncio.run(reserve_and_extend(2))
    private_redis.stop()

    async def grow() -> None:
        for reservation in held:
            assert await reservation.extend(5, used=0, read_at_ms=_now_ms())

    asyncio.run(grow())
    settle_on_a_thread(held, 20.0)
    assert key not in _local
