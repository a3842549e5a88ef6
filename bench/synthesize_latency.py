"""Time to first audio: POST /v1/synthesize through Daphne vs the Piper engine called directly.

    .venv/bin/python bench/synthesize_latency.py [--requests 60] [--concurrency 1 20]

Starts its own Daphne on loopback (SQLite in a temp dir, Piper engine), then
prints p50/p95 of the engine's own first chunk and of the HTTP time to first
byte, per concurrency level, and the service's overhead on top of the engine.
Target (issue #3): at 1 client, at most +5 ms at p50 and +15 ms at p95.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import http_first_byte, percentile, setup_django, start_server

TEXT = "Thanks for calling Acme Dental, this is Ava. How can I help you today?"


async def engine_first_chunk_times(requests: int, concurrency: int) -> list[float]:
    from engines.piper import PiperEngine
    from engines.text import prepare_text

    engine = PiperEngine(max_active_jobs=1000)
    engine.load()
    from engines import SpeechJob

    job = SpeechJob(segments=prepare_text(TEXT, max_chars=5000))
    semaphore = asyncio.Semaphore(concurrency)

    async def one() -> float:
        async with semaphore:
            started = time.perf_counter()
            stream = engine.stream(job)
            await anext(stream)
            elapsed = time.perf_counter() - started
            async for _ in stream:  # finish the request, as the HTTP client does
                pass
            return elapsed

    await one()  # warm-up
    times = await asyncio.gather(*(one() for _ in range(requests)))
    engine.close()
    return list(times)


async def http_first_byte_times(base_url: str, key: str, requests: int, concurrency: int) -> list[float]:
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120, limits=limits
    ) as client:

        async def one() -> float:
            async with semaphore:
                return await http_first_byte(client, TEXT)

        await one()
        return list(await asyncio.gather(*(one() for _ in range(requests))))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 20])
    args = parser.parse_args()
    setup_django()

    rows = []
    for concurrency in args.concurrency:
        direct = asyncio.run(engine_first_chunk_times(args.requests, concurrency))
        rows.append((concurrency, direct))
    with tempfile.TemporaryDirectory() as workdir:
        # A tenant with a quota: the check runs on every request, as in production.
        server, base_url, key = start_server(Path(workdir), quota_minutes=1_000_000)
        try:
            http = {
                c: asyncio.run(http_first_byte_times(base_url, key, args.requests, c))
                for c in args.concurrency
            }
        finally:
            server.terminate()
            server.wait()

    print(f"\nTime to first audio, Piper on {os.cpu_count()} CPU(s), {args.requests} requests per row (ms)\n")
    print(
        f"{'clients':>7} | {'engine p50':>10} {'engine p95':>10} | {'http p50':>8} {'http p95':>8} | "
        f"{'+p50':>6} {'+p95':>6}"
    )
    print("-" * 72)
    for concurrency, direct in rows:
        d50, d95 = percentile(direct, 0.5) * 1000, percentile(direct, 0.95) * 1000
        h50, h95 = percentile(http[concurrency], 0.5) * 1000, percentile(http[concurrency], 0.95) * 1000
        print(
            f"{concurrency:>7} | {d50:>10.1f} {d95:>10.1f} | {h50:>8.1f} {h95:>8.1f} | "
            f"{h50 - d50:>+6.1f} {h95 - d95:>+6.1f}"
        )
    print(f"\nengine mean at 1 client: {statistics.mean(rows[0][1]) * 1000:.1f} ms")
    print("target at 1 client: +5 ms at p50, +15 ms at p95 (service overhead over the engine)")


if __name__ == "__main__":
    main()
