"""GET /v1/ready: may this process take traffic? (GET /v1/health only says it is alive.)

Two kinds of check, because a gateway that routes on readiness must not take the whole
fleet out for what every pod shares:

- what this pod cannot serve without: the database, its engine loaded and warmed up
  (one real synthesis), a usage journal it can write (without one it refuses synthesis:
  usage_unavailable), and not draining for shutdown. Any of these failing is a 503,
  naming it, so that the load balancer routes around the pod;
- shared dependencies whose loss degrades every pod alike and which the service rides
  out: Redis (limits fall back to per-process shares, streams poll the database) and the
  audio storage (only signed links need it). Failing, they are listed under `degraded`
  with a 200: taking pods out would not help, and would stop the speech that still works.

Each check answers within READY_TIMEOUT_SECONDS. docs/deploy.md says which probe to use for what.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.files.storage import default_storage
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.http.response import HttpResponseBase

from api.errors import error_response
from callwaiting_tts.lifecycle import lifecycle
from core.redis import redis_configured
from engines import loaded_engine
from usage.recorder import usage_spool

READY_TIMEOUT_SECONDS = 2.0
# Failing, these degrade every pod alike: reported, but the pod stays ready.
SHARED_DEPENDENCIES = frozenset({"redis", "storage"})


def _database_answers() -> None:
    # A worker thread of its own (not Django's request thread), so it closes what it opened.
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        connection.close()


def _storage_answers() -> None:
    default_storage.exists("readiness-probe")  # a HEAD on S3; a stat on local disk


async def _redis_answers() -> None:
    import redis.asyncio as aioredis

    # A client of its own: the shared one's circuit breaker would hide a recovery for 5 s.
    client = aioredis.Redis.from_url(settings.REDIS_URL, socket_timeout=READY_TIMEOUT_SECONDS)
    try:
        await client.ping()
    finally:
        await client.aclose()


async def _check(probe: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(probe(), READY_TIMEOUT_SECONDS)
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 1)}


async def ready(request: HttpRequest) -> HttpResponseBase:
    if request.method != "GET":  # HEAD arrives as GET (middleware.MethodMiddleware)
        return error_response(request, 405, "method_not_allowed", "Use GET.", headers={"Allow": "GET"})
    checks: dict[str, dict[str, Any]] = {
        "database": await _check(sync_to_async(_database_answers, thread_sensitive=False)),
        "storage": await _check(sync_to_async(_storage_answers, thread_sensitive=False)),
    }
    if redis_configured():
        checks["redis"] = await _check(_redis_answers)
    engine = loaded_engine()
    checks["engine"] = (
        {"ok": True, "name": engine.name, "warm_up_s": lifecycle.warm_up_seconds}
        if engine is not None and engine.loaded and lifecycle.warm
        else {"ok": False, "error": "the engine is not loaded and warmed up yet"}
    )
    if settings.USAGE_RECORDS:
        spool = usage_spool()  # its last write attempt, probed a few times a second
        checks["usage_journal"] = (
            {"ok": True}
            if spool.writable
            else {"ok": False, "error": f"the usage journal cannot be written: {spool.failure}"}
        )
    if lifecycle.draining:
        checks["shutdown"] = {"ok": False, "error": "draining for shutdown"}
    failing = sorted(name for name, result in checks.items() if not result["ok"])
    failed = [name for name in failing if name not in SHARED_DEPENDENCIES]
    degraded = [name for name in failing if name in SHARED_DEPENDENCIES]
    status = "unavailable" if failed else "degraded" if degraded else "ready"
    body = {"status": status, "failed": failed, "degraded": degraded, "checks": checks}
    response = JsonResponse(body, status=503 if failed else 200)
    response["Cache-Control"] = "no-store"
    return response
