"""The engines' chunk scheduler with plain iterators in place of a model: its pick policy
(on a stopped scheduler, state set by hand) and its worker threads (real threads, real loop)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from engines.capacity import ThroughputMeter
from engines.errors import EngineFailure, EngineOverloaded
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
    scheduler: ChunkScheduler,
    *,
    started_at: float | None = None,
    audio: float = 0.0,
    buffered: int = 0,
) -> ScheduledJob:
    """A job; `started_at`: when its first chunk was delivered (None: not yet), `audio`:
    the seconds of audio delivered since."""
    made = ScheduledJob(scheduler, iter(()), IDLE_LOOP)
    made.first_delivery, made.audio_delivered, made.buffered = started_at, audio, buffered
    scheduler._jobs.append(made)
    return made


def test_a_request_waiting_for_its_first_chunk_goes_before_running_ones(stopped: ChunkScheduler) -> None:
    job(stopped, started_at=100.0, audio=0.1)  # about to run dry, but it has started
    first_fresh = job(stopped)
    job(stopped)
    assert stopped._pick() is first_fresh  # fresh ones first, in order of arrival


def test_the_stream_that_would_run_dry_first_goes_next(stopped: ChunkScheduler) -> None:
    job(stopped, started_at=100.0, audio=9.0)  # plays until 109
    nearest = job(stopped, started_at=104.0, audio=2.5)  # until 106.5: it goes first
    job(stopped, started_at=102.0, audio=6.0)  # until 108
    assert stopped._pick() is nearest
    nearest.audio_delivered += 3.0  # now until 109.5: the one that plays until 108 is next
    assert stopped._pick() is stopped._jobs[2]


def test_a_stream_near_running_dry_or_a_worker_s_worth_of_first_chunks_is_a_risk(
    stopped: ChunkScheduler,
) -> None:
    now = time.monotonic()
    ahead = job(stopped, started_at=now - 1.0, audio=5.0)  # 4 s of audio ahead of playback
    assert not stopped.at_risk()
    ahead.audio_delivered = 1.5  # 0.5 s ahead
    assert stopped.at_risk(min_lead_seconds=0.75)
    ahead.audio_delivered = 5.0
    job(stopped)  # one waiting for its first chunk; the stopped scheduler has one worker
    assert stopped.at_risk()


def test_a_stream_whose_reader_stopped_reading_is_no_risk_to_admission(stopped: ChunkScheduler) -> None:
    # Its playback deadline has long passed, but it waits on its reader (backpressure), not
    # on the engine: it must not hold up everyone else's admission.
    job(stopped, started_at=time.monotonic() - 60.0, audio=1.0, buffered=stopped.max_buffered)
    assert not stopped.at_risk()


def test_a_request_being_advanced_by_another_worker_is_not_picked(stopped: ChunkScheduler) -> None:
    busy = job(stopped)
    other = job(stopped, started_at=100.0, audio=1.0)
    busy.running = True
    assert stopped._pick() is other


def test_a_request_whose_reader_is_behind_is_skipped(stopped: ChunkScheduler) -> None:
    job(stopped, buffered=2)  # fresh, but its reader has max_buffered chunks unread
    running = job(stopped, started_at=100.0, audio=1.0, buffered=1)
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


async def test_several_workers_advance_different_requests_at_once() -> None:
    """Two workers: two requests' steps overlap (each waits for the other to be inside
    its step); one request's steps never overlap (its iterator is not shared)."""
    scheduler = ChunkScheduler("test", max_jobs=4, max_buffered=4, workers=2, duration_of=float)
    both_inside = threading.Barrier(2, timeout=30)
    inside: set[str] = set()
    overlap_of_one_request: list[str] = []

    def request(name: str) -> Iterator[float]:
        for step in range(3):
            if name in inside:
                overlap_of_one_request.append(name)
            inside.add(name)
            if step == 0:
                both_inside.wait()  # raises BrokenBarrierError unless the other is inside too
            inside.discard(name)
            yield 0.5

    try:
        a, b = scheduler.submit(request("a")), scheduler.submit(request("b"))

        async def read(scheduled: ScheduledJob) -> list[float]:
            return [chunk async for chunk in scheduled.chunks()]

        results = await asyncio.wait_for(asyncio.gather(read(a), read(b)), 30)
        assert list(results) == [[0.5] * 3, [0.5] * 3]
        assert overlap_of_one_request == []
        assert a.audio_delivered == b.audio_delivered == 1.5
    finally:
        scheduler.stop()


async def test_each_step_is_measured_for_the_engines_capacity() -> None:
    meter = ThroughputMeter(parallelism=1)
    scheduler = ChunkScheduler("test", max_jobs=2, duration_of=float, meter=meter)

    def slow_chunks() -> Iterator[float]:
        for _ in range(3):
            time.sleep(0.01)  # about 10 ms of "compute" for each 1 s of "audio"
            yield 1.0

    try:
        scheduled = scheduler.submit(slow_chunks())
        assert [chunk async for chunk in scheduled.chunks()] == [1.0, 1.0, 1.0]
    finally:
        scheduler.stop()
    capacity = meter.audio_seconds_per_second
    assert capacity is not None
    assert 0 < capacity <= 100  # never faster than the sleep allows, whatever the machine's load
