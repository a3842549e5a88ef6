"""One worker thread that owns a model which must never run two requests at once.

Requests are iterators of audio chunks. The worker advances one request by one
chunk at a time, so concurrent requests interleave instead of queueing whole:

- a request that has not produced its first chunk yet goes first (first audio
  is what a caller waits on; later chunks have the audio already sent as slack);
- otherwise requests take turns, least recently served first;
- a request whose consumer has `max_buffered` chunks unread is skipped until
  the consumer catches up (backpressure: a slow reader pauses its generation);
- a cancelled request is dropped before its next chunk.

Chunks travel to the event loop with `call_soon_threadsafe`: the loop never
waits on the model.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

from engines.base import EngineFailure, EngineOverloaded

logger = logging.getLogger(__name__)
T = TypeVar("T")
_DONE = object()


class ScheduledJob:
    def __init__(
        self, scheduler: ChunkScheduler, iterator: Iterator[Any], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._scheduler = scheduler
        self.iterator = iterator
        self.loop = loop
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.arrival = next(scheduler._arrivals)
        self.last_served = -1
        self.started = False
        self.cancelled = False
        self.buffered = 0  # chunks delivered but not yet taken; guarded by the scheduler's lock

    def cancel(self) -> None:
        self._scheduler._cancel(self)

    async def chunks(self) -> AsyncIterator[Any]:
        try:
            while True:
                item = await self.queue.get()
                self._scheduler._taken(self)
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise EngineFailure(str(item)) from item
                yield item
        finally:
            self.cancel()


class ChunkScheduler:
    def __init__(self, name: str, *, max_jobs: int, max_buffered: int = 4) -> None:
        self.name = name
        self.max_jobs = max_jobs
        self.max_buffered = max_buffered
        self._jobs: list[ScheduledJob] = []
        self._condition = threading.Condition()
        self._arrivals = itertools.count()
        self._ticks = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-scheduler", daemon=True)
        self._thread.start()

    @property
    def active_jobs(self) -> int:
        return len(self._jobs)

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
        """Run one call on the worker thread (for other uses of the model), with first-chunk priority."""

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
        self._thread.join(timeout=5)

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
        for job in [job for job in self._jobs if job.cancelled]:
            self._jobs.remove(job)
            self._close(job)
        runnable = [job for job in self._jobs if job.buffered < self.max_buffered]
        if not runnable:
            return None
        fresh = [job for job in runnable if not job.started]
        if fresh:
            return min(fresh, key=lambda job: job.arrival)
        return min(runnable, key=lambda job: job.last_served)

    def _close(self, job: ScheduledJob) -> None:
        close = getattr(job.iterator, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                logger.exception("Closing a cancelled %s job failed", self.name)

    def _deliver(self, job: ScheduledJob, item: Any) -> None:
        with self._condition:
            job.buffered += 1
        try:
            job.loop.call_soon_threadsafe(job.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is gone
            self._cancel(job)

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
                job.started = True
                job.last_served = next(self._ticks)
            try:
                item = next(job.iterator)
            except StopIteration:
                self._finish(job, _DONE)
            except Exception as exc:
                logger.exception("%s job failed", self.name)
                self._finish(job, exc)
            else:
                self._deliver(job, item)

    def _finish(self, job: ScheduledJob, final: Any) -> None:
        with self._condition:
            if job in self._jobs:
                self._jobs.remove(job)
        self._deliver(job, final)
