"""Time to first audio over WS /v1/stream vs the Piper engine called directly.

    .venv/bin/python bench/stream_latency.py [--utterances 3] [--connections 1 20 100]

Starts its own Daphne on loopback (SQLite in a temp dir, Piper), opens N
authenticated WebSocket connections at once, and has each speak `--utterances`
utterances one after another; time to first audio is from sending `synthesize`
to the first binary frame of that context. Beside it, the engine's own first
chunk at the same concurrency. Targets (issue #8): at 1 connection within 10 ms
of the engine; at 100 connections, p95 at most 1.5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import percentile, setup_django, start_server
from bench.synthesize_latency import TEXT, engine_first_chunk_times


async def stream_first_audio_times(base_url: str, key: str, connections: int, utterances: int) -> list[float]:
    url = base_url.replace("http://", "ws://") + "/v1/stream"
    times: list[float] = []

    async def speaker(number: int, everyone_ready: asyncio.Barrier) -> None:
        async with connect(url, additional_headers={"Authorization": f"Bearer {key}"}, max_size=None) as ws:
            assert json.loads(await ws.recv())["type"] == "ready"
            await everyone_ready.wait()
            for turn in range(utterances):
                context_id = f"c{number}-{turn}"
                started = time.perf_counter()
                await ws.send(
                    json.dumps(
                        {"type": "synthesize", "context_id": context_id, "text": TEXT, "format": "pcm"}
                    )
                )
                first = None
                while True:
                    message = await ws.recv()
                    if isinstance(message, bytes):
                        if first is None:
                            first = time.perf_counter() - started
                    elif json.loads(message)["type"] == "audio_end":
                        break
                    elif json.loads(message)["type"] == "error":
                        raise RuntimeError(message)
                assert first is not None
                times.append(first)

    barrier = asyncio.Barrier(connections)
    await asyncio.gather(*(speaker(n, barrier) for n in range(connections)))
    return times


async def paired_single_times(base_url: str, key: str, pairs: int) -> tuple[list[float], list[float]]:
    """One engine-direct utterance, then one over the WebSocket, repeatedly: on a
    shared machine the engine's own time drifts between runs, so the overhead is
    measured pair by pair, minutes apart from nothing."""
    engine_times: list[float] = []
    ws_times: list[float] = []
    for _ in range(pairs):
        engine_times += await engine_first_chunk_times(1, 1)
        ws_times += await stream_first_audio_times(base_url, key, 1, 1)
    return engine_times, ws_times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--utterances", type=int, default=3, help="per connection")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 20, 100])
    args = parser.parse_args()
    setup_django()

    results = []
    with tempfile.TemporaryDirectory() as workdir:
        server, base_url, key = start_server(Path(workdir), quota_minutes=1_000_000, LOG_LEVEL="ERROR")
        try:
            asyncio.run(stream_first_audio_times(base_url, key, 1, 2))  # warm-up
            engine: dict[int, list[float]] = {}
            for connections in args.connections:
                if connections == 1:
                    engine[1], ws_times = asyncio.run(paired_single_times(base_url, key, 20))
                else:
                    ws_times = asyncio.run(
                        stream_first_audio_times(base_url, key, connections, args.utterances)
                    )
                    engine[connections] = asyncio.run(engine_first_chunk_times(len(ws_times), connections))
                results.append((connections, ws_times))
        finally:
            server.terminate()
            server.wait()

    print(f"\nWebSocket time to first audio, Piper on {os.cpu_count()} CPU(s) (ms)\n")
    print(
        f"{'conns':>5} {'n':>4} | {'engine p50':>10} {'engine p95':>10} | "
        f"{'ws p50':>8} {'ws p95':>8} | {'+p50':>7} {'+p95':>7}"
    )
    print("-" * 76)
    for connections, ws_times in results:
        e50, e95 = percentile(engine[connections], 0.5) * 1000, percentile(engine[connections], 0.95) * 1000
        w50, w95 = percentile(ws_times, 0.5) * 1000, percentile(ws_times, 0.95) * 1000
        print(
            f"{connections:>5} {len(ws_times):>4} | {e50:>10.1f} {e95:>10.1f} | {w50:>8.1f} {w95:>8.1f} | "
            f"{w50 - e50:>+7.1f} {w95 - e95:>+7.1f}"
        )
    print("\ntargets: 1 connection within +10 ms of the engine; 100 connections p95 <= 1500 ms")


if __name__ == "__main__":
    main()
