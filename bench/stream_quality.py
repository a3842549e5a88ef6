"""Stream quality: what callers hear when N streams start at once.

    .venv/bin/python -m bench.stream_quality [--clients 1 2 4 8 16 32] [--seconds-of-text 17]
                                             [--transport http|ws] [--max-row-seconds 150]

Starts its own Daphne on loopback (SQLite in a temp dir, Piper; `make bench` runs the same
scenario against Postgres and Redis). For each N, N simulated callers send one streamed
request each at the same moment (HTTP `POST /v1/synthesize` with `streaming: true`, or a
WebSocket `synthesize` on an already open connection), each for a different text of about
`--seconds-of-text` seconds of speech, as raw 16-bit PCM at 16 kHz so that bytes give
seconds exactly.

Each caller plays its audio in real time from the first byte, as a phone does. Playback
runs dry (an underrun) when the audio played so far catches up with the audio received
before the stream has ended; playback then pauses until more audio arrives, and the pause
is a stall (the gap the caller hears). Per N: first audio p50/p95 (from sending the
request), streams with zero underruns, underruns, total and longest stall, refusals
(429/503 by code), other errors, the peak of the engine's admission queue depth on
/metrics ("-" when the server exports none) and of the engine's jobs in flight, and the
audio delivered per wall second.

Beside it, the engine's raw throughput: the same texts synthesized by the Piper engine in
this process, no server, enough of them at once to keep every worker busy, as audio
seconds per wall second (measured before and after the rows; the mean is used). One
real-time stream needs one audio second per second, so that figure is also the most
real-time streams the engine could feed.

The real-time capacity is the largest N such that it and every smaller N had all streams
served (no refusal or error), none with an underrun, and p95 first audio <= 1.5 s; the
capacity ratio is that N over the raw throughput (target, issue #19: >= 0.8). Capacity is
only as fine as the N asked for.

Caveat: the callers share the machine with the server; on two cores a caller's event loop
can itself be late to read a chunk, which would count against the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import percentile, setup_django, start_server

SAMPLE_RATE = 16000
BYTES_PER_SECOND = SAMPLE_RATE * 2  # 16-bit mono PCM
FIRST_AUDIO_TARGET_S = 1.5
CAPACITY_RATIO_TARGET = 0.8
REFUSAL_STATUSES = (429, 503)
# WebSocket `error` codes that are a refusal to start (the HTTP routes answer them 429/503).
REFUSAL_CODES = frozenset(
    {"engine_overloaded", "engine_share_exceeded", "rate_limited", "stream_limit", "quota_exceeded"}
)
METRICS_TOKEN = secrets.token_urlsafe(16)  # for the bench servers this process starts
ENGINE_JOBS_GAUGE = "cwt_engine_jobs_in_flight"
QUEUE_GAUGE = "cwt_engine_queue_depth"

# A receptionist's replies; each caller starts at a different sentence, so no two texts match.
SENTENCES = [
    "Thanks for calling Acme Dental, this is Ava.",
    "I can see your file here, and your last cleaning was in March.",
    "We have openings on Tuesday morning at nine, and Wednesday afternoon at two.",
    "Friday at eleven thirty is also free, with Doctor Patel.",
    "The hygienist on Tuesday is Maria, who you saw last time.",
    "Please arrive ten minutes early so that we can update your insurance details.",
    "If you need to cancel, call us at least a day before, and there is no fee.",
    "Parking is behind the building, and the entrance is on Elm Street.",
    "Would you like a reminder by text message the evening before?",
    "Your plan covers two cleanings a year, and x-rays once every two years.",
    "The new patient forms are on our website, under the tab that says visit.",
    "I have also noted that you asked about whitening, and the doctor can talk it through.",
    "Is there anything else I can help you with today?",
]
CALIBRATION_TEXT = " ".join(SENTENCES[:4])


def texts_for(clients: int, seconds: float, chars_per_second: float) -> list[str]:
    """One text per caller, each of about `seconds` of speech, each starting elsewhere in SENTENCES."""
    wanted = seconds * chars_per_second
    texts = []
    for number in range(clients):
        parts: list[str] = []
        index = number * 5  # co-prime with len(SENTENCES): neighbours start far apart
        length = -1  # of " ".join(parts)
        while True:
            sentence = SENTENCES[index % len(SENTENCES)]
            # Stop at whichever length is nearer the target: with this sentence or without it.
            if parts and abs(length + 1 + len(sentence) - wanted) >= abs(length - wanted):
                break
            parts.append(sentence)
            length += 1 + len(sentence)
            index += 1
        texts.append(" ".join(parts))
    return texts


# --- one caller -------------------------------------------------------------------------------


@dataclass
class Playout:
    """A caller's player. Playback starts with the first byte and runs at real time; when the
    audio received so far has all been played and the stream has not ended, playback pauses
    (an underrun) until the next bytes arrive, and that pause (a stall) is heard as a gap."""

    sent_at: float  # perf_counter when the request left
    first_at: float | None = None
    received_s: float = 0.0
    stall_s: float = 0.0
    max_stall_s: float = 0.0
    underruns: int = 0

    def arrived(self, audio_bytes: int, now: float) -> None:
        if audio_bytes <= 0:
            return
        if self.first_at is None:
            self.first_at = now
        else:
            played = now - self.first_at - self.stall_s  # where playback would be had it not run dry
            if played > self.received_s:
                gap = played - self.received_s
                self.underruns += 1
                self.stall_s += gap
                self.max_stall_s = max(self.max_stall_s, gap)
        self.received_s += audio_bytes / BYTES_PER_SECOND

    @property
    def first_audio_s(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.sent_at


@dataclass
class StreamResult:
    playout: Playout
    refused: str | None = None  # the error code of a 429/503 (or its WebSocket equivalent)
    error: str | None = None


async def http_caller(client: httpx.AsyncClient, text: str, go: asyncio.Event) -> StreamResult:
    await go.wait()
    result = StreamResult(Playout(time.perf_counter()))
    body = {"text": text, "streaming": True, "format": "pcm", "sample_rate": SAMPLE_RATE}
    try:
        async with client.stream("POST", "/v1/synthesize", json=body) as response:
            if response.status_code >= 400:
                await response.aread()
                try:
                    code = str(response.json()["error"]["code"])
                except (ValueError, KeyError, TypeError):
                    code = f"http_{response.status_code}"
                if response.status_code in REFUSAL_STATUSES:
                    result.refused = code
                else:
                    result.error = code
                return result
            async for chunk in response.aiter_raw():
                result.playout.arrived(len(chunk), time.perf_counter())
    except httpx.HTTPError as exc:
        result.error = type(exc).__name__
    return result


async def ws_caller(
    base_url: str, key: str, text: str, go: asyncio.Event, ready: asyncio.Barrier
) -> StreamResult:
    """A call whose socket is already open when the reply is asked for."""
    url = base_url.replace("http://", "ws://") + "/v1/stream"
    result = StreamResult(Playout(time.perf_counter()))
    waited = False  # every caller passes `ready` once, connected or not, or the others wait forever
    try:
        async with connect(url, additional_headers={"Authorization": f"Bearer {key}"}, max_size=None) as ws:
            greeting = json.loads(await ws.recv())
            waited = True
            await ready.wait()
            await go.wait()
            if greeting["type"] != "ready":
                result.refused = str(greeting.get("code", greeting["type"]))
                return result
            result.playout.sent_at = time.perf_counter()
            message = {
                "type": "synthesize",
                "context_id": "q",
                "text": text,
                "format": "pcm",
                "sample_rate": SAMPLE_RATE,
            }
            await ws.send(json.dumps(message))
            while True:
                received = await ws.recv()
                if isinstance(received, bytes):
                    # [1 byte: n][n bytes: context id][audio]
                    result.playout.arrived(len(received) - 1 - received[0], time.perf_counter())
                    continue
                event = json.loads(received)
                if event["type"] == "error":
                    code = str(event.get("code"))
                    if code in REFUSAL_CODES and result.playout.first_at is None:
                        result.refused = code
                    else:
                        result.error = code
                elif event["type"] == "audio_end":
                    return result
    except (OSError, WebSocketException) as exc:
        if result.refused is None:
            result.error = type(exc).__name__
        if not waited:
            await ready.wait()
    return result


# --- what the server reports --------------------------------------------------------------


class GaugeWatcher:
    """Polls /metrics while a row runs: the peak of the engine's jobs in flight and of its
    admission queue depth (`cwt_engine_queue_depth`)."""

    def __init__(self, base_url: str, token: str | None) -> None:
        self.base_url = base_url
        self.token = token
        self.peaks: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.token:
            self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=10) as client:
            while True:
                try:
                    response = await client.get("/metrics")
                except httpx.HTTPError:
                    response = None
                if response is not None and response.status_code == 200:
                    for line in response.text.splitlines():
                        name, _, value = line.partition(" ")
                        name = name.partition("{")[0]
                        if line.startswith("#") or name not in (ENGINE_JOBS_GAUGE, QUEUE_GAUGE):
                            continue
                        try:
                            number = float(value.split()[0])
                        except (ValueError, IndexError):
                            continue
                        self.peaks[name] = max(self.peaks.get(name, 0.0), number)
                await asyncio.sleep(0.5)

    @property
    def queued_peak(self) -> float | None:
        return self.peaks.get(QUEUE_GAUGE)


# --- one row: N callers at once -------------------------------------------------------------


@dataclass
class QualityRow:
    clients: int
    served: int  # streams that got audio
    first_p50_ms: float
    first_p95_ms: float
    first_p99_ms: float
    clean: int  # served streams with zero underruns
    underruns: int
    stall_total_s: float
    stall_max_s: float
    refused: dict[str, int]
    errors: dict[str, int]
    queued_peak: float | None  # peak of a queue gauge on /metrics; None when none is exported
    engine_jobs_peak: float | None
    audio_s: float
    wall_s: float
    mean_stream_audio_s: float

    @property
    def refused_total(self) -> int:
        return sum(self.refused.values())

    @property
    def errors_total(self) -> int:
        return sum(self.errors.values())

    @property
    def real_time(self) -> bool:
        """Every stream served, none ran dry, and p95 first audio within the target."""
        return (
            self.refused_total == 0
            and self.errors_total == 0
            and self.clean == self.served == self.clients
            and self.first_p95_ms <= FIRST_AUDIO_TARGET_S * 1000
        )


async def run_row(
    base_url: str, key: str, texts: list[str], transport: str, metrics_token: str | None, timeout_s: float
) -> QualityRow:
    clients = len(texts)
    go = asyncio.Event()
    watcher = GaugeWatcher(base_url, metrics_token)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=timeout_s, limits=limits
    ) as client:
        if transport == "http":
            # Open every connection first, so that the N requests leave together.
            await asyncio.gather(*(client.get("/v1/health") for _ in range(clients)))
            tasks = [asyncio.create_task(http_caller(client, text, go)) for text in texts]
        else:
            ready = asyncio.Barrier(clients + 1)
            tasks = [asyncio.create_task(ws_caller(base_url, key, text, go, ready)) for text in texts]
            await ready.wait()
        watcher.start()
        started = time.perf_counter()
        go.set()
        done, pending = await asyncio.wait(tasks, timeout=timeout_s)
        wall = time.perf_counter() - started
        for task in pending:
            task.cancel()
        await watcher.stop()
    results = [task.result() for task in done]
    timed_out = len(pending)

    served = [r for r in results if r.playout.first_at is not None and r.refused is None]
    firsts = [r.playout.first_audio_s or 0.0 for r in served]
    errors = Counter(r.error for r in results if r.error)
    if timed_out:
        errors["timeout"] += timed_out
    audio = sum(r.playout.received_s for r in results)
    return QualityRow(
        clients=clients,
        served=len(served),
        first_p50_ms=round(percentile(firsts, 0.5) * 1000, 1) if firsts else float("nan"),
        first_p95_ms=round(percentile(firsts, 0.95) * 1000, 1) if firsts else float("nan"),
        first_p99_ms=round(percentile(firsts, 0.99) * 1000, 1) if firsts else float("nan"),
        clean=sum(1 for r in served if r.playout.underruns == 0 and r.error is None),
        underruns=sum(r.playout.underruns for r in served),
        stall_total_s=round(sum(r.playout.stall_s for r in served), 2),
        stall_max_s=round(max((r.playout.max_stall_s for r in served), default=0.0), 2),
        refused=dict(Counter(r.refused for r in results if r.refused)),
        errors=dict(errors),
        queued_peak=watcher.queued_peak,
        engine_jobs_peak=watcher.peaks.get(ENGINE_JOBS_GAUGE),
        audio_s=round(audio, 1),
        wall_s=round(wall, 2),
        mean_stream_audio_s=round(statistics.mean(r.playout.received_s for r in served), 1)
        if served
        else 0.0,
    )


# --- the engine alone -----------------------------------------------------------------------


async def engine_throughput(texts: list[str]) -> float:
    """Audio seconds per wall second from the Piper engine in this process, all `texts` at once
    (each stream has one sentence in flight at a time, so there should be more texts than workers)."""
    from engines import QueuePolicy, SpeechJob
    from engines.piper import PiperEngine
    from engines.text import prepare_text

    # The engine alone: no admission by its own measured capacity (which is what is measured).
    engine = PiperEngine(max_active_jobs=1000, queue_policy=QueuePolicy(headroom=1000.0))
    engine.load()
    jobs = [SpeechJob(segments=prepare_text(text, max_chars=5000)) for text in texts]

    async def samples(job: SpeechJob) -> int:
        return sum([chunk.sample_count async for chunk in engine.stream(job)])

    await samples(SpeechJob(segments=prepare_text(SENTENCES[0], max_chars=5000)))  # warm-up
    started = time.perf_counter()
    total = sum(await asyncio.gather(*(samples(job) for job in jobs)))
    wall = time.perf_counter() - started
    engine.close()
    return total / engine.sample_rate / wall


# --- the scenario ---------------------------------------------------------------------------


@dataclass
class QualityReport:
    transport: str
    seconds_of_text: float
    chars_per_second: float
    raw_throughput: list[float] = field(default_factory=list)  # audio s per s, before and after the rows
    rows: list[QualityRow] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # N not run: an earlier row took too long

    @property
    def raw(self) -> float:
        return statistics.mean(self.raw_throughput) if self.raw_throughput else float("nan")

    @property
    def capacity(self) -> int:
        """The largest N that, with every smaller N run, kept all its streams real-time."""
        best = 0
        for row in sorted(self.rows, key=lambda r: r.clients):
            if not row.real_time:
                break
            best = row.clients
        return best

    @property
    def capacity_ratio(self) -> float:
        return self.capacity / self.raw if self.raw > 0 else float("nan")


async def calibrate(base_url: str, key: str) -> float:
    """Characters per second of speech of this server's voice (one streamed request, also a warm-up)."""
    async with httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=120
    ) as client:
        result = await http_caller(client, CALIBRATION_TEXT, _set_event())
    if result.refused or result.error or result.playout.received_s <= 0:
        raise SystemExit(f"calibration request failed: {result.refused or result.error or 'no audio'}")
    return len(CALIBRATION_TEXT) / result.playout.received_s


def _set_event() -> asyncio.Event:
    event = asyncio.Event()
    event.set()
    return event


async def measure(
    base_url: str,
    key: str,
    clients: list[int],
    *,
    seconds_of_text: float = 17.0,
    transport: str = "http",
    metrics_token: str | None = METRICS_TOKEN,
    max_row_seconds: float = 150.0,
    log: bool = True,
) -> QualityReport:
    """Every row, in order of N; rows after one that took longer than `max_row_seconds` are skipped."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Django's logging config: a line per request
    cps = await calibrate(base_url, key)
    report = QualityReport(transport, seconds_of_text, round(cps, 2))
    # Enough texts to keep every engine worker busy for a while: twice the workers, at least 8.
    engine_texts = texts_for(max(8, 2 * (os.cpu_count() or 1)), seconds_of_text, cps)
    report.raw_throughput.append(round(await engine_throughput(engine_texts), 2))
    for index, n in enumerate(sorted(clients)):
        row = await run_row(
            base_url, key, texts_for(n, seconds_of_text, cps), transport, metrics_token, 4 * max_row_seconds
        )
        report.rows.append(row)
        if log:
            print(
                f"  stream quality N={n}: p95 first audio {row.first_p95_ms:.0f} ms, "
                f"{row.clean}/{n} without underruns, {row.wall_s:.0f} s",
                flush=True,
            )
        if row.wall_s > max_row_seconds:
            report.skipped = sorted(clients)[index + 1 :]
            break
    report.raw_throughput.append(round(await engine_throughput(engine_texts), 2))
    return report


def _counts(counts: dict[str, int]) -> str:
    return ",".join(f"{code}:{n}" for code, n in sorted(counts.items())) or "0"


def print_report(report: QualityReport) -> None:
    print(
        f"\nStream quality ({report.transport.upper()}, pcm {SAMPLE_RATE} Hz, ~{report.seconds_of_text:g} s "
        f"of speech per stream, {report.chars_per_second} chars/s), playback from the first byte\n"
    )
    header = (
        f"{'N':>4} {'served':>6} {'first p50':>9} {'first p95':>9} {'no underrun':>11} {'underruns':>9} "
        f"{'stall tot s':>11} {'stall max s':>11} {'refused':>8} {'errors':>7} {'queued':>6} "
        f"{'jobs':>5} {'audio s/s':>9} {'wall s':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in report.rows:
        queued = "-" if r.queued_peak is None else f"{r.queued_peak:.0f}"
        jobs = "-" if r.engine_jobs_peak is None else f"{r.engine_jobs_peak:.0f}"
        print(
            f"{r.clients:>4} {r.served:>6} {r.first_p50_ms:>9.0f} {r.first_p95_ms:>9.0f} "
            f"{f'{r.clean}/{r.clients}':>11} {r.underruns:>9} "
            f"{r.stall_total_s:>11.2f} {r.stall_max_s:>11.2f} "
            f"{_counts(r.refused):>8} {_counts(r.errors):>7} {queued:>6} {jobs:>5} "
            f"{r.audio_s / r.wall_s:>9.1f} {r.wall_s:>7.1f}"
        )
    if report.skipped:
        print(f"skipped N = {', '.join(map(str, report.skipped))}: the row before took too long")
    raw = " and ".join(f"{v:.1f}" for v in report.raw_throughput)
    print(
        f"\nengine alone (no server): {raw} audio s per s (before and after the rows), "
        f"mean {report.raw:.1f}: at most {report.raw:.1f} real-time streams"
    )
    print(
        f"real-time capacity (all served, zero underruns, p95 first audio <= {FIRST_AUDIO_TARGET_S:g} s): "
        f"N = {report.capacity}; capacity ratio {report.capacity:d} / {report.raw:.1f} = "
        f"{report.capacity_ratio:.2f} (target >= {CAPACITY_RATIO_TARGET:g})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--seconds-of-text", type=float, default=17.0, help="speech per stream")
    parser.add_argument("--transport", choices=("http", "ws"), default="http")
    parser.add_argument(
        "--max-row-seconds", type=float, default=150.0, help="skip larger N after a row this long"
    )
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    setup_django()
    with tempfile.TemporaryDirectory() as workdir:
        server, base_url, key = start_server(
            Path(workdir), port=8813, quota_minutes=1_000_000, LOG_LEVEL="ERROR", METRICS_TOKEN=METRICS_TOKEN
        )
        try:
            report = asyncio.run(
                measure(
                    base_url,
                    key,
                    args.clients,
                    seconds_of_text=args.seconds_of_text,
                    transport=args.transport,
                    max_row_seconds=args.max_row_seconds,
                )
            )
        finally:
            server.terminate()
            server.wait()
    print(f"\nPiper on {os.cpu_count()} CPU(s)")
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report_json(report), indent=2))


def report_json(report: QualityReport) -> dict[str, object]:
    return {
        "transport": report.transport,
        "seconds_of_text": report.seconds_of_text,
        "chars_per_second": report.chars_per_second,
        "raw_throughput_audio_s_per_s": report.raw_throughput,
        "capacity_streams": report.capacity,
        "capacity_ratio": round(report.capacity_ratio, 3),
        "skipped": report.skipped,
        "rows": [{**vars(r), "real_time": r.real_time} for r in report.rows],
    }


if __name__ == "__main__":
    main()
