"""Each owner's engine slots across the fleet, in Redis: so that a tenant's fair share
(ENGINE_FLEET_JOBS_PER_TENANT) binds across every process, and a tenant holding many
streams on one process waits behind one holding few on another.

One hash per owner, a field per process: "count;expires_at_ms". A process writes its own
field when its count changes (one publisher task, so writes never land out of order) and
again every FLEET_SHARE_SECONDS / 3 while the count is above zero; a process that died
stops writing, and its field expires on Redis's clock. A reader sums the live fields of the
other processes.

While Redis is away a read answers 0: each engine then holds the owner to its own share
alone (ENGINE_MAX_JOBS_PER_TENANT), as the other limits fall back to per-process rules.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from contextlib import suppress

from core.redis import REDIS_ERRORS, RedisUnavailable, async_redis, breaker

logger = logging.getLogger(__name__)

# How long a process's count outlives its last write (it rewrites a third of this apart).
FLEET_SHARE_SECONDS = 15.0

_TIME = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
"""
# KEYS: the owner's hash. ARGV: this process, its count, ttl_ms.
_WRITE_LUA = (
    _TIME
    + """
if tonumber(ARGV[2]) > 0 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ';' .. (now + tonumber(ARGV[3])))
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) + 1000)
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"""
)
# KEYS: the owner's hash. ARGV: this process. Returns the other processes' live counts summed.
_READ_LUA = (
    _TIME
    + """
local total = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local count, expires = string.match(fields[i + 1], '^(%d+);(%d+)$')
  if count == nil or tonumber(expires) < now then
    redis.call('HDEL', KEYS[1], fields[i])
  elseif fields[i] ~= ARGV[1] then
    total = total + tonumber(count)
  end
end
return total
"""
)


class RedisFleetShare:
    """engines.capacity.FleetShare, kept in Redis under `key_prefix`."""

    def __init__(self, key_prefix: str, *, ttl_s: float = FLEET_SHARE_SECONDS) -> None:
        self.key_prefix = key_prefix
        self.process_id = uuid.uuid4().hex
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}  # this process's, per owner (0s until written)
        self._dirty: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._publisher: asyncio.Task[None] | None = None

    def _key(self, owner: str) -> str:
        return f"{self.key_prefix}:engine_share:{owner}"

    async def held_elsewhere(self, owner: str) -> int:
        self._ensure_publisher()
        try:
            total = await async_redis().eval(_READ_LUA, 1, self._key(owner), self.process_id)
        except RedisUnavailable:
            return 0
        except REDIS_ERRORS as exc:
            breaker.trip(exc)
            return 0
        return int(total)

    def held_here(self, owner: str, count: int) -> None:
        with self._lock:
            self._counts[owner] = count
            self._dirty.add(owner)
            loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with suppress(RuntimeError):  # its loop has closed: the next request starts another
                loop.call_soon_threadsafe(wake.set)

    def counts(self) -> dict[str, int]:
        """This process's counts (those above zero), as published."""
        with self._lock:
            return {owner: count for owner, count in self._counts.items() if count > 0}

    def _ensure_publisher(self) -> None:
        """One publisher, on the loop that serves requests (started by the first one; again
        if that loop has gone, as in tests that run several)."""
        loop = asyncio.get_running_loop()
        if self._publisher is not None and not self._publisher.done() and self._loop is loop:
            return
        if self._publisher is not None and self._loop is not None and not self._publisher.done():
            # Still running on a loop that is not this one: stop it, so one writer remains.
            with suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._publisher.cancel)
        wake = asyncio.Event()
        with self._lock:
            self._loop, self._wake = loop, wake
            self._dirty.update(self._counts)  # all of them: the last publisher may have died
        wake.set()
        self._publisher = loop.create_task(self._publish_forever(wake))

    async def _publish_forever(self, wake: asyncio.Event) -> None:
        while True:
            with suppress(TimeoutError):
                async with asyncio.timeout(self.ttl_s / 3):
                    await wake.wait()
            wake.clear()
            with self._lock:
                # A heartbeat rewrites every count above zero; otherwise only what changed.
                owners = self._dirty | {owner for owner, count in self._counts.items() if count > 0}
                self._dirty.clear()
                batch = {owner: self._counts.get(owner, 0) for owner in owners}
                for owner, count in batch.items():
                    if count == 0:
                        del self._counts[owner]  # written as gone below: nothing to keep
            failed = await self._write(batch)
            if failed:
                with self._lock:  # written again at the next wake or heartbeat
                    for owner in failed:
                        self._counts.setdefault(owner, batch[owner])
                        self._dirty.add(owner)

    async def _write(self, batch: dict[str, int]) -> list[str]:
        """Write each owner's count; the owners whose write failed."""
        ttl_ms = int(self.ttl_s * 1000)
        for index, (owner, count) in enumerate(batch.items()):
            try:
                await async_redis().eval(_WRITE_LUA, 1, self._key(owner), self.process_id, count, ttl_ms)
            except (RedisUnavailable, *REDIS_ERRORS) as exc:
                if not isinstance(exc, RedisUnavailable):
                    breaker.trip(exc)
                return list(batch)[index:]
        return []
