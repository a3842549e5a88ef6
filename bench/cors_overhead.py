"""What CORS and the Origin rule (#21) cost the API's hot path, measured in process.

    .venv/bin/python bench/cors_overhead.py                      # this checkout: without / with CORS
    .venv/bin/python bench/cors_overhead.py --root /work/main     # another checkout, as it is

Loads the Django project found at --root (SQLite in a temporary folder, the machine's Redis
for rate limits, API keys cached as in production) and calls the API's ASGI handler (the
lean /v1 middleware stack) directly, with no socket between. Sequential requests:

- GET /v1/bench/bare, no Origin: a view that does nothing, so the middleware is all there is;
- POST /v1/synthesize with a key and a body refused after authentication and throttling
  (`{"text": ""}`: 400 empty_text): everything on the hot path but the engine runs (request
  id, CORS, method policy, key from the cache, route and Origin rule, rate limit in Redis,
  usage row);
- the same from a browser, with an allowed Origin (CORS headers added).

Then (this checkout only) what the new steps cost on their own, in a tight loop that the
machine's load hardly moves: TenantCorsMiddleware around a view that returns at once, against
no middleware, for a request without Origin and one from an allowed Origin; and the route and
Origin rule (`principal_authorize`) for a key without Origin, as every server-side request
meets it.

Where the checkout has TenantCorsMiddleware, two handlers are built in the one process, one
with the API middleware as configured and one without that middleware, and their rounds
alternate, so that a loaded machine slows both alike. Each round's figure is the CPU time
per request (process time over the round / requests), the steadiest number on a shared
machine; the table gives the median over rounds, and the wall-time p50 for reference.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

CORS_MIDDLEWARE = "callwaiting_tts.middleware.TenantCorsMiddleware"
ORIGIN = "https://app.example.com"


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000"), *headers],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }


async def call(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    disconnected = asyncio.Event()
    status = 0

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])

    await app(_scope(method, path, headers), receive, send)
    disconnected.set()
    return status


Case = tuple[str, str, str, list[tuple[bytes, bytes]], bytes, int]


async def one_round(app: Any, case: Case, requests: int) -> tuple[float, float]:
    """(CPU us per request, wall p50 us) over `requests` sequential requests."""
    _label, method, path, headers, body, expect = case
    walls = []
    cpu_started = time.process_time()
    for _ in range(requests):
        started = time.perf_counter()
        status = await call(app, method, path, headers, body)
        walls.append(time.perf_counter() - started)
        assert status == expect, (path, status)
    cpu = (time.process_time() - cpu_started) / requests
    return cpu * 1e6, statistics.median(walls) * 1e6


def micro(requests: int) -> None:
    """The new steps alone, per call, in a tight loop (best of 5 runs)."""
    import timeit

    from django.http import HttpResponse
    from django.test import RequestFactory

    from callwaiting_tts.middleware import TenantCorsMiddleware
    from tenants.authentication import Principal, principal_authorize
    from tenants.models import ApiKey

    async def view(request: Any) -> HttpResponse:
        return HttpResponse(b"ok")  # a fresh answer each time, as a real view's

    cors = TenantCorsMiddleware(view)
    factory = RequestFactory()
    plain = factory.post("/v1/synthesize", HTTP_HOST="127.0.0.1:8000")
    browser = factory.post("/v1/synthesize", HTTP_HOST="127.0.0.1:8000", HTTP_ORIGIN=ORIGIN)
    api_key = ApiKey.objects.select_related("tenant").get()
    principal = Principal(tenant=api_key.tenant, api_key=api_key)
    loop = asyncio.new_event_loop()

    async def many(handler: Any, request: Any) -> None:
        for _ in range(requests):
            await handler(request)

    def per_call(run: Any) -> float:
        return min(timeit.repeat(run, number=1, repeat=5)) / requests * 1e6

    rows = [
        ("no middleware (the view alone)", lambda: loop.run_until_complete(many(view, plain))),
        ("TenantCorsMiddleware, no Origin", lambda: loop.run_until_complete(many(cors, plain))),
        ("TenantCorsMiddleware, allowed Origin", lambda: loop.run_until_complete(many(cors, browser))),
    ]
    print(f"\nThe new steps alone, best of 5 x {requests} calls, us per call (and over the view alone)")
    baseline = None
    for label, run in rows:
        cost = per_call(run)
        baseline = cost if baseline is None else baseline
        print(f"{label:<42} {cost:8.2f}  {cost - baseline:+8.2f}")

    def authorize() -> None:
        for _ in range(requests):
            principal_authorize(principal, route="synthesize", origin=None)

    print(f"{'principal_authorize, a key, no Origin':<42} {per_call(authorize):8.2f}")
    loop.close()


def _environment(workdir: Path, redis_url: str) -> None:
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "callwaiting_tts.settings",
            "CWT_ENV_FILE": "",
            "SECRET_KEY": "bench-only-" + "x" * 40,
            "DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite3'}",
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": f"cwt-bench-{uuid.uuid4().hex[:6]}",
            "MEDIA_ROOT": str(workdir / "media"),
            "USAGE_SPOOL_DIR": str(workdir / "spool"),
            "USAGE_FLUSH_SECONDS": "0",
            "TTS_ENGINE": "piper",
            "BENCHMARK_ROUTES": "1",
            "LOG_LEVEL": "ERROR",
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default=".", help="the project checkout to measure")
    parser.add_argument("--requests", type=int, default=500, help="per round")
    parser.add_argument("--rounds", type=int, default=10, help="per handler and case")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    os.chdir(root)
    sys.path.insert(0, str(root))
    _environment(Path(tempfile.mkdtemp(prefix="cwt-cors-bench-")), args.redis_url)

    import logging

    import django

    django.setup()
    logging.disable(logging.WARNING)  # a 400 per request would log a line each
    from django.conf import settings
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from tenants.services import tenant_create

    limits = {"rate_limit_minute": 10**8, "rate_limit_hour": 10**9, "quota_minutes": 0}
    tenant, issued = tenant_create(name="bench", **limits)  # type: ignore[arg-type]
    has_cors = CORS_MIDDLEWARE in settings.API_MIDDLEWARE
    if has_cors:
        type(tenant).objects.filter(pk=tenant.pk).update(allowed_origins=[ORIGIN])
    from callwaiting_tts.handlers import ApiASGIHandler

    handlers: dict[str, Any] = {}
    configured = list(settings.API_MIDDLEWARE)
    if has_cors:
        settings.API_MIDDLEWARE = [name for name in configured if name != CORS_MIDDLEWARE]
        handlers["without CORS"] = ApiASGIHandler()
        settings.API_MIDDLEWARE = configured
        handlers["with CORS"] = ApiASGIHandler()
    else:
        handlers["as it is"] = ApiASGIHandler()

    key = [(b"authorization", f"Bearer {issued.plaintext}".encode()), (b"content-type", b"application/json")]
    refused = b'{"text": ""}'
    cases: list[Case] = [
        ("GET /v1/bench/bare", "GET", "/v1/bench/bare", [], b"", 200),
        ("POST /v1/synthesize, key, 400 after auth", "POST", "/v1/synthesize", key, refused, 400),
    ]
    if has_cors:
        browser = [*key, (b"origin", ORIGIN.encode())]
        cases.append(("the same from an allowed Origin", "POST", "/v1/synthesize", browser, refused, 400))
    figures: dict[tuple[str, str], list[tuple[float, float]]] = {}

    async def run() -> None:
        for case in cases:
            for app in handlers.values():
                await one_round(app, case, 200)  # warm
        for _ in range(args.rounds):
            for case in cases:
                for name, app in handlers.items():
                    if name == "without CORS" and case[0].startswith("the same from"):
                        continue  # a browser's request without CORS is not a comparison
                    figures.setdefault((case[0], name), []).append(await one_round(app, case, args.requests))

    asyncio.run(run())
    if has_cors:
        micro(20_000)
    print(
        f"\n{root}: {args.rounds} rounds x {args.requests} requests per handler and case, "
        f"{os.cpu_count()} CPUs; us per request: CPU median over rounds [min-max], wall p50 median"
    )
    for (label, name), rounds in figures.items():
        cpus = [cpu for cpu, _wall in rounds]
        wall = statistics.median(wall for _cpu, wall in rounds)
        print(
            f"{label:<42} {name:<13} {statistics.median(cpus):8.1f} [{min(cpus):7.1f}-{max(cpus):7.1f}]"
            f"  {wall:8.1f}"
        )


if __name__ == "__main__":
    main()
