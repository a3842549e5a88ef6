"""The engines' one scheduler: worker threads that advance requests chunk by chunk, the
chunk whose caller would run out of audio soonest first.

Requests are iterators of audio chunks. A worker advances one request by one chunk at a
time, so concurrent requests interleave instead of queueing whole. Which one next:

- a request that has not produced its first chunk yet goes first, in order of arrival
  (first audio is what a caller waits on; nothing plays until it comes);
- otherwise the one with the nearest playback deadline: the moment its caller, playing
  from its first chunk on, would have played everything made so far (first delivery plus
  the audio delivered). A stream with seconds of audio ahead yields to one about to run
  dry (earliest deadline first);
- a request whose consumer has `max_buffered` chunks unread is skipped until the
  consumer catches up (backpressure: a slow reader pauses its generation);
- a cancelled request is dropped before its next chunk.

One request is advanced by one worker at a time (its iterator is not shared between
threads). Piper's ONNX session runs on several worker threads. XTTS batches its
requests' decoding steps in a loop of its own (engines/xtts_batch.py), which chooses who
runs in the same order. Each step's wall time and audio go to
the engine's ThroughputMeter (engines/capacity.py), which admission reads.

Chunks travel to the event loop with `call_soon_threadsafe`: the loop never waits on a
model.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol, TypeVar

from engines.capacity import ThroughputMeter
from engines.errors import EngineFailure, EngineOverloaded

logger = logging.getLogger(__name__)
T = TypeVar("T")
DONE = object()  # the last item of a stream's queue
# A stream with less audio than this ahead of its caller's playback is at risk of running dry.
MIN_LEAD_SECONDS = 0.75


def no_duration(item: Any) -> float:
    return 0.0


class ChunkStream:
    """One request's side of an engine's loop (this scheduler, or XTTS's batched one): the
    queue its chunks reach the event loop by, its place in the order (`priority`), and its
    caller's playback clock. The loop's own state (buffered, cancelled) is guarded by the
    loop's lock; `owner` is told when a chunk is taken (backpressure) and when the consumer
    stops (cancellation)."""

    def __init__(self, owner: StreamOwner, loop: asyncio.AbstractEventLoop, arrival: int) -> None:
        self._owner = owner
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.arrival = arrival
        self.cancelled = False
        self.buffered = 0  # chunks delivered but not yet taken
        # Playback: when its first chunk was delivered, and the audio delivered since.
        self.first_delivery: float | None = None
        self.audio_delivered = 0.0

    @property
    def started(self) -> bool:
        return self.first_delivery is not None

    @property
    def deadline(self) -> float:
        """When a caller playing from the first chunk on would run out of audio."""
        if self.first_delivery is None:
            return float("-inf")
        return self.first_delivery + self.audio_delivered

    def priority(self) -> tuple[int, float]:
        """Lower goes first: no first chunk yet (by arrival), then the nearest deadline."""
        if self.first_delivery is None:
            return (0, float(self.arrival))
        return (1, self.deadline)

    def delivered(self, audio_seconds: float) -> None:
        """Its clock, as a chunk of `audio_seconds` is delivered."""
        if self.first_delivery is None:
            self.first_delivery = time.monotonic()
        self.audio_delivered += audio_seconds

    def cancel(self) -> None:
        self._owner._cancel(self)

    async def chunks(self) -> AsyncIterator[Any]:
        try:
            while True:
                item = await self.queue.get()
                self._owner._taken(self)
                if item is DONE:
                    return
                if isinstance(item, BaseException):
                    raise EngineFailure(str(item)) from item
                yield item
        finally:
            self.cancel()


class StreamOwner(Protocol):
    def _cancel(self, stream: Any) -> None: ...

    def _taken(self, stream: Any) -> None: ...


class ScheduledJob(ChunkStream):
    def __init__(
        self,
        scheduler: ChunkScheduler,
        iterator: Iterator[Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(scheduler, loop, next(scheduler._arrivals))
        self.iterator = iterator
        self.running = False  # a worker is advancing it now


class ChunkScheduler:
    def __init__(
        self,
        name: str,
        *,
        max_jobs: int,
        max_buffered: int = 4,
        workers: int = 1,
        duration_of: Callable[[Any], float] = no_duration,
        meter: ThroughputMeter | None = None,
        computed: Callable[[Any], bool] = lambda item: True,
        on_step: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.max_jobs = max_jobs
        self.max_buffered = max_buffered
        self._duration_of = duration_of
        self._meter = meter
        # Whether an item's audio was computed (silence for a break is not: it would read as
        # free audio and inflate the measured capacity).
        self._computed = computed
        self._on_step = on_step
        self._workers = workers
        self._jobs: list[ScheduledJob] = []
        self._condition = threading.Condition()
        self._arrivals = itertools.count()
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-worker-{index}", daemon=True)
            for index in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def active_jobs(self) -> int:
        return len(self._jobs)

    def at_risk(self, min_lead_seconds: float = MIN_LEAD_SECONDS) -> bool:
        """Whether a stream is near running dry at its caller (less than `min_lead_seconds`
        of audio ahead of its playback), or every worker's worth of streams still waits for
        its first chunk: then taking on another stream would put one at risk."""
        now = time.monotonic()
        with self._condition:
            # A job whose reader is behind (backpressure) waits on its reader, not on the
            # engine: its deadline says nothing of the engine (a client that stopped reading
            # must not hold up everyone's admission).
            waiting = [job for job in self._jobs if not job.cancelled and job.buffered < self.max_buffered]
            if sum(1 for job in waiting if not job.started) >= self._workers:
                return True
            return any(job.deadline - now < min_lead_seconds for job in waiting if job.started)

    def submit(self, iterator: Iterator[Any]) -> ScheduledJob:
        """Queue a request; raises EngineOverloaded when the queue is full. Call on the event loop."""
        job = ScheduledJob(self, iterator, asyncio.get_running_loop())
        with self._condition:
            if len(self._jobs) >= self.max_jobs:
                raise EngineOverloaded(retry_after_s=max(1, len(self._jobs) // 4))
            self._jobs.append(job)
            self._condition.notify()
        return job

    async def run(self, function: Callable[[], T]) -> T:
        """Run one call on a worker (for other uses of the model), with first-chunk priority."""

        def single() -> Iterator[T]:
            yield function()

        job = self.submit(single())
        async for result in job.chunks():
            return result  # type: ignore[no-any-return]
        raise EngineFailure("The scheduled call produced no result.")

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)

    def _cancel(self, job: ScheduledJob) -> None:
        with self._condition:
            job.cancelled = True
            self._condition.notify()

    def _taken(self, job: ScheduledJob) -> None:
        with self._condition:
            job.buffered -= 1
            if job.buffered == self.max_buffered - 1:
                self._condition.notify()

    def _pick(self) -> ScheduledJob | None:
        """The next job to advance, or None to wait. Called with the lock held."""
        for job in [job for job in self._jobs if job.cancelled and not job.running]:
            self._jobs.remove(job)
            self._close(job)
        runnable = [
            job
            for job in self._jobs
            if not job.running and not job.cancelled and job.buffered < self.max_buffered
        ]
        if not runnable:
            return None
        return min(runnable, key=ChunkStream.priority)

    def _close(self, job: ScheduledJob) -> None:
        close = getattr(job.iterator, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                logger.exception("Closing a cancelled %s job failed", self.name)

    def _deliver(self, job: ScheduledJob, item: Any) -> None:
        """Hand `item` to the job's consumer. Called with the lock held."""
        job.buffered += 1
        try:
            job.loop.call_soon_threadsafe(job.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is gone
            job.cancelled = True

    def _run(self) -> None:
        while True:
            with self._condition:
                job = self._pick()
                while job is None and not self._stopping:
                    self._condition.wait()
                    job = self._pick()
                if self._stopping:
                    return
                assert job is not None
                job.running = True
            final: Any = None
            step_started = time.perf_counter()
            try:
                item = next(job.iterator)
            except StopIteration:
                final = DONE
            except Exception as exc:
                logger.exception("%s job failed", self.name)
                final = exc
            with self._condition:
                job.running = False
                if final is not None:
                    if job in self._jobs:
                        self._jobs.remove(job)
                    self._deliver(job, final)
                else:
                    audio_seconds = self._duration_of(item)
                    job.delivered(audio_seconds)
                    if self._meter is not None and self._computed(item):
                        self._meter.observe(time.perf_counter() - step_started, audio_seconds)
                    self._deliver(job, item)
                # Another worker may be waiting for this job (it was running) or for any job.
                self._condition.notify_all()
            if self._on_step is not None:
                self._on_step()  # outside the lock: it takes the admission's
