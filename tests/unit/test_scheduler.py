"""The XTTS chunk scheduler with plain iterators in place of the model: its pick policy
(on a stopped scheduler, state set by hand) and its worker thread (real thread, real loop)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from engines.base import EngineFailure, EngineOverloaded
from engines.scheduler import ChunkScheduler, ScheduledJob
from tests.support.waiting import async_wait_until

# Jobs of the stopped scheduler belong to an event loop that never runs: nothing is delivered.
IDLE_LOOP = asyncio.new_event_loop()


@pytest.fixture(scope="module", autouse=True)
def _close_idle_loop() -> Iterator[None]:
    yield
    IDLE_LOOP.close()


@pytest.fixture
def stopped() -> Iterator[ChunkScheduler]:
    """A scheduler whose worker has stopped: `_pick` can be asked directly."""
    scheduler = ChunkScheduler("test", max_jobs=8, max_buffered=2)
    scheduler.stop()
    yield scheduler
    scheduler._jobs.clear()


def job(
    scheduler: ChunkScheduler, *, started: bool = False, served: int = -1, buffered: int = 0
) -> ScheduledJob:
    made = ScheduledJob(scheduler, iter(()), IDLE_LOOP)
    made.started, made.last_served, made.buffered = started, served, buffered
    scheduler._jobs.append(made)
    return made


def test_a_request_waiting_for_its_first_chunk_goes_before_running_ones(stopped: ChunkScheduler) -> None:
    job(stopped, started=True, served=1)
    first_fresh = job(stopped)
    job(stopped)
    assert stopped._pick() is first_fresh  # fresh ones first, in order of arrival


def test_running_requests_take_turns_least_recently_served_first(stopped: ChunkScheduler) -> None:
    job(stopped, started=True, served=7)
    waited_longest = job(stopped, started=True, served=3)
    job(stopped, started=True, served=5)
    assert stopped._pick() is waited_longest


def test_a_request_whose_reader_is_behind_is_skipped(stopped: ChunkScheduler) -> None:
    job(stopped, buffered=2)  # fresh, but its reader has max_buffered chunks unread
    running = job(stopped, started=True, served=9, buffered=1)
    assert stopped._pick() is running
    running.buffered = 2
    assert stopped._pick() is None  # nothing runnable: the worker waits


def test_a_cancelled_request_is_dropped_and_its_iterator_closed(stopped: ChunkScheduler) -> None:
    closed = threading.Event()

    def generator() -> Iterator[int]:
        try:
            yield 1
        finally:
            closed.set()

    cancelled = ScheduledJob(stopped, generator(), IDLE_LOOP)
    next(cancelled.iterator)  # started, so closing runs its finally
    cancelled.cancelled = True
    stopped._jobs.append(cancelled)
    assert stopped._pick() is None
    assert stopped._jobs == []
    assert closed.is_set()


async def test_requests_get_their_own_chunks_in_order_and_failures_reach_their_reader() -> None:
    scheduler = ChunkScheduler("test", max_jobs=4, max_buffered=1)

    def failing() -> Iterator[str]:
        yield "f0"
        raise ValueError("the model broke")

    try:
        a = scheduler.submit(iter(["a0", "a1", "a2"]))
        b = scheduler.submit(failing())

        async def read(scheduled: ScheduledJob) -> list[str]:
            return [chunk async for chunk in scheduled.chunks()]

        assert await asyncio.wait_for(read(a), 30) == ["a0", "a1", "a2"]
        with pytest.raises(EngineFailure, match="the model broke"):
            await asyncio.wait_for(read(b), 30)
        await async_wait_until(lambda: scheduler.active_jobs == 0, what="both jobs to leave")
    finally:
        scheduler.stop()


async def test_past_max_jobs_a_request_is_refused_with_a_retry_hint() -> None:
    scheduler = ChunkScheduler("test", max_jobs=2, max_buffered=1)
    gate = threading.Event()

    def blocked() -> Iterator[int]:
        gate.wait(30)
        yield 0

    try:
        held = [scheduler.submit(blocked()), scheduler.submit(blocked())]
        with pytest.raises(EngineOverloaded) as refused:
            scheduler.submit(iter([1]))
        assert refused.value.retry_after_s >= 1
    finally:
        gate.set()
        for scheduled in held:
            scheduled.cancel()
        scheduler.stop()
