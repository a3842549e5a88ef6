"""Output bounded by input (issue 17, finding 8), through Daphne on every door: SSML break
time, nested prosody, JSON nesting, and the audio a request may make.

The server runs with MAX_AUDIO_SECONDS_PER_REQUEST at 8 s, so that the estimate's refusal
and the encoder's backstop are both reached with short texts.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.conf import settings
from websockets.asyncio.client import connect

from synthesis.audio import OutputSpec
from synthesis.stream.protocol import parse_labelled_frame
from tests.support.audio import decode
from tests.support.servers import ServiceEnv, daphne_server
from tests.support.waiting import wait_until
from usage.models import UsageLog

pytestmark = [pytest.mark.slow, pytest.mark.django_db]  # the server shares pytest's test database

MAX_AUDIO_SECONDS = 8.0
# Issue 17's flood: 5.5 KB as JSON, 2,600 s (43 minutes) of silence asked for.
BREAK_FLOOD = "<speak>Hold on." + '<break time="10s"/>' * 260 + "</speak>"
# OpenAI's `input` is at most 4,096 characters: 2,000 s of it.
OPENAI_BREAK_FLOOD = "<speak>Hold on." + '<break time="10s"/>' * 200 + "</speak>"
# On a WebSocket, text is spoken a piece at a time (up to a clause end or a newline): a flood
# in pieces, each within the limits alone (3.3 s by the estimate), over 8 s by the third.
FLOOD_PIECE = '<speak>Hold on.<break time="3s"/></speak>\n'
NESTED_SLOW = "<speak>" + '<prosody rate="25%">' * 3 + "Hi." + "</prosody>" * 3 + "</speak>"
ONE_SLOW = '<speak><prosody rate="25%">Hi.</prosody></speak>'
DEEP_JSON = "[" * 100_000 + "]" * 100_000
# Digits are read out at about 4 characters a second, far slower than the estimate's 25: this
# text passes admission (about 3 s by the estimate) and makes about 18 s of audio.
UNDERESTIMATED = "Your code is 98765 43210 12345 67890. " * 2


@pytest.fixture(scope="module")
def server(service_env: ServiceEnv) -> Iterator[str]:
    env = service_env(REDIS_URL=settings.REDIS_URL, MAX_AUDIO_SECONDS_PER_REQUEST=str(MAX_AUDIO_SECONDS))
    with daphne_server(env) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server: str, module_tenant: Any) -> Iterator[httpx.Client]:
    _tenant, issued = module_tenant
    with httpx.Client(
        base_url=server, headers={"Authorization": f"Bearer {issued.plaintext}"}, timeout=60
    ) as client:
        yield client


def usage_row(django_db_blocker: Any, request_id: str) -> UsageLog:
    def row() -> UsageLog | None:
        with django_db_blocker.unblock():
            return UsageLog.objects.filter(request_id=request_id).first()

    wait_until(lambda: row() is not None, what=f"the usage row of {request_id}")
    found = row()
    assert found is not None
    return found


def speech(text: str, **fields: Any) -> dict[str, Any]:
    return {"model": "tts-1", "input": text, "voice": {"id": "joe"}, "response_format": "wav", **fields}


async def stream(
    server: str, key: str, *messages: dict[str, Any] | str, until: str = "audio_end"
) -> tuple[list[dict[str, Any]], bytes]:
    """Send `messages` on a new connection; the events and audio received up to an `until` event."""
    url = server.replace("http://", "ws://") + "/v1/stream"
    events: list[dict[str, Any]] = []
    audio = b""
    async with connect(url, additional_headers={"Authorization": f"Bearer {key}"}, max_size=None) as ws:
        assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "ready"
        for message in messages:
            await ws.send(message if isinstance(message, str) else json.dumps(message))
        while not events or events[-1]["type"] != until:
            received = await asyncio.wait_for(ws.recv(), 60)
            if isinstance(received, bytes):
                audio += parse_labelled_frame(received)[1]
            else:
                events.append(json.loads(received))
    return events, audio


def synthesize(text: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": "synthesize",
        "context_id": "u",
        "text": text,
        "format": "pcm",
        "sample_rate": 24000,
        **fields,
    }


def test_the_break_flood_is_a_400_before_any_audio_on_every_door(
    server: str, client: httpx.Client, module_tenant: Any, django_db_blocker: Any
) -> None:
    for streaming in (False, True):
        response = client.post("/v1/synthesize", json={"text": BREAK_FLOOD, "streaming": streaming})
        assert response.status_code == 400, response.text[:200]
        assert response.json()["error"]["code"] == "ssml_break_too_long"
        row = usage_row(django_db_blocker, response.headers["X-Request-ID"])
        assert (row.status_code, row.error_code, row.audio_bytes) == (400, "ssml_break_too_long", 0)

    response = client.post("/v1/audio/speech", json=speech(OPENAI_BREAK_FLOOD))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "ssml_break_too_long"
    assert response.json()["error"]["type"] == "invalid_request_error"  # OpenAI's shape
    assert usage_row(django_db_blocker, response.headers["X-Request-ID"]).audio_bytes == 0

    # A WebSocket utterance: the flood as one piece; then a flood in pieces, whose estimates
    # add up per utterance (the pieces within the limit are spoken; the one that overdraws
    # ends the utterance before its audio is made).
    _tenant, issued = module_tenant
    events, audio = asyncio.run(stream(server, issued.plaintext, synthesize(BREAK_FLOOD + "\n")))
    assert [event["type"] for event in events] == ["error", "audio_end"]
    assert events[0]["code"] == "ssml_break_too_long"
    assert audio == b""
    assert events[1]["audio_bytes"] == 0
    row = usage_row(django_db_blocker, events[0]["request_id"])
    assert (row.status_code, row.error_code, row.audio_bytes) == (400, "ssml_break_too_long", 0)

    pieces = [{"type": "text", "context_id": "u", "text": FLOOD_PIECE} for _ in range(100)]
    start = {"type": "start", "context_id": "u", "format": "pcm", "sample_rate": 24000}
    events, audio = asyncio.run(stream(server, issued.plaintext, start, *pieces))
    assert events[-2]["code"] == "audio_too_long"
    assert len(audio) / 2 / 24000 < MAX_AUDIO_SECONDS  # two pieces at most


def test_nested_prosody_is_no_slower_than_one_clamped_rate(client: httpx.Client) -> None:
    spec = OutputSpec.parse("wav", 24000)

    def seconds(text: str, speed: float) -> float:
        response = client.post("/v1/synthesize", json={"text": text, "speed": speed})
        assert response.status_code == 200, response.text
        return len(decode(response.content, spec)) / spec.sample_rate

    nested = seconds(NESTED_SLOW, 0.25)  # 0.25 * 0.25 ** 3 asked for; 0.25 spoken
    assert 0.5 < nested <= seconds(ONE_SLOW, 1.0) + 0.05


def test_deep_json_is_a_400_with_its_code_and_the_server_carries_on(
    server: str, client: httpx.Client, module_tenant: Any
) -> None:
    headers = {"Content-Type": "application/json"}
    response = client.post("/v1/synthesize", content=DEEP_JSON, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "nesting_too_deep"
    response = client.post("/v1/audio/speech", content=DEEP_JSON, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "nesting_too_deep"
    _tenant, issued = module_tenant
    deep_message = '{"type": "synthesize", "x": ' + "[" * 30_000 + "]" * 30_000 + "}"  # within 64 KiB
    events, _audio = asyncio.run(stream(server, issued.plaintext, deep_message, until="error"))
    assert events[-1]["code"] == "nesting_too_deep"

    assert httpx.get(f"{server}/v1/health", timeout=5).status_code == 200
    assert client.post("/v1/synthesize", json={"text": "Still here."}).status_code == 200


def test_a_text_whose_estimate_is_over_the_limit_is_a_400_before_any_audio(
    client: httpx.Client, django_db_blocker: Any
) -> None:
    text = "Please hold while I look that up for you. " * 6  # about 10 s by the estimate
    assert client.post("/v1/synthesize", json={"text": text, "speed": 4.0}).status_code == 200
    for path, body in (
        ("/v1/synthesize", {"text": text}),
        ("/v1/synthesize", {"text": text, "streaming": True}),
        ("/v1/audio/speech", speech(text, speed=0.5)),
    ):
        response = client.post(path, json=body)
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["code"] == "audio_too_long"
        assert usage_row(django_db_blocker, response.headers["X-Request-ID"]).audio_bytes == 0


def test_audio_past_the_limit_stops_there_whatever_the_estimate_said(
    server: str, client: httpx.Client, module_tenant: Any, django_db_blocker: Any
) -> None:
    spec = OutputSpec.parse("wav", 24000)
    # A whole file over the limit: no answer has gone out yet, so it is refused.
    whole = client.post("/v1/synthesize", json={"text": UNDERESTIMATED})
    assert whole.status_code == 400
    assert whole.json()["error"]["code"] == "audio_too_long"

    # A stream: its 200 has gone out; it ends cleanly at the limit, its row says why.
    streamed = client.post("/v1/synthesize", json={"text": UNDERESTIMATED, "streaming": True})
    assert streamed.status_code == 200
    seconds = len(decode(streamed.content, spec)) / spec.sample_rate
    assert MAX_AUDIO_SECONDS - 0.5 < seconds <= MAX_AUDIO_SECONDS + 0.05
    row = usage_row(django_db_blocker, streamed.headers["X-Request-ID"])
    assert (row.status_code, row.error_code) == (200, "audio_too_long")
    assert row.audio_seconds == pytest.approx(seconds, abs=0.1)

    # A WebSocket utterance: the audio up to the limit, then its error and its audio_end.
    _tenant, issued = module_tenant
    events, audio = asyncio.run(stream(server, issued.plaintext, synthesize(UNDERESTIMATED)))
    assert [event["type"] for event in events] == ["audio_start", "error", "audio_end"]
    assert events[1]["code"] == "audio_too_long"
    assert MAX_AUDIO_SECONDS - 0.5 < len(audio) / 2 / 24000 <= MAX_AUDIO_SECONDS + 0.05
