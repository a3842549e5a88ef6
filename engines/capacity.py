"""Admission by real-time capacity: an engine takes on a stream only if it can keep every
stream it holds real-time.

A live stream needs one second of audio per second of playback; an engine makes some
number of audio seconds per second of its workers' time. So:

- **Capacity** (`ThroughputMeter`): audio seconds the engine makes per wall second with
  all its workers busy, measured from the engine's own steps (each step's audio over its
  wall time, times the number of steps that run at once), as a decaying average that
  follows the load: under contention steps take longer and the estimate falls with them.
- **Demand**: the slots held. A slot is one HTTP synthesis or one WebSocket utterance,
  from admission until its last chunk is made (an utterance holds its slot between pieces
  of text, which arrive as an LLM writes them: it will need real time when they come).
- **Admission** (`RealtimeAdmission`): a new slot is granted now if demand + 1 stays
  within capacity times `headroom` (and under the hard `max_active` and the owner's fair
  share), and no stream the engine holds is at risk (`at_risk`, from the scheduler: one is
  near running dry at its caller, or as many as there are workers still wait for their
  first chunk). The last rule paces a burst of arrivals: each new stream starts once the
  ones before it have a lead, instead of all starting together and all running dry.
  Otherwise it waits in a short queue, bounded in length and in time, and is granted
  when slots end: its first audio is later, but once started it never stutters. The queue
  takes turns between owners (`_ranks`: the owner holding fewer slots first, each owner's
  waiters in their order), and a request that finds it full takes the place of the last
  waiter of an owner holding more (`_displace`), so one owner's burst can neither keep
  another's request behind all of it nor have it refused. With a `FleetShare` (Redis), an
  owner's slots on the other processes count too, in its rank and against its fleet-wide
  share.
  A request whose expected wait is past the queue's time bound is refused at once
  (`EngineOverloaded`, 503) with a Retry-After from that expected wait, as is one that
  waited the whole bound, and one from an owner already at its share (a full engine
  answers 503 first, whoever asks). The expected wait comes from the slots held: their age against
  the measured mean slot lifetime says when each will end.

Until the meter has seen a step the engine is assumed to keep up (only `max_active`
binds), and an idle engine always takes one stream, however slow it measures.

Thread-safety: steps are observed on worker threads; slots are taken and released on
event loops (the server's, and a warm-up's own). One lock guards the state; a waiter is
woken on its own loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Protocol

from engines.errors import EngineOverloaded, EngineShareExceeded

# Steps that made audio without computing it (silence for an SSML break) say nothing of
# the engine's speed.
MIN_MEASURED_STEP_SECONDS = 0.001
# Before any slot has ended: a guess of how long one lives (an utterance of a few seconds).
DEFAULT_SLOT_SECONDS = 5.0
MAX_RETRY_AFTER_SECONDS = 120


@dataclass(frozen=True)
class QueuePolicy:
    """How close to its measured capacity an engine admits, and how long a request may wait."""

    headroom: float = 0.65  # admit up to this share of the measured capacity
    # False: admit up to `max_active` whatever the measured speed, with no pacing of bursts
    # (a fixed engine size: the tests on a shared, loaded machine, and operators who size
    # by hand); capacity is still measured and reported.
    realtime: bool = True
    queue_max: int = 16  # requests waiting at most
    queue_seconds: float = 2.0  # the longest a request waits before 503


class ThroughputMeter:
    """Audio seconds per second the engine makes, from its steps.

    `parallelism` steps run at once (worker threads, or requests in a batch). Each step
    reports its wall time and the audio it made; their decayed sums give the wall time one
    audio second costs one worker, under whatever contention there is now."""

    def __init__(self, parallelism: int, *, decay: float = 0.95) -> None:
        self.parallelism = parallelism
        self._decay = decay
        self._compute = 0.0
        self._audio = 0.0
        self._lock = threading.Lock()

    def observe(self, compute_seconds: float, audio_seconds: float) -> None:
        if compute_seconds < MIN_MEASURED_STEP_SECONDS or audio_seconds <= 0:
            return
        with self._lock:
            self._compute = self._compute * self._decay + compute_seconds
            self._audio = self._audio * self._decay + audio_seconds

    @property
    def audio_seconds_per_second(self) -> float | None:
        with self._lock:
            if self._compute <= 0:
                return None
            return self.parallelism * self._audio / self._compute


@dataclass
class EngineSlot:
    """One admitted stream's hold on the engine; release it once (EngineSlot.release)."""

    admission: RealtimeAdmission
    owner: str
    granted_at: float
    released: bool = False

    def release(self) -> None:
        self.admission.release(self)


@dataclass(eq=False)
class _Waiter:
    owner: str
    loop: asyncio.AbstractEventLoop
    granted: asyncio.Future[EngineSlot]
    # Pushed out of a full queue by an owner holding fewer slots (see `_displace`).
    displaced: bool = False


class FleetShare(Protocol):
    """What the other processes of the fleet hold, per owner (engines/fleet.py keeps it in
    Redis): so that an owner's share binds across every engine, not each one alone."""

    async def held_elsewhere(self, owner: str) -> int:
        """Slots (held or awaited) `owner` has on the other processes; 0 when unknown."""
        ...

    def held_here(self, owner: str, count: int) -> None:
        """This process's count for `owner` changed (called with the admission's lock held,
        from any thread: it must not block)."""
        ...


@dataclass(frozen=True)
class AdmissionState:
    """What an autoscaler reads: capacity and demand in real-time streams, the queue."""

    capacity: float | None  # audio seconds per second; None until measured
    demand: int  # slots held
    queued: int
    admitted_total: int
    queued_total: int
    refused_total: int
    busy_seconds: float


class RealtimeAdmission:
    def __init__(
        self,
        *,
        meter: ThroughputMeter,
        max_active: int,
        max_per_owner: int,
        policy: QueuePolicy = QueuePolicy(),
    ) -> None:
        self.meter = meter
        self.max_active = max_active
        self.max_per_owner = max_per_owner
        self.headroom = policy.headroom
        self.realtime = policy.realtime
        self.queue_max = policy.queue_max
        self.queue_seconds = policy.queue_seconds
        # Whether a stream the engine holds is near running dry, or too many are still waiting
        # for their first chunk (set by the engine from its scheduler; None: never).
        self.at_risk: Callable[[], bool] | None = None
        self._lock = threading.Lock()
        self._slots: list[EngineSlot] = []
        self._by_owner: Counter[str] = Counter()  # slots held and queued, per owner
        # Across the fleet (`share_across`): what each owner with slots here holds on the
        # other processes, as last read, and the most one owner may hold on all of them
        # (0: no bound beyond this engine's).
        self.fleet: FleetShare | None = None
        self.fleet_max_per_owner = 0
        self._elsewhere: dict[str, int] = {}
        self._queue: deque[_Waiter] = deque()
        self._mean_slot_seconds: float | None = None
        self.admitted_total = 0
        self.queued_total = 0
        self.refused_total = 0
        # Busy time: seconds with at least one slot held (utilisation is its rate).
        self._busy_seconds = 0.0
        self._busy_since = 0.0

    def share_across(self, fleet: FleetShare, *, max_per_owner: int) -> None:
        """Count each owner's slots on every process (`fleet`), and hold it to
        `max_per_owner` of them in all (0: no bound beyond each engine's own share)."""
        self.fleet = fleet
        self.fleet_max_per_owner = max_per_owner

    # --- reading ---

    @property
    def demand(self) -> int:
        return len(self._slots)

    def realtime_limit(self) -> float:
        """How many slots the engine can hold and keep real-time, as measured now."""
        capacity = self.meter.audio_seconds_per_second
        if capacity is None or not self.realtime:
            return float(self.max_active)
        return min(float(self.max_active), capacity * self.headroom)

    def state(self) -> AdmissionState:
        with self._lock:
            busy = self._busy_seconds + (time.monotonic() - self._busy_since if self._slots else 0.0)
            return AdmissionState(
                capacity=self.meter.audio_seconds_per_second,
                demand=len(self._slots),
                queued=len(self._queue),
                admitted_total=self.admitted_total,
                queued_total=self.queued_total,
                refused_total=self.refused_total,
                busy_seconds=busy,
            )

    # --- taking and giving back ---

    async def acquire(self, owner: str = "") -> EngineSlot:
        """A slot now, or after a short wait in the queue; raises EngineOverloaded (the
        engine cannot keep one more stream real-time soon enough) or EngineShareExceeded
        (the owner already holds or awaits its share)."""
        loop = asyncio.get_running_loop()
        # Read before the lock (a round trip to Redis); a moment stale at worst, as any
        # count another process keeps. The service's own jobs (owner "") are nobody's share.
        elsewhere = await self.fleet.held_elsewhere(owner) if self.fleet is not None and owner else 0
        with self._lock:
            if elsewhere:
                self._elsewhere[owner] = elsewhere
            else:
                self._elsewhere.pop(owner, None)
            capacity_room = self._capacity_room()
            # Those in the queue this request would wait behind (`_rank`: fewer slots held first).
            ahead = self._ahead_of(owner)
            if not ahead and capacity_room and not self._streams_at_risk():
                self._check_share(owner)
                return self._grant(owner)
            if capacity_room:
                self._check_share(owner)  # 429: the engine is not full, the owner's share is
            position = ahead + 1
            # Queued behind a stream at risk only (there is capacity for it): a moment's wait.
            free = max(0, math.floor(self.realtime_limit()) - len(self._slots))
            wait = 0.0 if position <= free else self._expected_wait(position - free)
            # A full engine answers 503 first, whoever asks: also to an owner at its share. A
            # full queue takes a request that goes ahead of its last waiter: that one leaves.
            # Displacing comes last: only once this request is sure to be queued.
            if (
                wait > self.queue_seconds
                or self._share_reached(owner) is not None
                or (len(self._queue) >= self.queue_max and not self._displace(owner))
            ):
                self.refused_total += 1
                raise EngineOverloaded(retry_after_s=_retry_after(wait))
            waiter = _Waiter(owner=owner, loop=loop, granted=loop.create_future())
            self._queue.append(waiter)
            self._count_owner(owner, +1)
            self.queued_total += 1
        try:
            # Not wait_for: on Python 3.11 it returns the result to a task cancelled just as
            # the slot was granted, and the cancellation is lost. A cancelled task always gets
            # CancelledError here, and the slot goes back below.
            async with asyncio.timeout(self.queue_seconds):
                return await asyncio.shield(waiter.granted)
        except BaseException as exc:
            if waiter.displaced:  # out of the queue already (its owner's count too)
                if isinstance(exc, TimeoutError):  # its wait ended before the refusal came
                    raise EngineOverloaded(retry_after_s=1) from None
                raise
            with self._lock:
                queued = waiter in self._queue
                if queued:  # not granted: leave the queue
                    self._queue.remove(waiter)
                    self._drop_owner(owner)
            if not queued:  # granted as the wait ended: give the slot back
                if waiter.granted.done() and not waiter.granted.cancelled():
                    waiter.granted.result().release()
                else:
                    waiter.granted.cancel()  # `_resolve`, still to run on this loop, releases it
            if isinstance(exc, TimeoutError):
                with self._lock:
                    self.refused_total += 1
                    retry = _retry_after(self._expected_wait(len(self._queue) + 1))
                raise EngineOverloaded(retry_after_s=retry) from None
            raise

    def poke(self) -> None:
        """Grant waiting requests if there is room now (the engine calls it after each step:
        a stream that was at risk may no longer be). Safe from any thread."""
        with self._lock:
            self._grant_waiting()

    def release(self, slot: EngineSlot) -> None:
        with self._lock:
            if slot.released:
                return
            slot.released = True
            self._slots.remove(slot)
            self._drop_owner(slot.owner)
            now = time.monotonic()
            if slot.owner:  # the service's own jobs (a warm-up's word) say nothing of callers'
                lifetime = now - slot.granted_at
                mean = self._mean_slot_seconds
                self._mean_slot_seconds = lifetime if mean is None else 0.8 * mean + 0.2 * lifetime
            if not self._slots:
                self._busy_seconds += now - self._busy_since
            self._grant_waiting()

    # --- with the lock held ---

    def _capacity_room(self) -> bool:
        if not self._slots:
            return True  # an idle engine always takes one, however slow it measures
        return len(self._slots) + 1 <= self.realtime_limit()

    def _streams_at_risk(self) -> bool:
        return self.realtime and bool(self._slots) and self.at_risk is not None and self.at_risk()

    def _room_now(self) -> bool:
        return self._capacity_room() and not self._streams_at_risk()

    def _share_reached(self, owner: str) -> int | None:
        """The share `owner` has reached (this engine's, or the fleet's counting the other
        processes), or None while it may take one more."""
        if not owner:
            return None
        mine = self._by_owner[owner]
        if mine >= self.max_per_owner:
            return self.max_per_owner
        if self.fleet_max_per_owner and mine + self._elsewhere.get(owner, 0) >= self.fleet_max_per_owner:
            return self.fleet_max_per_owner
        return None

    def _check_share(self, owner: str) -> None:
        if (share := self._share_reached(owner)) is not None:
            self.refused_total += 1
            raise EngineShareExceeded(share)

    def _grant(self, owner: str, *, counted: bool = False) -> EngineSlot:
        now = time.monotonic()
        if not self._slots:
            self._busy_since = now
        slot = EngineSlot(admission=self, owner=owner, granted_at=now)
        self._slots.append(slot)
        if not counted:
            self._count_owner(owner, +1)
        self.admitted_total += 1
        return slot

    def _held(self, owner: str) -> int:
        """The slots `owner` holds: here, and on the other processes as last read."""
        return sum(1 for slot in self._slots if slot.owner == owner) + self._elsewhere.get(owner, 0)

    def _ranks(self) -> list[tuple[int, int]]:
        """Each waiter's place, in queue order: (slots its owner holds plus its owner's
        waiters before it, arrival). Lower goes first, so the queue takes turns between
        owners, and one holding fewer streams goes ahead of one holding many: a tenant's
        burst of streams never keeps another's request waiting behind all of it."""
        seen: Counter[str] = Counter()
        ranks = []
        for index, waiter in enumerate(self._queue):
            ranks.append((self._held(waiter.owner) + seen[waiter.owner], index))
            seen[waiter.owner] += 1
        return ranks

    def _ahead_of(self, owner: str) -> int:
        """How many waiters a new request of `owner` would wait behind."""
        mine = self._held(owner) + sum(1 for waiter in self._queue if waiter.owner == owner)
        return sum(1 for rank, _index in self._ranks() if rank <= mine)

    def _displace(self, owner: str) -> bool:
        """Make room in a full queue for a request of `owner` if it goes ahead of the last
        waiter (by `_rank`): that waiter is refused (503), as it would have been had it
        come after. So a tenant that fills the queue cannot have another's request refused."""
        ranks = self._ranks()
        if not ranks:
            return False
        last_rank, last_index = max(ranks)
        if last_rank <= self._held(owner) + sum(1 for waiter in self._queue if waiter.owner == owner):
            return False
        victim = self._queue[last_index]
        del self._queue[last_index]
        self._drop_owner(victim.owner)
        victim.displaced = True
        self.refused_total += 1
        retry = EngineOverloaded(retry_after_s=_retry_after(self._expected_wait(len(self._queue) + 1)))
        with suppress(RuntimeError):  # its loop is gone: nobody waits for it
            victim.loop.call_soon_threadsafe(_refuse, victim.granted, retry)
        return True

    def _grant_waiting(self) -> None:
        while self._queue and self._room_now():
            _rank, index = min(self._ranks())
            waiter = self._queue[index]
            del self._queue[index]
            slot = self._grant(waiter.owner, counted=True)
            try:
                waiter.loop.call_soon_threadsafe(_resolve, waiter.granted, slot)
            except RuntimeError:  # the waiter's loop is gone: nobody will use the slot
                self._slots.remove(slot)
                self._drop_owner(waiter.owner)
            if self.realtime and self.at_risk is not None:
                # One at a time: the scheduler sees the new stream only once its waiter runs
                # and submits it; the next step's `poke` considers the next waiter.
                return

    def _count_owner(self, owner: str, change: int) -> None:
        self._by_owner[owner] += change
        count = self._by_owner[owner]
        if count <= 0:
            del self._by_owner[owner]
            self._elsewhere.pop(owner, None)  # read again at its next request
        if owner and self.fleet is not None:
            self.fleet.held_here(owner, max(count, 0))

    def _drop_owner(self, owner: str) -> None:
        self._count_owner(owner, -1)

    def _expected_wait(self, position: int) -> float:
        """Seconds until the `position`-th in the queue would be granted: when that many
        held slots will have ended, going by their age against the mean slot lifetime."""
        mean = self._mean_slot_seconds or DEFAULT_SLOT_SECONDS
        now = time.monotonic()
        remaining = sorted(max(mean - (now - slot.granted_at), 0.1 * mean) for slot in self._slots)
        if not remaining:
            return 0.0
        if position <= len(remaining):
            return remaining[position - 1]
        rounds = math.ceil(position / len(remaining))
        return remaining[(position - 1) % len(remaining)] + (rounds - 1) * mean


def _resolve(future: asyncio.Future[EngineSlot], slot: EngineSlot) -> None:
    if future.done():  # its waiter gave up as it was granted: give the slot back
        slot.release()
    else:
        future.set_result(slot)


def _refuse(future: asyncio.Future[EngineSlot], error: EngineOverloaded) -> None:
    if not future.done():
        future.set_exception(error)


def _retry_after(wait_seconds: float) -> int:
    return min(MAX_RETRY_AFTER_SECONDS, max(1, math.ceil(wait_seconds)))
