"""`make bench`: every benchmark scenario against the service on loopback, as one table.

    .venv/bin/python bench/run.py [--json bench/last-run.json] [--quick]

Starts Daphne with the machine's Postgres (a database of its own) and Redis, and
a second one with usage recording off for scenario 5, then runs:

  1. first audio, 1 client: the engine called directly vs HTTP streaming vs the
     WebSocket, measured turn by turn (engine, HTTP, WS, engine, ...) so that the
     engine's drift on a shared machine cancels out;
  2. first audio at 1, 20, 50, 100 concurrent streaming clients, HTTP and WS,
     short and long texts mixed;
  3. phrase-cache hits (/v1/synthesize-url) at 1 and 50 clients;
  4. GET /v1/tenant (auth, rate limit, request id) vs a bare Django view on the
     same server: what the API's per-request machinery costs;
  5. usage recording on vs off under load: rows written, latency cost;
  6. stream quality (bench/stream_quality.py): 1 to 32 streams of about 17 s of
     speech started at once, each played in real time from its first byte:
     first audio, underruns and stalls, refusals, and the real-time capacity
     against the engine's raw throughput;
  7. first audio of a short first sentence per streaming dialect (bench/dialect_latency.py):
     WS /v1/stream, ElevenLabs multi-stream-input and Cartesia, turn by turn.

Prints one table (scenario, clients, n, p50, p95, p99, throughput, errors), then
scenario 6's own, and writes both as JSON. Targets are reported, not asserted
(README "Latency").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import dialect_latency, stream_quality
from bench.common import http_first_byte, percentile, setup_django, start_server
from bench.stream_quality import QualityReport

SHORT = "Thanks for calling Acme Dental, this is Ava. How can I help you today?"
LONG = " ".join(
    [
        "Sure, I can help you with that appointment.",
        "We have openings on Tuesday morning at nine, Wednesday afternoon at two,",
        "and Friday at eleven thirty, and the hygienist on Tuesday is Maria.",
        "Which of those works best for you, and should I send a reminder by text?",
    ]
)
CACHED = {"text": "Please hold while we connect you.", "format": "mulaw"}
POSTGRES = "postgres://postgres@127.0.0.1:5432"
BENCH_DATABASE = "cwt_bench"
REDIS_URL = "redis://127.0.0.1:6379/14"


@dataclass
class Row:
    scenario: str
    clients: int
    n: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    throughput_rps: float
    errors: int
    note: str = ""


def row(
    scenario: str, clients: int, times: list[float], wall_s: float, errors: int = 0, note: str = ""
) -> Row:
    def ms(fraction: float) -> float:
        return round(percentile(times, fraction) * 1000, 1) if times else float("nan")

    return Row(
        scenario,
        clients,
        len(times),
        ms(0.5),
        ms(0.95),
        ms(0.99),
        round(len(times) / wall_s, 1),
        errors,
        note,
    )


# --- clients ------------------------------------------------------------------------------


class WsSpeaker:
    def __init__(self, base_url: str, key: str) -> None:
        self.url = base_url.replace("http://", "ws://") + "/v1/stream"
        self.key = key
        self.turn = 0

    async def __aenter__(self) -> WsSpeaker:
        self._connection = connect(
            self.url, additional_headers={"Authorization": f"Bearer {self.key}"}, max_size=None
        )
        self.ws = await self._connection.__aenter__()
        assert json.loads(await self.ws.recv())["type"] == "ready"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._connection.__aexit__(None, None, None)

    async def first_audio(self, text: str) -> float:
        self.turn += 1
        started = time.perf_counter()
        message = {"type": "synthesize", "context_id": f"t{self.turn}", "text": text, "format": "pcm"}
        await self.ws.send(json.dumps(message))
        first = None
        while True:
            received = await self.ws.recv()
            if isinstance(received, bytes):
                first = first or time.perf_counter() - started
                continue
            event = json.loads(received)
            if event["type"] == "error":
                raise RuntimeError(event)
            if event["type"] == "audio_end":
                assert first is not None
                return first


# --- scenarios -------------------------------------------------------------------------------


async def scenario_overhead(base_url: str, key: str, turns: int) -> list[Row]:
    from engines import SpeechJob
    from engines.piper import PiperEngine
    from engines.text import prepare_text

    engine = PiperEngine(max_active_jobs=1000)
    engine.load()
    job = SpeechJob(segments=prepare_text(SHORT, max_chars=5000))

    async def engine_first() -> float:
        started = time.perf_counter()
        stream = engine.stream(job)
        await anext(stream)
        elapsed = time.perf_counter() - started
        async for _ in stream:
            pass
        return elapsed

    times: dict[str, list[float]] = {"engine": [], "http": [], "ws": []}
    headers = {"Authorization": f"Bearer {key}"}
    async with (
        httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as client,
        WsSpeaker(base_url, key) as speaker,
    ):
        for _ in range(3):  # warm-up
            await engine_first(), await http_first_byte(client, SHORT), await speaker.first_audio(SHORT)
        started = time.perf_counter()
        for _ in range(turns):
            times["engine"].append(await engine_first())
            times["http"].append(await http_first_byte(client, SHORT))
            times["ws"].append(await speaker.first_audio(SHORT))
        wall = time.perf_counter() - started
    engine.close()
    pairs = {
        name: sorted(b - a for a, b in zip(times["engine"], times[name], strict=True))
        for name in ("http", "ws")
    }
    rows = [row("1. first audio: engine direct", 1, times["engine"], wall / 3)]
    for name in ("http", "ws"):
        overhead = percentile(pairs[name], 0.5) * 1000
        rows.append(
            row(
                f"1. first audio: {name.upper()} stream",
                1,
                times[name],
                wall / 3,
                note=f"{overhead:+.1f} ms p50 over the engine, turn by turn",
            )
        )
    return rows


async def scenario_concurrency(base_url: str, key: str, clients: int, per_client: int) -> list[Row]:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    rows = []
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=300, limits=limits) as client:
        http_times: list[float] = []
        errors = 0

        async def http_client(number: int) -> None:
            nonlocal errors
            for turn in range(per_client):
                try:
                    http_times.append(await http_first_byte(client, LONG if (number + turn) % 2 else SHORT))
                except (httpx.HTTPError, StopAsyncIteration):
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(http_client(n) for n in range(clients)))
        rows.append(
            row("2. first audio: HTTP stream", clients, http_times, time.perf_counter() - started, errors)
        )

    ws_times: list[float] = []
    ws_errors = 0

    async def ws_client(number: int, ready: asyncio.Barrier) -> None:
        nonlocal ws_errors
        async with WsSpeaker(base_url, key) as speaker:
            await ready.wait()
            for turn in range(per_client):
                try:
                    ws_times.append(await speaker.first_audio(LONG if (number + turn) % 2 else SHORT))
                except RuntimeError:
                    ws_errors += 1

    barrier = asyncio.Barrier(clients + 1)
    tasks = [asyncio.create_task(ws_client(n, barrier)) for n in range(clients)]
    await barrier.wait()
    started = time.perf_counter()
    await asyncio.gather(*tasks)
    rows.append(row("2. first audio: WS stream", clients, ws_times, time.perf_counter() - started, ws_errors))
    return rows


async def timed_requests(
    base_url: str,
    key: str | None,
    path: str,
    requests: int,
    clients: int,
    method: str = "GET",
    body: Any = None,
) -> tuple[list[float], float, int]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    gate = asyncio.Semaphore(clients)
    errors = 0
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60, limits=limits) as client:

        async def one() -> float | None:
            nonlocal errors
            async with gate:
                started = time.perf_counter()
                response = await client.request(method, path, json=body)
                if response.status_code >= 400:
                    errors += 1
                    return None
                return time.perf_counter() - started

        await asyncio.gather(*(one() for _ in range(clients * 2)))  # warm connections
        errors = 0
        started = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(requests)))
        wall = time.perf_counter() - started
    return [t for t in results if t is not None], wall, errors


async def scenario_cache(base_url: str, key: str, requests: int) -> list[Row]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:  # store it once
        await client.post("/v1/synthesize-url", json=CACHED, headers={"Authorization": f"Bearer {key}"})
    rows = []
    for clients in (1, 50):
        times, wall, errors = await timed_requests(
            base_url, key, "/v1/synthesize-url", requests, clients, "POST", CACHED
        )
        rows.append(row("3. phrase-cache hit", clients, times, wall, errors))
    return rows


async def scenario_api_cost(base_url: str, key: str, requests: int) -> list[Row]:
    rows = []
    for clients in (1, 20):
        bare, bare_wall, bare_errors = await timed_requests(
            base_url, None, "/v1/bench/bare", requests, clients
        )
        api, api_wall, api_errors = await timed_requests(base_url, key, "/v1/tenant", requests, clients)
        cost = (percentile(api, 0.5) - percentile(bare, 0.5)) * 1000
        rows.append(row("4. bare Django view", clients, bare, bare_wall, bare_errors))
        rows.append(
            row("4. GET /v1/tenant", clients, api, api_wall, api_errors, note=f"{cost:+.2f} ms p50 over bare")
        )
    return rows


def usage_rows(database_url: str) -> int:
    import psycopg

    with psycopg.connect(database_url) as connection:
        result = connection.execute("SELECT count(*) FROM usage_usagelog").fetchone()
    return int(result[0]) if result else 0


async def scenario_usage(base_url: str, key: str, database_url: str, requests: int, label: str) -> Row:
    before = usage_rows(database_url)
    body = {"text": "Short reply.", "format": "pcm"}
    times, wall, errors = await timed_requests(base_url, key, "/v1/synthesize", requests, 10, "POST", body)
    await asyncio.sleep(2.5)  # the flusher writes every second
    written = usage_rows(database_url) - before
    return row(f"5. synthesize, usage {label}", 10, times, wall, errors, note=f"{written} rows written")


async def scenario_stream_quality(base_url: str, key: str, quick: bool) -> tuple[list[Row], QualityReport]:
    clients = [1, 4, 16] if quick else [1, 2, 4, 8, 16, 32]
    report = await stream_quality.measure(base_url, key, clients, transport="http")
    rows = []
    for q in report.rows:
        queued = "-" if q.queued_peak is None else f"{q.queued_peak:.0f}"
        rows.append(
            Row(
                "6. stream quality: HTTP",
                q.clients,
                q.served,
                q.first_p50_ms,
                q.first_p95_ms,
                q.first_p99_ms,
                round(q.clients / q.wall_s, 1),
                q.refused_total + q.errors_total,
                note=(
                    f"{q.clean}/{q.clients} no underrun, stall {q.stall_total_s:.1f} s "
                    f"(max {q.stall_max_s:.1f}), queued {queued}, {q.audio_s / q.wall_s:.1f} audio s/s"
                ),
            )
        )
    return rows, report


# --- running ---------------------------------------------------------------------------------


async def scenario_dialects(base_url: str, key: str, turns: int) -> list[Row]:
    started = time.perf_counter()
    times = await dialect_latency.dialect_first_audio(base_url, key, turns)
    wall = time.perf_counter() - started
    native = percentile(times[dialect_latency.DIALECTS[0]], 0.5) * 1000
    rows = []
    for name in dialect_latency.DIALECTS:
        overhead = percentile(times[name], 0.5) * 1000 - native
        note = (
            "short first sentence, pcm 16 kHz"
            if name == dialect_latency.DIALECTS[0]
            else f"{overhead:+.1f} ms p50 vs WS /v1/stream"
        )
        rows.append(row(f"7. first audio: {name}", 1, times[name], wall / 3, note=note))
    return rows


def fresh_database(name: str) -> str:
    import psycopg

    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{POSTGRES}/{name}"


def run(args: argparse.Namespace) -> tuple[list[Row], QualityReport]:
    quick = args.quick
    rows: list[Row] = []
    database_url = fresh_database(BENCH_DATABASE)
    subprocess.run(["redis-cli", "-n", "14", "flushdb"], check=True, capture_output=True)
    common_env: Any = {  # str values; Any so that mypy does not match them to start_server keywords
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "BENCHMARK_ROUTES": "1",
        "LOG_LEVEL": "WARNING",
        "ENGINE_MAX_ACTIVE_JOBS": "1000",
        "METRICS_TOKEN": stream_quality.METRICS_TOKEN,  # scenario 6 reads the engine's gauges
    }
    with tempfile.TemporaryDirectory() as first_dir, tempfile.TemporaryDirectory() as second_dir:
        server, base_url, key = start_server(
            Path(first_dir),
            port=8811,
            quota_minutes=1_000_000,
            USAGE_SPOOL_DIR=f"{first_dir}/spool",
            **common_env,
        )
        try:
            step = asyncio.run
            rows += step(scenario_overhead(base_url, key, turns=10 if quick else 30))
            for clients in (1, 20, 50, 100):
                # one utterance per client (two at 1 client): all start together, half of them long
                rows += step(
                    scenario_concurrency(base_url, key, clients, per_client=2 if clients == 1 else 1)
                )
            rows += step(scenario_cache(base_url, key, requests=200 if quick else 500))
            rows += step(scenario_api_cost(base_url, key, requests=500 if quick else 2000))
            rows.append(step(scenario_usage(base_url, key, database_url, 100 if quick else 300, "on")))
            quality_rows, quality = step(scenario_stream_quality(base_url, key, quick))
            rows += step(scenario_dialects(base_url, key, turns=10 if quick else 20))
        finally:
            server.terminate()
            server.wait()
        # The same database and tenant, usage recording off.
        server, base_url, _ = start_server(
            Path(second_dir),
            port=8812,
            make_tenant=False,
            USAGE_RECORDS="0",
            USAGE_SPOOL_DIR=f"{second_dir}/spool",
            **common_env,
        )
        try:
            rows.append(
                asyncio.run(scenario_usage(base_url, key, database_url, 100 if quick else 300, "off"))
            )
        finally:
            server.terminate()
            server.wait()
    return rows + quality_rows, quality


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'scenario':<34} {'clients':>7} {'n':>5} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} "
        f"{'req/s':>8} {'errors':>6}  note"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.scenario:<34} {r.clients:>7} {r.n:>5} {r.p50_ms:>9.1f} {r.p95_ms:>9.1f} {r.p99_ms:>9.1f} "
            f"{r.throughput_rps:>8.1f} {r.errors:>6}  {r.note}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "last-run.json")
    parser.add_argument("--quick", action="store_true", help="fewer requests per scenario")
    args = parser.parse_args()
    setup_django()
    started = time.monotonic()
    rows, quality = run(args)
    elapsed = time.monotonic() - started
    print(f"\nCallWaiting TTS benchmarks, Piper on {os.cpu_count()} CPU(s), {elapsed:.0f} s\n")
    print_table(rows)
    stream_quality.print_report(quality)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    args.json.write_text(
        json.dumps(
            {
                "commit": commit,
                "cpus": os.cpu_count(),
                "date": time.strftime("%Y-%m-%d"),
                "rows": [asdict(r) for r in rows],
                "stream_quality": stream_quality.report_json(quality),
            },
            indent=2,
        )
    )
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
