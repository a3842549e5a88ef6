"""Audio a tenant's quota counter does not show yet: running requests' reservations, and
finished requests until a reading of the counter includes their rows (usage/quotas.py).

Held in Redis, so that every process of every pod sees every other's reservations and the
check-and-reserve is one atomic step for the whole fleet: one hash per tenant and month,
a field per request (its usage record id) holding "seconds;written_at_ms;expires_at_ms".
`written_at` is 0 until the usage writer has stored the row; from then on the entry counts
only for readers whose reading of the counter began before that, and it is dropped once
every cached reading is newer. Both times are read off Redis's clock (`holds_clock_ms`), so
hosts' clocks never disagree about them. Entries of a process that died expire on their
own (RUNNING_TTL_MS, UNWRITTEN_TTL_MS).

While Redis is away the same bookkeeping runs in process memory (`_LocalHolds`): quotas
then hold per process, as rate limits do. That count takes in every reservation this
process holds, those held in Redis too (at their size now, growth during the outage
included), as stream leases do (tenants/limits.py); while Redis answers, only what it does
not hold is added to what it counts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import redis
from django.conf import settings

from core.redis import REDIS_ERRORS, RedisUnavailable, async_redis, breaker, sync_redis

logger = logging.getLogger(__name__)

HoldKey = tuple[uuid.UUID, date]

# A running request's reservation outlives any request (600 s of audio at a quarter of
# real time); a finished one waits for its row through a database outage of up to an hour.
RUNNING_TTL_MS = 30 * 60_000
UNWRITTEN_TTL_MS = 60 * 60_000
KEY_TTL_MS = 2 * 60 * 60_000

_NOW = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local function parse(value)
  local seconds, written, expires = string.match(value, '^([^;]+);([^;]+);([^;]+)$')
  return tonumber(seconds), tonumber(written), tonumber(expires)
end
"""
# KEYS: the hash. ARGV: limit, used, read_at_ms, record id, estimate.
# Returns 1 (reserved) or 0 (the quota is reached).
_RESERVE_LUA = (
    _NOW
    + f"""
local held = 0
local entries = redis.call('HGETALL', KEYS[1])
for i = 1, #entries, 2 do
  local seconds, written, expires = parse(entries[i + 1])
  if expires == nil or expires < now then
    redis.call('HDEL', KEYS[1], entries[i])
  elseif written == 0 or written >= tonumber(ARGV[3]) then
    held = held + seconds
  end
end
if tonumber(ARGV[2]) + held >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[4], ARGV[5] .. ';0;' .. (now + {RUNNING_TTL_MS}))
redis.call('PEXPIRE', KEYS[1], {KEY_TTL_MS})
return 1
"""
)
# Extending is reserving again under the same record id, with the total it then holds: the
# entry's own old seconds count among those held, so the check is "everything held, this
# entry as it was, plus the new piece". Returns 1 (extended) or 0 (the entry is left as it was).
_EXTEND_LUA = _RESERVE_LUA
# KEYS: the hash. ARGV: record id, the seconds it settles to.
_SETTLE_LUA = (
    _NOW
    + f"""
local value = redis.call('HGET', KEYS[1], ARGV[1])
local seconds, written, expires = 0, 0, 0
if value then
  seconds, written, expires = parse(value)
end
local amount = tonumber(ARGV[2])
if written > 0 then
  seconds = amount  -- its row is stored already: the entry lives out its written time
elseif amount > 0 then
  seconds = amount
  expires = now + {UNWRITTEN_TTL_MS}
else
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
redis.call('HSET', KEYS[1], ARGV[1], seconds .. ';' .. written .. ';' .. expires)
redis.call('PEXPIRE', KEYS[1], {KEY_TTL_MS})
return 1
"""
)
# KEYS: the hash. ARGV: how long a written entry stays (ms), record ids...
_WRITTEN_LUA = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
for i = 2, #ARGV do
  local value = redis.call('HGET', KEYS[1], ARGV[i])
  local seconds = 0
  if value then
    seconds = parse(value)
  end
  redis.call('HSET', KEYS[1], ARGV[i], seconds .. ';' .. now .. ';' .. (now + tonumber(ARGV[1])))
end
return 1
"""
)


def _redis_key(key: HoldKey) -> str:
    tenant_id, month = key
    return f"{settings.REDIS_KEY_PREFIX}:quota:{tenant_id.hex}:{month:%Y-%m}"


def _now_ms() -> float:
    return time.time() * 1000


def _written_keep_ms() -> float:
    """How long a written entry must still count: until every process's cached reading of
    the counter was taken after the write."""
    return (settings.QUOTA_CACHE_SECONDS + 1.0) * 1000


async def holds_clock_ms() -> float:
    """Now, on the clock the holds are stamped with: Redis's (the local one without it)."""
    try:
        seconds, microseconds = await async_redis().time()
    except (RedisUnavailable, *REDIS_ERRORS) as exc:
        if not isinstance(exc, RedisUnavailable):
            breaker.trip(exc)
        return _now_ms()
    return float(seconds * 1000 + microseconds / 1000)


# --- in process memory (no Redis, or Redis away) ---------------------------------------------


@dataclass
class _Entry:
    seconds: float
    expires_at_ms: float
    written_at_ms: float = 0.0


@dataclass
class _InRedis:
    """One of this process's reservations held in Redis, as this process knows it."""

    seconds: float  # its size now
    expires_at_ms: float
    # What it grew by while Redis was away: Redis still holds it at its old size, until its
    # next extension sends the whole size.
    unseen_growth: float = 0.0


@dataclass
class _LocalHolds:
    """The same bookkeeping as the Redis hash, with the same expiry rules."""

    # Reserved and settled here while Redis was away: only this process knows them.
    reserved: dict[uuid.UUID, _Entry] = field(default_factory=dict)
    settled: dict[uuid.UUID, _Entry] = field(default_factory=dict)
    # This process's running reservations held in Redis. Redis counts them while it answers;
    # while it is away only this process can, or each of them (every utterance on a socket)
    # could grow to the limit on its own. Each leaves when it settles.
    in_redis: dict[uuid.UUID, _InRedis] = field(default_factory=dict)

    def _drop_stale(self, read_at_ms: float) -> None:
        now = _now_ms()
        for entries in (self.reserved, self.settled, self.in_redis):
            for record_id in [record_id for record_id, entry in entries.items() if entry.expires_at_ms < now]:
                del entries[record_id]  # its process lost track of it: it expires, as in Redis
        for record_id in [
            record_id
            for record_id, entry in self.settled.items()
            if entry.written_at_ms and entry.written_at_ms < read_at_ms
        ]:
            del self.settled[record_id]  # the reading includes it

    def seconds(self, read_at_ms: float) -> float:
        """Everything this process holds: what decides while Redis is away."""
        self._drop_stale(read_at_ms)
        return self._made_here() + sum(entry.seconds for entry in self.in_redis.values())

    def unseen_by_redis(self, read_at_ms: float) -> float:
        """What this process holds that Redis does not: added to what Redis counts, never
        counting twice what Redis holds already."""
        self._drop_stale(read_at_ms)
        return self._made_here() + sum(entry.unseen_growth for entry in self.in_redis.values())

    def _made_here(self) -> float:
        return sum(entry.seconds for entry in (*self.reserved.values(), *self.settled.values()))

    def empty(self) -> bool:
        return not (self.reserved or self.settled or self.in_redis)


_local: dict[HoldKey, _LocalHolds] = defaultdict(_LocalHolds)
# The event loop reserves and settles; the usage writer's thread marks rows written.
_local_lock = threading.Lock()
# Adjustments sent to Redis from synchronous code: held until done (the loop keeps only a
# weak reference to a task).
_pending: set[asyncio.Task[Any]] = set()


def _forget_if_empty(key: HoldKey) -> None:
    """Drop a tenant's month that holds nothing any more, so that settled reservations
    leave nothing behind. Call it holding `_local_lock`."""
    if key in _local and _local[key].empty():
        del _local[key]


def _unseen_by_redis(key: HoldKey, read_at_ms: float) -> float:
    with _local_lock:
        if key not in _local:
            return 0.0
        unseen = _local[key].unseen_by_redis(read_at_ms)
        _forget_if_empty(key)  # all of it may have expired
        return unseen


# --- reservations ------------------------------------------------------------------------------


@dataclass(eq=False)
class QuotaReservation:
    """A running request's claim on its tenant's quota; `settle` it once, when it ends."""

    key: HoldKey
    record_id: uuid.UUID  # the id of the request's usage record
    seconds: float
    in_redis: bool
    limit: float = 0.0  # the quota it was reserved under, in seconds (what `extend` checks)
    # Made locally after a Redis call that may still have run: the Redis copy is cleared too.
    clear_in_redis: bool = False
    settled: bool = False
    # This reservation's last change on its way to Redis: the next one goes after it, so an
    # `extend` can never land after the `settle` that ends the reservation.
    _last_change: asyncio.Task[Any] | None = field(default=None, repr=False)

    async def extend(self, seconds: float, *, used: float, read_at_ms: float) -> bool:
        """More of the request's audio is about to be made (a piece of a WebSocket
        utterance): reserve `seconds` more, unless `used` plus everything held (this
        reservation too, by every process) already reaches its limit (then False, and
        nothing changes). One atomic step, as `holds_reserve`: concurrent extensions of
        all of a tenant's requests overshoot by at most one extension."""
        if self.settled:
            return False
        if seconds <= 0:
            return True
        limit = self.limit
        if self.in_redis:
            # What this process holds that Redis does not counts too, as in `holds_reserve`:
            # this reservation's own growth during an outage among it, since Redis still
            # holds it at its old size.
            unseen = _unseen_by_redis(self.key, read_at_ms)
            loop = asyncio.get_running_loop()
            # A change of its own, in this reservation's order: a `settle` sent while this
            # waits (the utterance stopped) lands after it, never before.
            task = loop.create_task(
                self._extend_in_redis(seconds, limit, used + unseen, read_at_ms, self._last_change)
            )
            self._last_change = task
            _pending.add(task)
            task.add_done_callback(_pending.discard)
            extended = await asyncio.shield(task)
            if extended is not None:
                if extended:
                    self.seconds += seconds
                    self._track_in_redis()
                return extended
            # Redis is away: this process's own count decides, with every reservation it
            # holds in it (this one and its other in-Redis ones at their size now).
            with _local_lock:
                if self.settled:  # settled while Redis was asked: nothing more to hold
                    return False
                holds = _local[self.key]
                tracked = self._tracked_in_redis(holds)
                if used + holds.seconds(read_at_ms) >= limit:
                    return False
                self.seconds += seconds
                tracked.seconds = self.seconds
                # Redis learns it when an extension next reaches it (the whole size is sent).
                tracked.unseen_growth += seconds
            return True
        with _local_lock:
            holds = _local[self.key]
            if used + holds.seconds(read_at_ms) >= limit:
                return False
            self.seconds += seconds
            entry = holds.reserved.get(self.record_id)
            if entry is None:  # expired meanwhile: it counts again from now
                holds.reserved[self.record_id] = _Entry(self.seconds, _now_ms() + RUNNING_TTL_MS)
            else:
                entry.seconds = self.seconds
                entry.expires_at_ms = max(entry.expires_at_ms, _now_ms() + RUNNING_TTL_MS)
        return True

    def _track_in_redis(self) -> None:
        """Redis has just taken this reservation's whole size: record it, for this
        process's own count should Redis go away."""
        with _local_lock:
            if not self.settled:  # a settled one has left the count: never add it back
                self._tracked_in_redis(_local[self.key]).unseen_growth = 0.0

    def _tracked_in_redis(self, holds: _LocalHolds) -> _InRedis:
        """Its entry in `holds` (made anew if it expired there), at its size now and
        expiring as its Redis entry does. Call it holding `_local_lock`."""
        expires_at_ms = _now_ms() + RUNNING_TTL_MS
        tracked = holds.in_redis.get(self.record_id)
        if tracked is None:
            tracked = holds.in_redis[self.record_id] = _InRedis(self.seconds, expires_at_ms)
        tracked.seconds = self.seconds
        tracked.expires_at_ms = max(tracked.expires_at_ms, expires_at_ms)
        return tracked

    async def _extend_in_redis(
        self, seconds: float, limit: float, used: float, read_at_ms: float, after: asyncio.Task[Any] | None
    ) -> bool | None:
        """Whether Redis extended the entry; None when Redis could not be asked."""
        if after is not None and not after.done():
            await asyncio.wait([after])
        try:
            extended = await async_redis().eval(
                _EXTEND_LUA,
                1,
                _redis_key(self.key),
                limit,
                used,
                int(read_at_ms),
                self.record_id.hex,
                self.seconds + seconds,
            )
        except RedisUnavailable:
            return None
        except REDIS_ERRORS as exc:
            breaker.trip(exc)
            return None
        return bool(extended)

    def settle(self, actual_seconds: float) -> None:
        """The request ended having sent `actual_seconds` (0 for cache hits and refusals):
        held until a reading of the counter includes its row. Call it before the request's
        usage record is spooled, so that the writer's mark always comes after it."""
        if self.settled:
            return
        self.settled = True
        kept = actual_seconds if actual_seconds > 0 and settings.USAGE_RECORDS else 0.0
        if self.in_redis:
            # Redis holds it from here on (or it expires there): it leaves this process's count.
            with _local_lock:
                if (holds := _local.get(self.key)) is not None:
                    holds.in_redis.pop(self.record_id, None)
                    _forget_if_empty(self.key)
            self._send(kept)
            return
        if self.clear_in_redis:
            self._send(0.0)
        with _local_lock:
            holds = _local[self.key]
            holds.reserved.pop(self.record_id, None)
            if kept:
                holds.settled[self.record_id] = _Entry(kept, _now_ms() + UNWRITTEN_TTL_MS)
            _forget_if_empty(self.key)

    def _send(self, seconds: float) -> None:
        """Send a change to Redis without making the caller wait: on the event loop as a
        task after this reservation's previous change; from a thread without a loop (the
        process exiting) directly."""
        args = (_SETTLE_LUA, 1, _redis_key(self.key), self.record_id.hex, seconds)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            try:
                sync_redis().eval(*args)
            except (RedisUnavailable, *REDIS_ERRORS):
                pass  # the entry expires on its own
            return
        task = loop.create_task(_aeval(args, after=self._last_change))
        self._last_change = task
        _pending.add(task)
        task.add_done_callback(_pending.discard)


async def _aeval(args: tuple[Any, ...], *, after: asyncio.Task[Any] | None) -> None:
    if after is not None and not after.done():
        await asyncio.wait([after])
    try:
        await async_redis().eval(*args)
    except RedisUnavailable:
        pass  # the entry expires on its own
    except REDIS_ERRORS as exc:
        breaker.trip(exc)


async def holds_reserve(
    key: HoldKey, *, limit: float, used: float, read_at_ms: float, record_id: uuid.UUID, estimate: float
) -> QuotaReservation | None:
    """Reserve `estimate` unless `used` plus everything held reaches `limit` (then None)."""
    # This process's own settlements first, so that it never counts what it has released.
    loop = asyncio.get_running_loop()
    if ours := [task for task in _pending if task.get_loop() is loop]:
        await asyncio.wait(ours, timeout=settings.REDIS_TIMEOUT_SECONDS)
    unseen = _unseen_by_redis(key, read_at_ms)
    maybe_in_redis = False
    try:
        reserved = await async_redis().eval(
            _RESERVE_LUA,
            1,
            _redis_key(key),
            limit,
            used + unseen,
            int(read_at_ms),
            record_id.hex,
            estimate,
        )
    except (RedisUnavailable, *REDIS_ERRORS) as exc:
        if not isinstance(exc, RedisUnavailable):
            breaker.trip(exc)
        # A timeout may come after the script ran: its entry is cleared when this settles.
        maybe_in_redis = isinstance(exc, TimeoutError | redis.TimeoutError)
    else:
        if not reserved:
            return None
        reservation = QuotaReservation(key, record_id, estimate, in_redis=True, limit=limit)
        reservation._track_in_redis()
        return reservation
    # Redis is away: this process's own count decides, its in-Redis reservations in it.
    with _local_lock:
        holds = _local[key]
        if used + holds.seconds(read_at_ms) >= limit:
            return None
        holds.reserved[record_id] = _Entry(estimate, _now_ms() + RUNNING_TTL_MS)
    return QuotaReservation(
        key, record_id, estimate, in_redis=False, limit=limit, clear_in_redis=maybe_in_redis
    )


# Marks Redis has not taken yet (it was away): sent again with the next batch, so that a
# short outage does not leave finished requests counted for the whole UNWRITTEN_TTL_MS.
_unmarked: dict[HoldKey, set[uuid.UUID]] = defaultdict(set)
MAX_UNMARKED = 100_000


def holds_rows_written(records: Iterable[tuple[uuid.UUID, HoldKey]]) -> None:
    """The usage writer stored these records' rows (and their audio in the counter). Runs
    on the writer's thread only, after its transaction committed: it never raises, since
    the rows are stored whatever happens here (an unmarked hold only expires later)."""
    now = _now_ms()
    with _local_lock:
        for record_id, key in records:
            _unmarked[key].add(record_id)
            if key in _local and (entry := _local[key].settled.get(record_id)) is not None:
                entry.written_at_ms = now
    try:
        client = sync_redis()
        for key in list(_unmarked):
            record_ids = [record_id.hex for record_id in _unmarked[key]]
            client.eval(_WRITTEN_LUA, 1, _redis_key(key), int(_written_keep_ms()), *record_ids)
            del _unmarked[key]
    except Exception as exc:
        if not isinstance(exc, RedisUnavailable):
            logger.warning("Could not mark written usage rows in Redis (%s); will retry.", exc)
        # Kept for the next batch; bounded, since every entry also expires in Redis.
        if sum(len(ids) for ids in _unmarked.values()) > MAX_UNMARKED:
            _unmarked.clear()
