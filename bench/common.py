"""What the benchmarks share: a Daphne of our own on loopback (through the tests' support
package, so that both start servers one way), and percentiles."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support.servers import ROOT, manage, wait_until_healthy


def setup_django() -> None:
    """Django for the benchmarks' in-process engine (no .env: the bench servers get their own env)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "callwaiting_tts.settings")
    os.environ.setdefault("SECRET_KEY", "bench-" + "x" * 50)
    os.environ["CWT_ENV_FILE"] = ""
    import django

    django.setup()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def start_server(
    workdir: Path, port: int = 8799, quota_minutes: int = 0, *, make_tenant: bool = True, **extra_env: str
) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start Daphne on SQLite in `workdir` with the Piper engine; returns (process, base URL, API key).

    The tenant has no rate limits or stream cap; `quota_minutes` > 0 gives it a quota to check.
    """
    env = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", str(workdir)),
        "CWT_ENV_FILE": "",
        "SECRET_KEY": "bench-" + "x" * 50,
        "DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite3'}",
        "MEDIA_ROOT": str(workdir / "media"),
        "TTS_ENGINE": "piper",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "LOG_LEVEL": "WARNING",
        "ENGINE_MAX_ACTIVE_JOBS": "1000",
        **extra_env,
    }
    manage("migrate", "-v0", env=env)
    # 0: no limit. The benchmarks measure the service, not a tenant's budget.
    unlimited = ["--rate-limit-minute", "0", "--rate-limit-hour", "0", "--max-concurrent-streams", "0"]
    key = ""
    if make_tenant:  # a second server on the same database reuses the first one's tenant
        key = manage(
            "create_tenant", "bench", *unlimited, "--quota-minutes", str(quota_minutes), env=env
        ).strip()
    log_path = workdir / "daphne.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "callwaiting_tts.serve"], env=env, cwd=ROOT, stdout=log, stderr=log
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(server, base_url, log_path, timeout_s=30)
    except AssertionError as failed:
        server.kill()
        raise SystemExit(str(failed)) from None
    return server, base_url, key


async def http_first_byte(client: httpx.AsyncClient, text: str) -> float:
    """Seconds from a streamed POST /v1/synthesize to its first bytes (the rest is read too)."""
    started = time.perf_counter()
    async with client.stream(
        "POST", "/v1/synthesize", json={"text": text, "streaming": True, "format": "pcm"}
    ) as r:
        r.raise_for_status()
        chunks = r.aiter_raw()
        await anext(chunks)
        elapsed = time.perf_counter() - started
        async for _ in chunks:
            pass
    return elapsed
