"""What the per-request limit check costs: GET /v1/tenant with rate limits on (Redis) and off.

    .venv/bin/python bench/ratelimit_cost.py [--requests 2000]

Starts two Daphne servers of its own (SQLite, Piper) against the machine's
Redis, one with RATE_LIMITS_ENABLED=1 and one with 0, and prints p50/p95 of
sequential requests to each and the difference.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import percentile, start_server


def latencies(base_url: str, key: str, requests: int) -> list[float]:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}) as client:
        for _ in range(50):
            client.get("/v1/tenant")
        times = []
        for _ in range(requests):
            started = time.perf_counter()
            response = client.get("/v1/tenant")
            times.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14"))
    args = parser.parse_args()
    rows = {}
    for label, enabled in (("limits off", "0"), ("limits on", "1")):
        with tempfile.TemporaryDirectory() as workdir:
            server, base_url, key = start_server(
                Path(workdir), port=8796, REDIS_URL=args.redis_url, RATE_LIMITS_ENABLED=enabled
            )
            try:
                _raise_limits(Path(workdir))
                rows[label] = latencies(base_url, key, args.requests)
            finally:
                server.terminate()
                server.wait()
    print(f"\nGET /v1/tenant, {args.requests} sequential requests, {os.cpu_count()} CPU(s) (ms)\n")
    print(f"{'':>11} | {'p50':>6} {'p95':>6}")
    print("-" * 28)
    for label, times in rows.items():
        print(f"{label:>11} | {percentile(times, 0.5) * 1000:>6.2f} {percentile(times, 0.95) * 1000:>6.2f}")
    off, on = rows["limits off"], rows["limits on"]
    print(
        f"{'check cost':>11} | {(percentile(on, 0.5) - percentile(off, 0.5)) * 1000:>+6.2f} "
        f"{(percentile(on, 0.95) - percentile(off, 0.95)) * 1000:>+6.2f}"
    )


def _raise_limits(workdir: Path) -> None:
    """Limits on, but a budget the benchmark cannot exhaust: the check runs in full every time."""
    with sqlite3.connect(workdir / "db.sqlite3") as connection:
        connection.execute(
            "UPDATE tenants_tenant SET rate_limit_minute = 1000000, rate_limit_hour = 100000000"
        )


if __name__ == "__main__":
    main()
