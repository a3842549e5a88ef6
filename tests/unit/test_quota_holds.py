"""The in-process quota holds (what runs while Redis is away): the same rules as the Redis
hash, without a database or a server."""

from __future__ import annotations

import asyncio
import uuid
from datetime import date
from typing import Any

from usage.quota_holds import (
    _Entry,
    _LocalHolds,
    _now_ms,
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
