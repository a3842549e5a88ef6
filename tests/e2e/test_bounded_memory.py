"""10,000 characters without one punctuation mark, through every door of a real Daphne with
Piper: the process's peak memory stays within a fixed bound, every word is spoken, and each
request leaves one usage row that counts all of its text and the audio it sent.

Piper renders a sentence in one pass and its memory grows with the sentence: unsplit, 4,980
characters of "hello " were killed at a 4 GiB cap and reached 17 GB uncapped. The text path
splits long unpunctuated runs at word boundaries (then at a hard bound) before the engine.

The peak is the kernel's own high-water mark (VmHWM), reset to the current size before each
door (`/proc/<pid>/clear_refs`), so each door is measured alone, in any order, on whatever
machine; memory is not time, so a loaded machine measures the same.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
import pytest
from django.conf import settings
from websockets.asyncio.client import ClientConnection, connect

from synthesis.stream.protocol import parse_labelled_frame
from tests.support.servers import ServiceEnv, daphne_process
from tests.support.tenants import bearer, committed_tenant
from tests.support.waiting import wait_until
from usage.models import UsageLog

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

TEXT_CHARS = 10_000
# OpenAI's own limit on `input`, which its dialect keeps.
OPENAI_INPUT_CHARS = 4096
_WORDS = [
    "please",
    "hold",
    "while",
    "we",
    "check",
    "the",
    "booking",
    "for",
    "your",
    "table",
    "tonight",
    "and",
    "the",
    "time",
    "you",
    "asked",
    "for",
]


def unpunctuated(chars: int) -> str:
    words: list[str] = []
    length = -1
    while length + 1 + len(_WORDS[len(words) % len(_WORDS)]) <= chars:
        word = _WORDS[len(words) % len(_WORDS)]
        words.append(word)
        length += 1 + len(word)
    return " ".join(words)


TEXT = unpunctuated(TEXT_CHARS)
OPENAI_TEXT = unpunctuated(OPENAI_INPUT_CHARS)
# How far one such request may raise the process's peak. What it measures is one engine pass
# per scheduler worker (two here), each at most MAX_SEGMENT_CHARS: 1,000 characters raised
# the peak by 142-216 MiB, 10,000 by 0-303 MiB (the most on a process's first long
# request), so the peak does not grow with the text. Unsplit, 600 characters took 811 MiB
# and 5,000 some 17 GB.
PEAK_GROWTH_MAX_BYTES = 512 * 1024 * 1024
# Every word is spoken: well under Piper's pace (about 0.3 s a word here), far over silence.
MIN_SECONDS_PER_WORD = 0.1
# A piece of text per socket message, as an agent's LLM sends it.
PIECE_CHARS = 400
READ_TIMEOUT_S = 600


def _kib_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def reset_peak(pid: int) -> int:
    """Reset the process's high-water mark to its current size, and return that size."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _kib_field(pid, "VmRSS")


def peak(pid: int) -> int:
    return _kib_field(pid, "VmHWM")


def pieces(text: str) -> list[str]:
    """The text cut into pieces of about PIECE_CHARS, each ending with its space."""
    words = text.split(" ")
    out: list[str] = []
    current = ""
    for word in words:
        current += word + " "
        if len(current) >= PIECE_CHARS:
            out.append(current)
            current = ""
    if current:
        out.append(current)
    return out


# --- the doors: each speaks `text` for a key and returns the seconds of audio it got ---

Door = Callable[[str, str, str], Coroutine[Any, Any, float]]


async def streamed_body(url: str, body: dict[str, Any], headers: dict[str, str]) -> bytes:
    """A POST's streamed answer, read as it comes."""
    async with (
        httpx.AsyncClient(timeout=READ_TIMEOUT_S) as client,
        client.stream("POST", url, json=body, headers=headers) as response,
    ):
        assert response.status_code == 200, await response.aread()
        return b"".join([chunk async for chunk in response.aiter_bytes()])


async def native_http_stream(base_url: str, key: str, text: str) -> float:
    body = {"text": text, "format": "pcm", "sample_rate": 8000, "streaming": True}
    return len(await streamed_body(f"{base_url}/v1/synthesize", body, bearer(key))) / 2 / 8000


async def native_http_whole(base_url: str, key: str, text: str) -> float:
    body = {"text": text, "format": "pcm", "sample_rate": 8000}
    async with httpx.AsyncClient(timeout=READ_TIMEOUT_S) as client:
        response = await client.post(f"{base_url}/v1/synthesize", json=body, headers=bearer(key))
    assert response.status_code == 200, response.text
    return len(response.content) / 2 / 8000


async def _stored_audio(
    base_url: str, key: str, text: str, route: str, url_of: Callable[[bytes], str]
) -> float:
    """The audio of a route that answers where to fetch it."""
    body = {"text": text, "format": "pcm", "sample_rate": 8000}
    async with httpx.AsyncClient(timeout=READ_TIMEOUT_S) as client:
        answer = await client.post(f"{base_url}{route}", json=body, headers=bearer(key))
        assert answer.status_code == 200, answer.text
        audio = await client.get(url_of(answer.content))
    assert audio.status_code == 200
    return len(audio.content) / 2 / 8000


def _play_url(twiml: bytes) -> str:
    (play,) = list(ElementTree.fromstring(twiml))  # noqa: S314  (our own server's answer)
    return play.text or ""


async def synthesize_url(base_url: str, key: str, text: str) -> float:
    return await _stored_audio(
        base_url, key, text, "/v1/synthesize-url", lambda answer: json.loads(answer)["url"]
    )


async def twiml_play(base_url: str, key: str, text: str) -> float:
    return await _stored_audio(base_url, key, text, "/v1/twiml/play", _play_url)


async def openai_speech(base_url: str, key: str, text: str) -> float:
    body = {"model": "tts-1", "voice": "alloy", "input": text, "response_format": "pcm"}
    audio = await streamed_body(f"{base_url}/v1/audio/speech", body, bearer(key))
    return len(audio) / 2 / 24000  # OpenAI's pcm is 24 kHz


async def _elevenlabs_http(base_url: str, key: str, text: str, suffix: str) -> bytes:
    url = f"{base_url}/v1/text-to-speech/joe{suffix}?output_format=pcm_16000"
    return await streamed_body(url, {"text": text, "model_id": "eleven_flash_v2_5"}, {"xi-api-key": key})


async def elevenlabs_http(base_url: str, key: str, text: str) -> float:
    return len(await _elevenlabs_http(base_url, key, text, "")) / 2 / 16000


async def elevenlabs_http_stream(base_url: str, key: str, text: str) -> float:
    return len(await _elevenlabs_http(base_url, key, text, "/stream")) / 2 / 16000


async def elevenlabs_http_with_timestamps(base_url: str, key: str, text: str) -> float:
    raw = await _elevenlabs_http(base_url, key, text, "/stream/with-timestamps")
    lines = [json.loads(line) for line in raw.decode().splitlines() if line]
    audio = b"".join(base64.b64decode(line["audio_base64"]) for line in lines)
    return len(audio) / 2 / 16000


def _ws_url(base_url: str, path: str) -> str:
    return base_url.replace("http://", "ws://") + path


async def _recv(ws: ClientConnection) -> str | bytes:
    return await asyncio.wait_for(ws.recv(), READ_TIMEOUT_S)


async def native_socket(base_url: str, key: str, text: str) -> float:
    async with connect(_ws_url(base_url, "/v1/stream"), additional_headers=bearer(key), max_size=None) as ws:
        body = {
            "type": "synthesize",
            "context_id": "long",
            "text": text,
            "format": "pcm",
            "sample_rate": 8000,
        }
        await ws.send(json.dumps(body))
        received = 0
        while True:
            message = await _recv(ws)
            if isinstance(message, bytes):
                received += len(parse_labelled_frame(message)[1])
                continue
            event = json.loads(message)
            assert event["type"] != "error", event
            if event["type"] == "audio_end":
                return received / 2 / 8000


async def elevenlabs_socket(base_url: str, key: str, text: str) -> float:
    url = _ws_url(base_url, "/v1/text-to-speech/joe/multi-stream-input?output_format=pcm_16000")
    async with connect(url, additional_headers={"xi-api-key": key}, max_size=None) as ws:
        await ws.send(json.dumps({"text": " ", "context_id": "long"}))
        for piece in pieces(text):
            await ws.send(json.dumps({"text": piece, "context_id": "long"}))
        await ws.send(json.dumps({"context_id": "long", "flush": True}))
        await ws.send(json.dumps({"context_id": "long", "close_context": True}))
        audio = b""
        while True:
            body = json.loads(await _recv(ws))
            assert "error" not in body, body
            if body.get("isFinal"):
                return len(audio) / 2 / 16000
            if body.get("audio"):
                audio += base64.b64decode(body["audio"])


async def cartesia_socket(base_url: str, key: str, text: str) -> float:
    headers = {"X-API-Key": key, "Cartesia-Version": "2025-04-16"}
    async with connect(_ws_url(base_url, "/tts/websocket"), additional_headers=headers, max_size=None) as ws:
        parts = pieces(text)
        for index, piece in enumerate(parts):
            request = {
                "context_id": "long",
                "transcript": piece,
                "continue": index < len(parts) - 1,
                "model_id": "sonic-2",
                "voice": {"mode": "id", "id": "joe"},
                "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 16000},
            }
            await ws.send(json.dumps(request))
        received = 0
        while True:
            body = json.loads(await _recv(ws))
            assert body["type"] != "error", body
            if body["type"] == "chunk":
                received += len(base64.b64decode(body["data"]))
            if body.get("done"):
                return received / 2 / 16000


DOORS: dict[str, tuple[Door, str]] = {
    "synthesize-stream": (native_http_stream, TEXT),
    "synthesize-whole": (native_http_whole, TEXT),
    "synthesize-url": (synthesize_url, TEXT),
    "twiml-play": (twiml_play, TEXT),
    "openai-speech": (openai_speech, OPENAI_TEXT),
    "elevenlabs-http": (elevenlabs_http, TEXT),
    "elevenlabs-http-stream": (elevenlabs_http_stream, TEXT),
    "elevenlabs-http-with-timestamps": (elevenlabs_http_with_timestamps, TEXT),
    "native-socket": (native_socket, TEXT),
    "elevenlabs-socket": (elevenlabs_socket, TEXT),
    "cartesia-socket": (cartesia_socket, TEXT),
}


UNLIMITED = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0, "max_concurrent_streams": 0}


@pytest.fixture(scope="module")
def server(service_env: ServiceEnv, django_db_blocker: Any) -> Iterator[tuple[int, str]]:
    env = service_env(
        REDIS_URL=settings.REDIS_URL, MAX_TEXT_CHARS=str(TEXT_CHARS), MAX_AUDIO_SECONDS_PER_REQUEST="1800"
    )
    with daphne_process(env) as (process, base_url):
        # Every door once with a short text first: the engine's model, the encoders and each
        # route's code are loaded before any door is measured, so a peak is the request's own.
        with committed_tenant(django_db_blocker, "long-warm", **UNLIMITED) as (_tenant, issued):
            for speak, _text in DOORS.values():
                asyncio.run(speak(base_url, issued.plaintext, "please hold while we check "))
        yield process.pid, base_url


def _rows(django_db_blocker: Any, tenant: Any) -> list[UsageLog]:
    with django_db_blocker.unblock():
        return list(UsageLog.objects.filter(tenant=tenant))


@pytest.mark.timeout(900)
@pytest.mark.parametrize("door", DOORS)
def test_ten_thousand_unpunctuated_characters_hold_bounded_memory_and_are_all_spoken(
    door: str, server: tuple[int, str], django_db_blocker: Any
) -> None:
    pid, base_url = server
    speak, text = DOORS[door]
    assert not any(mark in text for mark in ".,;:!?")
    with committed_tenant(django_db_blocker, f"long-{door}", **UNLIMITED) as (tenant, issued):
        before = reset_peak(pid)
        seconds = asyncio.run(speak(base_url, issued.plaintext, text))
        growth = peak(pid) - before
        words = len(text.split())
        assert growth <= PEAK_GROWTH_MAX_BYTES, f"{door}: the process grew by {growth / 2**20:.0f} MiB"
        assert seconds >= MIN_SECONDS_PER_WORD * words, f"{door}: {seconds:.1f} s of audio for {words} words"

        wait_until(lambda: len(_rows(django_db_blocker, tenant)) == 1, what=f"{door}'s usage row")
        (row,) = _rows(django_db_blocker, tenant)
        assert (row.status_code, row.error_code) == (200, None)
        # All of the text (the socket doors send a space more, to open or to end).
        assert len(text) <= row.input_chars <= len(text) + 2, "the row counts all of the text"
        assert row.audio_seconds == pytest.approx(seconds, abs=0.05), "the row counts the audio sent"
        print(f"{door}: {len(text)} chars, {seconds:.0f} s of audio, peak growth {growth / 2**20:.1f} MiB")
