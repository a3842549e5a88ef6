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
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from django.conf import settings

logger = logging.getLogger(__name__)

BREAKER_SECONDS = 5.0
# Connections the async client opens at start-up: a cold burst of requests then finds
# them ready instead of all connecting at once on a busy event loop.
WARM_CONNECTIONS = 8


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


def _client_options() -> dict[str, Any]:
    return {
        "socket_timeout": settings.REDIS_TIMEOUT_SECONDS,
        "socket_connect_timeout": settings.REDIS_TIMEOUT_SECONDS,
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
                _sync_client = redis.Redis.from_url(settings.REDIS_URL, **_client_options())
    return _sync_client


def async_redis() -> aioredis.Redis:
    """The async client of the running event loop (redis-py's asyncio clients are loop-bound)."""
    if not redis_configured() or not breaker.allows():
        raise RedisUnavailable("Redis is not configured or recently failed")
    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        client = aioredis.Redis.from_url(settings.REDIS_URL, **_client_options())
        _async_clients[loop] = client
    return client


# Everything a Redis call can raise: connection loss and timeouts, and error replies too
# (READONLY after a failover, OOM at maxmemory, a failing script). Callers degrade to their
# in-process fallbacks on any of them; none may become a 500.
REDIS_ERRORS = (redis.RedisError, OSError)


async def redis_warm_up(scripts: Sequence[str] = ()) -> None:
    """At start-up, on the server's event loop: open the async client's connections and
    load `scripts`, so that the first burst of requests pays for neither. A failure only
    logs: the fallbacks cover an outage, and the breaker is left alone."""
    if not redis_configured():
        return
    try:
        client = async_redis()
        await asyncio.gather(*(client.ping() for _ in range(WARM_CONNECTIONS)))
        for script in scripts:
            await client.script_load(script)
        sync_client = sync_redis()
        await asyncio.to_thread(sync_client.ping)
    except (RedisUnavailable, *REDIS_ERRORS) as exc:
        logger.warning("Redis did not answer the start-up warm-up (%s); fallbacks cover it.", exc)
        return
    logger.info("Redis connections warmed up.")
