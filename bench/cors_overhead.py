"""What CORS and the Origin rule (#21) cost the API's hot path, measured in process.

    .venv/bin/python bench/cors_overhead.py --root /work/main      # the code before
    .venv/bin/python bench/cors_overhead.py --root .               # this checkout

Loads the Django project found at --root (settings from the environment: SQLite in a
temporary folder, the machine's Redis for rate limits, API keys cached as in production)
and calls the API's ASGI handler (the lean /v1 middleware stack) directly, with no socket
between, so that what is left is the handler and its middleware. Requests, sequential:

- GET /v1/health, no Origin: the thinnest route;
- POST /v1/synthesize with a key and a body refused after authentication and throttling
  (`{"text": ""}`: 400 empty_text), so everything on the hot path but the engine runs:
  request id, CORS, method policy, key (cached), Origin rule, rate limit (Redis), usage row;
- the same from a browser: an allowed Origin (only where --root has CORS).

Prints, per request in microseconds and per round, the CPU time (process time over the
round / requests: the steadiest number on a shared machine) and the wall time's p50 and p95. Run the two
roots one after the other, twice, to see the spread (bench/RESULTS.md).
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


async def call(
    app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> int:
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


async def timed(
    app: Any,
    requests: int,
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    expect: int,
) -> tuple[list[float], float]:
    """Each request's wall time, and the CPU time per request over them all (process time:
    what a shared, loaded machine's other work inflates least)."""
    for _ in range(100):  # warm
        await call(app, method, path, headers, body)
    times = []
    cpu_started = time.process_time()
    for _ in range(requests):
        started = time.perf_counter()
        status = await call(app, method, path, headers, body)
        times.append(time.perf_counter() - started)
        assert status == expect, (path, status)
    return times, (time.process_time() - cpu_started) / requests


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default=".", help="the project checkout to measure")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    workdir = Path(tempfile.mkdtemp(prefix="cwt-cors-bench-"))
    os.chdir(root)
    sys.path.insert(0, str(root))
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": "callwaiting_tts.settings",
            "CWT_ENV_FILE": "",
            "SECRET_KEY": "bench-only-" + "x" * 40,
            "DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite3'}",
            "REDIS_URL": args.redis_url,
            "REDIS_KEY_PREFIX": f"cwt-bench-{uuid.uuid4().hex[:6]}",
            "MEDIA_ROOT": str(workdir / "media"),
            "USAGE_SPOOL_DIR": str(workdir / "spool"),
            "USAGE_FLUSH_SECONDS": "0",
            "TTS_ENGINE": "piper",
            "LOG_LEVEL": "ERROR",
        }
    )
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from tenants.models import Tenant
    from tenants.services import tenant_create

    tenant, issued = tenant_create(
        name="bench", rate_limit_minute=10**8, rate_limit_hour=10**9, quota_minutes=0
    )
    origin = "https://app.example.com"
    has_cors = hasattr(Tenant, "allowed_origins") or any(
        field.name == "allowed_origins" for field in Tenant._meta.get_fields()
    )
    if has_cors:
        Tenant.objects.filter(pk=tenant.pk).update(allowed_origins=[origin])
    from callwaiting_tts.handlers import ApiASGIHandler

    app = ApiASGIHandler()
    key = [(b"authorization", f"Bearer {issued.plaintext}".encode()), (b"content-type", b"application/json")]
    cases = [
        ("GET /v1/health", "GET", "/v1/health", [], b"", 200),
        ("POST /v1/synthesize (key, 400 after auth)", "POST", "/v1/synthesize", key, b'{"text": ""}', 400),
    ]
    if has_cors:
        cases.append(
            (
                "the same from a browser Origin",
                "POST",
                "/v1/synthesize",
                [*key, (b"origin", origin.encode())],
                b'{"text": ""}',
                400,
            )
        )
    results: dict[str, list[tuple[float, float, float]]] = {label: [] for label, *_ in cases}

    async def run() -> None:
        for _ in range(args.rounds):
            for label, method, path, headers, body, expect in cases:
                times, cpu = await timed(app, args.requests, method, path, headers, body, expect)
                ordered = sorted(times)
                results[label].append(
                    (cpu * 1e6, statistics.median(times) * 1e6, ordered[int(len(ordered) * 0.95)] * 1e6)
                )

    asyncio.run(run())
    print(
        f"\n{root} ({'with' if has_cors else 'without'} CORS), {args.requests} requests x {args.rounds}"
        " rounds; per request, us: CPU (mean) | wall p50 / p95"
    )
    for label, rounds in results.items():
        cells = "   ".join(f"{cpu:6.1f} | {p50:6.1f} / {p95:7.1f}" for cpu, p50, p95 in rounds)
        print(f"{label:<44} {cells}")


if __name__ == "__main__":
    main()
