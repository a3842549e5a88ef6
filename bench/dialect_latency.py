"""First audio of a short first sentence per streaming dialect (issue #20), next to WS /v1/stream.

    .venv/bin/python bench/dialect_latency.py [--turns 20]

Starts its own Daphne on loopback (SQLite in a temp dir, Piper), opens one authenticated
connection per dialect, and speaks the same first sentence on each, turn by turn (native,
ElevenLabs multi-stream-input, Cartesia, native, ...), so that the engine's drift on a
shared machine falls on all of them alike. Time to first audio: from sending the text (with
its end: `synthesize`; ElevenLabs' text with `flush`; Cartesia's transcript with `continue:
false`) to the first audio of that context. PCM 16 kHz everywhere. Target: each dialect
within the budget of WS /v1/stream (the same machinery: a few ms of JSON and base64 more).
`make bench` runs it as scenario 7.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from websockets.asyncio.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import percentile, setup_django, start_server

FIRST_SENTENCE = "Thanks for calling Acme Dental, this is Ava."
DIALECTS = ("WS /v1/stream", "ElevenLabs multi-stream", "Cartesia")


async def _native(ws: ClientConnection, turn: int) -> float:
    started = time.perf_counter()
    message = {
        "type": "synthesize",
        "context_id": f"n{turn}",
        "text": FIRST_SENTENCE,
        "format": "pcm",
        "sample_rate": 16000,
    }
    await ws.send(json.dumps(message))
    first = None
    while True:
        received = await ws.recv()
        if isinstance(received, bytes):
            first = first or time.perf_counter() - started
        elif (event := json.loads(received))["type"] == "audio_end":
            assert first is not None, event
            return first
        elif event["type"] == "error":
            raise RuntimeError(event)


async def _elevenlabs(ws: ClientConnection, turn: int) -> float:
    context_id = f"e{turn}"
    await ws.send(json.dumps({"text": " ", "context_id": context_id}))
    started = time.perf_counter()
    await ws.send(json.dumps({"text": FIRST_SENTENCE + " ", "context_id": context_id, "flush": True}))
    await ws.send(json.dumps({"context_id": context_id, "close_context": True}))
    first = None
    while True:
        body = json.loads(await ws.recv())
        if "error" in body:
            raise RuntimeError(body)
        if body.get("audio"):
            first = first or time.perf_counter() - started
        if body.get("isFinal"):
            assert first is not None, body
            return first


async def _cartesia(ws: ClientConnection, turn: int) -> float:
    started = time.perf_counter()
    message = {
        "context_id": f"c{turn}",
        "transcript": FIRST_SENTENCE,
        "continue": False,
        "model_id": "sonic-2",
        "voice": {"mode": "id", "id": "joe"},
        "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 16000},
        "add_timestamps": True,
    }
    await ws.send(json.dumps(message))
    first = None
    while True:
        body = json.loads(await ws.recv())
        if body["type"] == "error":
            raise RuntimeError(body)
        if body["type"] == "chunk":
            first = first or time.perf_counter() - started
        if body["type"] == "done":
            assert first is not None, body
            return first


async def dialect_first_audio(base_url: str, key: str, turns: int) -> dict[str, list[float]]:
    """Seconds to first audio per dialect, `turns` each, interleaved (after 2 warm-up turns)."""
    ws_base = base_url.replace("http://", "ws://")
    native_url = f"{ws_base}/v1/stream"
    elevenlabs_url = (
        f"{ws_base}/v1/text-to-speech/joe/multi-stream-input?output_format=pcm_16000&auto_mode=true"
    )
    cartesia_url = f"{ws_base}/tts/websocket"
    async with (
        connect(native_url, additional_headers={"Authorization": f"Bearer {key}"}, max_size=None) as native,
        connect(elevenlabs_url, additional_headers={"xi-api-key": key}, max_size=None) as elevenlabs,
        connect(cartesia_url, additional_headers={"X-API-Key": key}, max_size=None) as cartesia,
    ):
        assert json.loads(await native.recv())["type"] == "ready"
        speakers: list[tuple[str, Callable[[int], Awaitable[float]]]] = [
            (DIALECTS[0], lambda turn: _native(native, turn)),
            (DIALECTS[1], lambda turn: _elevenlabs(elevenlabs, turn)),
            (DIALECTS[2], lambda turn: _cartesia(cartesia, turn)),
        ]
        times: dict[str, list[float]] = {name: [] for name in DIALECTS}
        for turn in range(turns + 2):
            for name, speak in speakers:
                elapsed = await speak(turn)
                if turn >= 2:
                    times[name].append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=20, help="utterances per dialect")
    args = parser.parse_args()
    setup_django()
    with tempfile.TemporaryDirectory() as workdir:
        server, base_url, key = start_server(Path(workdir), quota_minutes=1_000_000, LOG_LEVEL="ERROR")
        try:
            times = asyncio.run(dialect_first_audio(base_url, key, args.turns))
        finally:
            server.terminate()
            server.wait()
    print(f"\nFirst audio of a short first sentence per dialect, Piper on {os.cpu_count()} CPU(s) (ms)\n")
    print(f"{'dialect':<26} {'n':>4} {'p50':>8} {'p95':>8} {'+p50 vs native':>15}")
    print("-" * 66)
    native_p50 = percentile(times[DIALECTS[0]], 0.5) * 1000
    for name in DIALECTS:
        p50, p95 = percentile(times[name], 0.5) * 1000, percentile(times[name], 0.95) * 1000
        print(f"{name:<26} {len(times[name]):>4} {p50:>8.1f} {p95:>8.1f} {p50 - native_p50:>+15.1f}")


if __name__ == "__main__":
    main()
