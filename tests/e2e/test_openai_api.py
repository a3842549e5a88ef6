"""POST /v1/audio/speech through Daphne, driven by the official `openai` package."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import miniaudio
import numpy as np
import openai
import pytest
import soundfile

from tests.support.servers import ServiceEnv, daphne_server
from tests.support.tenants import bearer, committed_tenant
from usage.models import UsageLog

pytestmark = [pytest.mark.slow, pytest.mark.django_db]  # the servers share pytest's test database
TEXT = "Thanks for calling. Your appointment is confirmed for Tuesday at ten."


@pytest.fixture(scope="module")
def server(service_env: ServiceEnv) -> Iterator[str]:
    with daphne_server(service_env(OPENAI_VOICE_MAP="alloy=joe")) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server: str, module_tenant: Any) -> openai.OpenAI:
    _tenant, issued = module_tenant
    return openai.OpenAI(api_key=issued.plaintext, base_url=f"{server}/v1", max_retries=0)


def decoded_seconds(data: bytes, response_format: str) -> float:
    if response_format == "pcm":
        return len(np.frombuffer(data, dtype="<i2")) / 24000
    if response_format == "mp3":
        info = miniaudio.mp3_read_f32(data)
        return float(len(info.samples) / info.sample_rate)
    if response_format == "flac":
        info = miniaudio.flac_read_f32(data)
        return float(len(info.samples) / info.sample_rate)
    if response_format == "aac":
        import av

        with av.open(io.BytesIO(data), mode="r", format="aac") as container:
            return float(sum(frame.samples for frame in container.decode(audio=0))) / 24000
    audio, rate = soundfile.read(io.BytesIO(data))  # wav, opus (Ogg)
    return float(len(audio) / rate)


@pytest.mark.parametrize("response_format", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_every_format_comes_back_as_decodable_audio(client: openai.OpenAI, response_format: str) -> None:
    response = client.audio.speech.create(
        model="gpt-4o-mini-tts",
        voice="alloy",
        input=TEXT,
        response_format=response_format,  # type: ignore[arg-type]
        instructions="Speak warmly.",
    )
    data = response.read()
    assert 2.0 < decoded_seconds(data, response_format) < 8.0


def test_the_default_format_is_mp3_and_models_and_voices_map(client: openai.OpenAI) -> None:
    for model, voice in (("tts-1", "nova"), ("tts-1-hd", "joe")):
        response = client.audio.speech.create(model=model, voice=voice, input="Hello.")
        assert response.response.headers["Content-Type"] == "audio/mpeg"
        assert decoded_seconds(response.read(), "mp3") > 0.3


def test_with_streaming_response_streams_audio_as_it_is_made(client: openai.OpenAI) -> None:
    long_text = " ".join(f"Sentence {n} of a longer answer." for n in range(20))
    chunks = []
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=long_text, response_format="pcm"
    ) as response:
        for chunk in response.iter_bytes():
            chunks.append(chunk)
    assert len(chunks) > 3
    assert decoded_seconds(b"".join(chunks), "pcm") > 10


def test_a_bad_key_raises_authentication_error(server: str) -> None:
    bad = openai.OpenAI(api_key="cwt_nothing_here", base_url=f"{server}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        bad.audio.speech.create(model="tts-1", voice="alloy", input="Hi.")
    assert raised.value.code == "invalid_api_key"
    assert raised.value.body["type"] == "authentication_error"  # type: ignore[index]


def test_bad_input_raises_bad_request_naming_the_parameter(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.audio.speech.create(model="tts-1", voice="alloy", input="Hi.", response_format="ogg")  # type: ignore[arg-type]
    assert (raised.value.code, raised.value.param) == ("unsupported_format", "response_format")
    with pytest.raises(openai.BadRequestError) as too_long:
        client.audio.speech.create(model="tts-1", voice="alloy", input="x" * 4097)
    assert too_long.value.param == "input"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.audio.speech.create(model="tts-1", voice="nobody-here", input="Hi.")
    assert unknown.value.code == "voice_not_found"


@pytest.mark.django_db(transaction=True)
def test_over_the_limit_raises_rate_limit_error(server: str, django_db_blocker: Any) -> None:
    with committed_tenant(django_db_blocker, "openai-limit", rate_limit_minute=1, rate_limit_hour=0) as (
        _t,
        issued,
    ):
        limited = openai.OpenAI(api_key=issued.plaintext, base_url=f"{server}/v1", max_retries=0)
        limited.audio.speech.create(model="tts-1", voice="alloy", input="One.").read()
        with pytest.raises(openai.RateLimitError) as raised:
            limited.audio.speech.create(model="tts-1", voice="alloy", input="Two.")
        assert raised.value.code == "rate_limited"
        assert int(raised.value.response.headers["Retry-After"]) > 0


@pytest.mark.django_db(transaction=True)
def test_sse_events_parse_and_their_audio_decodes(server: str, django_db_blocker: Any) -> None:
    limits = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0, "max_concurrent_streams": 0}
    with committed_tenant(django_db_blocker, "openai-sse", **limits) as (tenant, issued):
        body = {
            "model": "gpt-4o-mini-tts",
            "input": TEXT,
            "voice": {"id": "joe"},
            "response_format": "pcm",
            "stream_format": "sse",
        }
        events = []
        with httpx.stream(
            "POST", f"{server}/v1/audio/speech", json=body, headers=bearer(issued.plaintext), timeout=60
        ) as response:
            assert response.status_code == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            for line in response.iter_lines():
                if line:
                    assert line.startswith("data: ")
                    events.append(json.loads(line.removeprefix("data: ")))
        *deltas, done = events
        assert deltas
        assert {event["type"] for event in deltas} == {"speech.audio.delta"}
        audio = b"".join(base64.b64decode(event["audio"]) for event in deltas)
        seconds = decoded_seconds(audio, "pcm")
        assert seconds > 2
        assert done["type"] == "speech.audio.done"
        usage = done["usage"]
        assert usage["output_tokens"] == pytest.approx(seconds * 50, abs=1)
        assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]

        # metered like every synthesis: the row counts the audio, not the base64 text
        import time

        deadline = time.monotonic() + 10
        while True:
            with django_db_blocker.unblock():
                rows = list(UsageLog.objects.filter(tenant=tenant))
            if rows or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        [row] = rows
        assert (row.endpoint, row.status_code, row.format, row.voice_id) == (
            "audio-speech",
            200,
            "pcm",
            "joe",
        )
        assert row.audio_bytes == len(audio)
        assert row.input_chars == len(TEXT)
