"""The process's Redis clients (one sync, one async per event loop), and its outage breaker.

Redis is optional (nothing configured: everything that uses it falls back to
in-process state) and may go away at any time; callers catch `RedisUnavailable`
and degrade instead of failing the request. After a failure the breaker keeps
Redis off for a few seconds, so an outage costs one timeout, not one per request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from typing import Any

import redis
import redis.asyncio as aioredis
from django.conf import settings

logger = logging.getLogger(__name__)

# Loopback Redis answers in well under a millisecond; waiting longer than this
# only turns an outage into slow requests.
SOCKET_TIMEOUT_S = 0.25
BREAKER_SECONDS = 5.0


class RedisUnavailable(Exception):
    pass


class _Breaker:
    def __init__(self) -> None:
        self.open_until = 0.0
        self.failures = 0  # a counter for health and metrics

    def allows(self) -> bool:
        return time.monotonic() >= self.open_until

    def trip(self, exc: BaseException) -> None:
        self.failures += 1
        if self.allows():
            logger.warning(
                "Redis unavailable (%s); using in-process fallbacks for %.0f s", exc, BREAKER_SECONDS
            )
        self.open_until = time.monotonic() + BREAKER_SECONDS


breaker = _Breaker()
_sync_client: redis.Redis | None = None
_sync_lock = threading.Lock()
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = (
    weakref.WeakKeyDictionary()
)
_CLIENT_OPTIONS: dict[str, Any] = {
    "socket_timeout": SOCKET_TIMEOUT_S,
    "socket_connect_timeout": SOCKET_TIMEOUT_S,
    "health_check_interval": 30,
}


def redis_configured() -> bool:
    return bool(settings.REDIS_URL)


def sync_redis() -> redis.Redis:
    global _sync_client
    if not redis_configured() or not breaker.allows():
        raise RedisUnavailable("Redis is not configured or recently failed")
    if _sync_client is None:
        with _sync_lock:
            if _sync_client is None:
                _sync_client = redis.Redis.from_url(settings.REDIS_URL, **_CLIENT_OPTIONS)
    return _sync_client


def async_redis() -> aioredis.Redis:
    """The async client of the running event loop (redis-py's asyncio clients are loop-bound)."""
    if not redis_configured() or not breaker.allows():
        raise RedisUnavailable("Redis is not configured or recently failed")
    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        client = aioredis.Redis.from_url(settings.REDIS_URL, **_CLIENT_OPTIONS)
        _async_clients[loop] = client
    return client


REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
