"""Latency of /v1/synthesize-url cache hits (the phrase cache), at 1 and 50 concurrent clients.

    .venv/bin/python bench/synthesize_url_cache.py [--requests 500]

Starts its own Daphne (SQLite, local disk, Piper), stores a prompt once, then
asks for it again and again. Targets (issue #5): p95 at most 10 ms at 1
client and at most 50 ms at 50 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import percentile, start_server

BODY = {"text": "Thanks for calling Acme Dental. Please hold while we connect you.", "format": "mulaw"}


async def hit_times(base_url: str, key: str, requests: int, concurrency: int) -> list[float]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60, limits=limits
    ) as client:

        async def one() -> float:
            async with semaphore:
                started = time.perf_counter()
                response = await client.post("/v1/synthesize-url", json=BODY)
                elapsed = time.perf_counter() - started
                assert response.json()["cached"] is True, response.text
                return elapsed

        await asyncio.gather(*(one() for _ in range(concurrency)))  # warm connections
        return list(await asyncio.gather(*(one() for _ in range(requests))))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 50])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        server, base_url, key = start_server(Path(workdir), port=8798)
        try:
            first = httpx.post(
                f"{base_url}/v1/synthesize-url",
                json=BODY,
                headers={"Authorization": f"Bearer {key}"},
                timeout=60,
            )
            assert first.status_code == 200, first.text
            rows = {c: asyncio.run(hit_times(base_url, key, args.requests, c)) for c in args.concurrency}
        finally:
            server.terminate()
            server.wait()
    print(
        f"\n/v1/synthesize-url cache hits, {args.requests} requests per row, {os.cpu_count()} CPU(s) (ms)\n"
    )
    print(f"{'clients':>7} | {'p50':>7} {'p95':>7} {'max':>7} | target p95")
    print("-" * 48)
    targets = {1: 10.0, 50: 50.0}
    for concurrency, times in rows.items():
        p50, p95 = percentile(times, 0.5) * 1000, percentile(times, 0.95) * 1000
        target = targets.get(concurrency)
        verdict = f"{target:.0f} ({'met' if p95 <= target else 'missed'})" if target else "-"
        print(f"{concurrency:>7} | {p50:>7.1f} {p95:>7.1f} {max(times) * 1000:>7.1f} | {verdict}")


if __name__ == "__main__":
    main()
