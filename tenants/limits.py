"""Per-tenant request rate limits: GCRA over a minute and an hour window, atomic in Redis.

GCRA (the generic cell rate algorithm) is a token bucket kept as one number
per window, the "theoretical arrival time". A tenant with limit N per period
may send N requests at once (the burst), then one every period/N. Both windows
are checked and updated by one Lua script, so concurrent requests in any
number of processes can never pass the limit together.

If Redis is down (or not configured) the same algorithm runs in process memory, with
two rules that keep it from being more generous than the shared limit: each process
takes only its share of a limit (limit / SERVER_PROCESSES), and it starts from the
budget Redis last reported for the tenant, not from a full one. A log line and the
health counter say when it is in use. A limit of 0 means "no limit" for that window.

After a Redis fault (an empty restart, or a pause that sent requests to the fallback)
the limits stay tight, by two seeds sent with every script call:
- a floor: the latest window state this process saw in Redis, so a Redis that came back
  empty resumes from it (state only grows, so the floor never changes a healthy Redis);
- a debt: what the fallback spent while Redis was away, counted as full-limit requests,
  added once to Redis's state on recovery (written even if that request is refused).
A window's sum of Redis and fallback spend then never passes its limit.

Stream leases follow the same idea: a renewal re-adds a lease Redis lost, a lease taken
in the fallback is registered in Redis as soon as it answers again, and an acquisition
first re-adds every lease this process holds, so its own streams always count. During an
outage the fallback counts every stream this process holds, Redis leases included.
Another process's leases come back at its next renewal (within STREAM_LEASE_SECONDS / 3).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.http import HttpRequest
from redis.exceptions import NoScriptError
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from core.errors import ServiceError
from core.redis import REDIS_ERRORS, RedisUnavailable, async_redis, breaker, redis_warm_up, sync_redis
from tenants.models import Tenant

WINDOWS = (("minute", 60_000), ("hour", 3_600_000))

# KEYS: one per window. ARGV per window: limit, period_ms, floor_ms (the state to resume
# from if Redis lost it), debt_ms (the fallback's spend, added once).
# Returns {allowed (0/1), retry_after_ms, remaining_1, reset_ms_1, remaining_2, reset_ms_2, ...}
_GCRA_LUA = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local allowed = 1
local retry_after = 0
local new_tats = {}
local out = {}
local seeded = {}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[4 * i - 3])
  local period = tonumber(ARGV[4 * i - 2])
  local floor = tonumber(ARGV[4 * i - 1])
  local debt = tonumber(ARGV[4 * i])
  local interval = period / limit
  local stored = tonumber(redis.call('GET', KEYS[i])) or now
  local tat = math.max(stored, floor, now) + debt
  seeded[i] = tat > math.max(stored, now)
  local new_tat = tat + interval
  local allow_at = new_tat - period
  if now < allow_at then
    allowed = 0
    retry_after = math.max(retry_after, allow_at - now)
  end
  new_tats[i] = new_tat
  out[2 * i - 1] = tat
  out[2 * i] = new_tat
end
for i = 1, #KEYS do
  local tat = tonumber(out[2 * i - 1])
  if allowed == 1 then tat = new_tats[i] end
  if allowed == 1 or seeded[i] then
    redis.call('SET', KEYS[i], tostring(tat), 'PX', math.ceil(tat - now) + 1000)
  end
end
local result = {allowed, math.ceil(retry_after), now}
for i = 1, #out do result[#result + 1] = tostring(out[i]) end
return result
"""
_GCRA_SHA = hashlib.sha1(_GCRA_LUA.encode(), usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int  # of the window with the least budget left
    window_s: int
    remaining: int
    reset_s: float  # until that window's budget is whole again
    retry_after_s: float  # 0 when allowed

    def refusal(self) -> ServiceError | None:
        """The 429 for a request over the budget; None when it is allowed."""
        if self.allowed:
            return None
        return ServiceError(
            429,
            "rate_limited",
            f"Over the limit of {self.limit} requests per {self.window_s} s; "
            f"retry in {self.headers()['Retry-After']} s.",
            headers=self.headers(),
        )

    def headers(self) -> dict[str, str]:
        """The common X-RateLimit-* set (see README), plus Retry-After on a refusal."""
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(self.reset_s)),
            "X-RateLimit-Policy": f"{self.limit};w={self.window_s}",
        }
        if not self.allowed:
            # Rounded up: a client that waits this long is never refused for this window again.
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return headers


def _active_windows(tenant: Tenant) -> list[tuple[str, int, int]]:
    limits = {"minute": tenant.rate_limit_minute, "hour": tenant.rate_limit_hour}
    return [(name, limits[name], period) for name, period in WINDOWS if limits[name] > 0]


def _decide(
    windows: list[tuple[str, int, int]],
    allowed: bool,
    retry_ms: float,
    now: float,
    tats: list[tuple[float, float]],
) -> RateDecision:
    """Turn per-window (tat before, tat after) into the decision for the tightest window."""
    best: RateDecision | None = None
    for (_name, limit, period), (tat, new_tat) in zip(windows, tats, strict=True):
        interval = period / limit
        used_until = new_tat if allowed else tat
        remaining = max(0, math.floor((period - (used_until - now)) / interval))
        decision = RateDecision(
            allowed=allowed,
            limit=limit,
            window_s=period // 1000,
            remaining=remaining,
            reset_s=max(0.0, used_until - now) / 1000,
            retry_after_s=retry_ms / 1000,
        )
        if best is None or decision.remaining < best.remaining:
            best = decision
    assert best is not None
    return best


class LocalGcra:
    """The same algorithm in process memory, for when Redis is unavailable.
    `clock` gives seconds (wall time by default; tests pass a fake one)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._tats: dict[str, float] = {}
        # Redis's own state as last seen (the floor), apart from the fallback's spend in _tats.
        self._observed: dict[str, float] = {}
        # What the fallback spent, as a GCRA state at the full limit's interval: its
        # remaining part is the debt the next script call adds to Redis.
        self._spent: dict[str, float] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def seeds(self, keys: list[str], windows: list[tuple[str, int, int]]) -> list[int]:
        """The script's floor and debt per window; the debt is taken (see `repay`)."""
        now = self._clock() * 1000
        out: list[int] = []
        with self._lock:
            for key in keys:
                debt = max(0.0, self._spent.pop(key, 0.0) - now)
                out += [math.floor(self._observed.get(key, 0.0)), math.ceil(debt)]
        return out

    def repay(self, keys: list[str], debts: list[int]) -> None:
        """A script call that failed did not add its debts: keep them for the next one."""
        now = self._clock() * 1000
        with self._lock:
            for key, debt in zip(keys, debts, strict=True):
                if debt > 0:
                    self._spent[key] = max(self._spent.get(key, now), now) + debt

    def observe(self, keys: list[str], tats: list[float]) -> None:
        """What Redis last said of these keys: a later fallback starts from it."""
        with self._lock:
            for key, tat in zip(keys, tats, strict=True):
                if tat > self._tats.get(key, 0.0):
                    self._tats[key] = tat
                if tat > self._observed.get(key, 0.0):
                    self._observed[key] = tat

    def check(
        self,
        keys: list[str],
        windows: list[tuple[str, int, int]],
        full_windows: list[tuple[str, int, int]] | None = None,
    ) -> RateDecision:
        """Spend one request against `windows` (this process's share); the spend is kept
        as debt at `full_windows`' rate (the shared limits), for Redis on recovery."""
        now = self._clock() * 1000
        with self._lock:
            allowed, retry_ms, tats = True, 0.0, []
            for key, (_name, limit, period) in zip(keys, windows, strict=True):
                tat = max(self._tats.get(key, now), now)
                new_tat = tat + period / limit
                allow_at = new_tat - period
                if now < allow_at:
                    allowed = False
                    retry_ms = max(retry_ms, allow_at - now)
                tats.append((tat, new_tat))
            if allowed:
                for key, (_tat, new_tat) in zip(keys, tats, strict=True):
                    self._tats[key] = new_tat
                for key, (_name, limit, period) in zip(keys, full_windows or windows, strict=True):
                    self._spent[key] = max(self._spent.get(key, now), now) + period / limit
        return _decide(windows, allowed, math.ceil(retry_ms), now, tats)


local_limiter = LocalGcra()


@dataclass(frozen=True)
class _Check:
    """One tenant's windows, as the Lua script and the local fallback take them."""

    windows: list[tuple[str, int, int]]
    keys: list[str]

    @classmethod
    def for_tenant(cls, tenant: Tenant) -> _Check | None:
        windows = _active_windows(tenant)
        if not settings.RATE_LIMITS_ENABLED or not windows:
            return None
        prefix = f"{settings.REDIS_KEY_PREFIX}:ratelimit:{tenant.id}"
        keys = [f"{prefix}:{name}" for name, _limit, _period in windows]
        return cls(windows, keys)

    def from_script(self, raw: list[bytes | int]) -> RateDecision:
        allowed, retry_ms, now = int(raw[0]), int(raw[1]), float(raw[2])
        values = [float(value) for value in raw[3:]]
        tats = [(values[2 * i], values[2 * i + 1]) for i in range(len(self.windows))]
        local_limiter.observe(self.keys, [new_tat if allowed else tat for tat, new_tat in tats])
        return _decide(self.windows, bool(allowed), retry_ms, now, tats)

    def locally(self, exc: Exception) -> RateDecision:
        if not isinstance(exc, RedisUnavailable):
            breaker.trip(exc)
        return local_limiter.check(self.keys, _process_share(self.windows), self.windows)

    def script_args(self) -> list[int]:
        seeds = local_limiter.seeds(self.keys, self.windows)
        return [
            value
            for i, (_name, limit, period) in enumerate(self.windows)
            for value in (limit, period, seeds[2 * i], seeds[2 * i + 1])
        ]


def _process_share(windows: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """This process's share of each window's limit, for the in-process fallback."""
    processes = settings.SERVER_PROCESSES
    return [(name, max(1, limit // processes), period) for name, limit, period in windows]


async def limits_warm_up() -> None:
    """At start-up: Redis connections open and the rate-limit script loaded."""
    await redis_warm_up([_GCRA_LUA])


def rate_limit_check(tenant: Tenant) -> RateDecision | None:
    """Spend one request of the tenant's budget; None when limits are off."""
    check = _Check.for_tenant(tenant)
    if check is None:
        return None
    args = check.script_args()
    try:
        client = sync_redis()
        try:
            raw = client.evalsha(_GCRA_SHA, len(check.keys), *check.keys, *args)
        except NoScriptError:
            raw = client.eval(_GCRA_LUA, len(check.keys), *check.keys, *args)
    except (RedisUnavailable, *REDIS_ERRORS) as exc:
        local_limiter.repay(check.keys, args[3::4])
        return check.locally(exc)
    return check.from_script(raw)


async def arate_limit_check(tenant: Tenant) -> RateDecision | None:
    """The same, for async views."""
    check = _Check.for_tenant(tenant)
    if check is None:
        return None
    args = check.script_args()
    try:
        client = async_redis()
        try:
            raw = await client.evalsha(_GCRA_SHA, len(check.keys), *check.keys, *args)
        except NoScriptError:
            raw = await client.eval(_GCRA_LUA, len(check.keys), *check.keys, *args)
    except (RedisUnavailable, *REDIS_ERRORS) as exc:
        local_limiter.repay(check.keys, args[3::4])
        return check.locally(exc)
    return check.from_script(raw)


# --- Concurrent streams -------------------------------------------------------------
#
# Each open stream holds a lease: a member of the tenant's sorted set, scored by
# its expiry. A live stream renews its lease; a stream whose process died simply
# stops renewing, and its lease drops out after STREAM_LEASE_SECONDS.

# ARGV: cap, ttl_ms, the new lease, then the leases this process already holds (re-added
# first, so a Redis that lost them still counts them).
_LEASE_ACQUIRE_LUA = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 4, #ARGV do
  redis.call('ZADD', KEYS[1], 'GT', now + ttl, ARGV[i])
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  if #ARGV >= 4 then redis.call('PEXPIRE', KEYS[1], ttl + 1000) end
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
redis.call('PEXPIRE', KEYS[1], ttl + 1000)
return 1
"""
# Not `XX`: a renewal re-adds a lease Redis lost (an empty restart), and registers one
# taken in the fallback, so the count is right again.
_LEASE_RENEW_LUA = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) + 1000)
return 1
"""
# Every capped lease this process holds, in Redis or not, per tenant.
_held_streams: dict[uuid.UUID, set[str]] = {}


def _streams_key(tenant: Tenant) -> str:
    return f"{settings.REDIS_KEY_PREFIX}:streams:{tenant.id}"


class StreamLease:
    """One open stream of a tenant; `release` it however the stream ends."""

    def __init__(self, tenant: Tenant, lease_id: str, *, in_redis: bool, capped: bool = True) -> None:
        self.tenant = tenant
        self.lease_id = lease_id
        self.in_redis = in_redis
        self.capped = capped
        self._renewer: asyncio.Task[None] | None = None
        self._released = False

    @property
    def key(self) -> str:
        return _streams_key(self.tenant)

    def keep_alive(self) -> None:
        """Renew the lease while the stream lives; a fallback lease is registered in Redis
        at the first renewal Redis answers."""
        if self.capped and self._renewer is None and not self._released:
            self._renewer = asyncio.create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        ttl_ms = int(settings.STREAM_LEASE_SECONDS * 1000)
        while True:
            await asyncio.sleep(settings.STREAM_LEASE_SECONDS / 3)
            try:
                await async_redis().eval(_LEASE_RENEW_LUA, 1, self.key, ttl_ms, self.lease_id)
            except RedisUnavailable:
                continue
            except REDIS_ERRORS as exc:
                breaker.trip(exc)
                continue
            self.in_redis = True

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._renewer is not None:
            # Wait the renewer out: a renewal landing after the ZREM would re-add the lease.
            self._renewer.cancel()
            await asyncio.wait([self._renewer], timeout=1.0)
        _held_streams.get(self.tenant.id, set()).discard(self.lease_id)
        if not self.in_redis:
            return
        try:
            await async_redis().zrem(self.key, self.lease_id)
        except RedisUnavailable:
            pass  # the lease expires by itself
        except REDIS_ERRORS as exc:
            breaker.trip(exc)


async def stream_lease_acquire(tenant: Tenant) -> StreamLease:
    """A lease on one of the tenant's concurrent streams, or 429 stream_limit. 0 means no cap."""
    cap = tenant.max_concurrent_streams
    lease_id = uuid.uuid4().hex
    refused = ServiceError(
        429,
        "stream_limit",
        f"This tenant already has {cap} open stream(s), its limit; close one first.",
        headers={"Retry-After": "1"},
    )
    if cap == 0:
        return StreamLease(tenant, lease_id, in_redis=False, capped=False)
    held = _held_streams.setdefault(tenant.id, set())
    try:
        client = async_redis()
        acquired = await client.eval(
            _LEASE_ACQUIRE_LUA,
            1,
            _streams_key(tenant),
            cap,
            int(settings.STREAM_LEASE_SECONDS * 1000),
            lease_id,
            *sorted(held),
        )
    except (RedisUnavailable, *REDIS_ERRORS) as exc:
        if not isinstance(exc, RedisUnavailable):
            breaker.trip(exc)
        # This process's share, counting every stream it holds, in Redis or not.
        if len(held) >= max(1, cap // settings.SERVER_PROCESSES):
            raise refused from None
        held.add(lease_id)
        return StreamLease(tenant, lease_id, in_redis=False)
    if not acquired:
        raise refused
    held.add(lease_id)
    return StreamLease(tenant, lease_id, in_redis=True)


# --- Throttling: its own step, after authentication --------------------------------------


def _throttle(request: HttpRequest, decision: RateDecision | None) -> None:
    """Remember the budget for the response headers (the middleware adds them);
    refuse a request over it. A failed authentication never gets here: it spends nothing."""
    if decision is None:
        return
    request.rate_limit = decision  # type: ignore[attr-defined]
    if (refusal := decision.refusal()) is not None:
        raise refusal


async def athrottle_request(request: HttpRequest, tenant: Tenant) -> None:
    """Throttling for the plain async views (api.views.async_api_view)."""
    _throttle(request, await arate_limit_check(tenant))


class TenantRateThrottle(BaseThrottle):
    """Throttling for the DRF views (REST_FRAMEWORK's DEFAULT_THROTTLE_CLASSES): DRF runs
    it after authentication and permissions, so only authenticated tenants reach it."""

    def allow_request(self, request: Request, view: object) -> bool:
        if isinstance(request.user, Tenant):
            _throttle(request._request, rate_limit_check(request.user))
        return True
