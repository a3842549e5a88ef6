"""Engine slots counted across the fleet (engines/fleet.py) on the real Redis: one process
sees what the others publish, a process that died drops out on Redis's clock, and without
Redis every count reads 0 (each engine then holds its own share alone)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from django.conf import settings

from core.redis import breaker
from engines.fleet import RedisFleetShare

pytestmark = pytest.mark.timeout(60)


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _prefix() -> str:
    return f"{settings.REDIS_KEY_PREFIX}:fleet-{uuid.uuid4().hex[:8]}"


def test_each_process_reads_what_the_others_hold_and_never_its_own() -> None:
    prefix = _prefix()

    async def scenario() -> None:
        first, second = RedisFleetShare(prefix), RedisFleetShare(prefix)
        assert await first.held_elsewhere("tenant") == 0  # starts the first one's publisher
        first.held_here("tenant", 2)

        async def second_sees(count: int) -> bool:
            return await second.held_elsewhere("tenant") == count

        await _until(lambda: second_sees(2), "the second process to see two slots")
        assert await first.held_elsewhere("tenant") == 0  # its own are not "elsewhere"
        second.held_here("tenant", 1)

        async def first_sees_one() -> bool:
            return await first.held_elsewhere("tenant") == 1

        await _until(first_sees_one, "the first process to see the second's slot")
        first.held_here("tenant", 0)
        await _until(lambda: second_sees(0), "the first process's slots given back")
        assert first.counts() == {}  # nothing kept for an owner holding nothing

    asyncio.run(scenario())


def test_a_process_that_stops_publishing_drops_out_and_a_live_one_stays() -> None:
    prefix = _prefix()

    async def scenario() -> None:
        dying, living, reader = (RedisFleetShare(prefix, ttl_s=3.0) for _ in range(3))
        for process, count in ((dying, 4), (living, 1)):
            await process.held_elsewhere("tenant")
            process.held_here("tenant", count)

        async def reads(count: int) -> bool:
            return await reader.held_elsewhere("tenant") == count

        await _until(lambda: reads(5), "both processes' slots")
        assert dying._publisher is not None
        dying._publisher.cancel()  # the process is killed: it never writes again
        # Its field expires 3 s after its last write; the live one rewrites a third of that apart.
        await _until(lambda: reads(1), "the dead process's slots to expire")
        await asyncio.sleep(4.0)
        assert await reader.held_elsewhere("tenant") == 1

    asyncio.run(scenario())


def test_without_redis_nothing_is_counted_elsewhere(settings: Any) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens: every call fails

    async def scenario() -> None:
        fleet = RedisFleetShare(_prefix())
        assert await fleet.held_elsewhere("tenant") == 0
        fleet.held_here("tenant", 3)  # kept, to be written once Redis answers
        await asyncio.sleep(0.1)
        assert fleet.counts() == {"tenant": 3}

    try:
        asyncio.run(scenario())
    finally:
        breaker.open_until = 0.0  # the other tests find Redis at once
