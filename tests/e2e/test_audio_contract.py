"""Audio that is what was asked (issue 18), through Daphne on every HTTP door: whole WAVs carry
their true length in their header, and text with nothing to say is a 400 `empty_text`.
(The WebSocket's side of both is in tests/api/test_stream.py.)"""

from __future__ import annotations

import io
import struct
import uuid
import wave
from collections.abc import Callable, Iterator
from typing import Any

import defusedxml.ElementTree as SafeET
import httpx
import pytest

from tests.support.servers import ServiceEnv, daphne_server

pytestmark = [pytest.mark.slow, pytest.mark.django_db]  # the server shares pytest's test database

TEXT = "Thanks for calling. Your appointment is confirmed for Tuesday at ten."
WAV_HEADER_BYTES = 44
OPEN_ENDED = 0xFFFFFFFF


@pytest.fixture(scope="module")
def server(service_env: ServiceEnv) -> Iterator[str]:
    with daphne_server(service_env()) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(server: str, module_tenant: Any) -> Iterator[httpx.Client]:
    _tenant, issued = module_tenant
    with httpx.Client(
        base_url=server, headers={"Authorization": f"Bearer {issued.plaintext}"}, timeout=60
    ) as client:
        yield client


def whole_wav_from_synthesize(client: httpx.Client, text: str) -> bytes:
    response = client.post("/v1/synthesize", json={"text": text, "format": "wav"})
    assert response.status_code == 200, response.text
    return response.content


def whole_wav_from_openai(client: httpx.Client, text: str) -> bytes:
    body = {"model": "tts-1", "input": text, "voice": "alloy", "response_format": "wav"}
    response = client.post("/v1/audio/speech", json=body)
    assert response.status_code == 200, response.text
    assert int(response.headers["Content-Length"]) == len(response.content)
    return response.content


def whole_wav_from_signed_link(client: httpx.Client, text: str) -> bytes:
    response = client.post("/v1/synthesize-url", json={"text": text, "format": "wav"})
    assert response.status_code == 200, response.text
    fetched = httpx.get(response.json()["url"], timeout=30)
    assert fetched.status_code == 200
    return fetched.content


def whole_wav_from_twiml(client: httpx.Client, text: str) -> bytes:
    response = client.post("/v1/twiml/play", json={"text": text, "format": "wav"})
    assert response.status_code == 200, response.text
    url = SafeET.fromstring(response.content).findtext("Play")
    assert url
    fetched = httpx.get(url, timeout=30)
    assert fetched.status_code == 200
    return fetched.content


WHOLE_WAV_ROUTES: dict[str, Callable[[httpx.Client, str], bytes]] = {
    "synthesize": whole_wav_from_synthesize,
    "audio-speech": whole_wav_from_openai,
    "synthesize-url": whole_wav_from_signed_link,
    "twiml-play": whole_wav_from_twiml,
}


@pytest.mark.parametrize("route", list(WHOLE_WAV_ROUTES))
def test_every_whole_wav_tells_wave_its_true_length(client: httpx.Client, route: str) -> None:
    # A fresh text per route: the phrase cache must not answer with another route's file.
    data = WHOLE_WAV_ROUTES[route](client, f"{TEXT} Reference {uuid.uuid4().hex[:4]}.")
    assert struct.unpack_from("<I", data, 40)[0] != OPEN_ENDED
    # The audio as the bytes after the header count it, whatever the header says.
    samples = (len(data) - WAV_HEADER_BYTES) // 2
    with wave.open(io.BytesIO(data)) as handle:
        rate = handle.getframerate()
        assert (handle.getnchannels(), handle.getsampwidth()) == (1, 2)
        assert handle.getnframes() == samples
        assert len(handle.readframes(handle.getnframes())) == samples * 2
    assert 2.0 < samples / rate < 15.0


def test_only_a_streamed_wav_has_the_open_ended_header(client: httpx.Client) -> None:
    streamed = client.post("/v1/synthesize", json={"text": TEXT, "format": "wav", "streaming": True})
    assert streamed.status_code == 200
    assert struct.unpack_from("<I", streamed.content, 40)[0] == OPEN_ENDED
    sse = client.post(
        "/v1/audio/speech",
        json={"model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": "pcm"},
    )
    assert sse.status_code == 200
    assert "Content-Length" not in sse.headers  # pcm on OpenAI's route still streams


NOTHING_TO_SAY = ["...!!!???", "  ,,, ", "<speak><break time='500ms'/><p>!?</p></speak>", "\U0001f600"]


@pytest.mark.parametrize("text", NOTHING_TO_SAY)
@pytest.mark.parametrize(
    ("path", "extra"),
    [
        ("/v1/synthesize", {}),
        ("/v1/synthesize", {"streaming": True, "format": "mp3"}),
        ("/v1/synthesize-url", {}),
        ("/v1/twiml/play", {}),
    ],
)
def test_text_with_nothing_to_say_is_a_400_empty_text(
    client: httpx.Client, path: str, extra: dict[str, Any], text: str
) -> None:
    response = client.post(path, json={"text": text, **extra})
    assert response.status_code == 400, response.content[:100]
    assert response.json()["error"]["code"] == "empty_text"
    assert response.headers["X-Request-ID"]


@pytest.mark.parametrize("text", NOTHING_TO_SAY)
@pytest.mark.parametrize("response_format", ["mp3", "wav"])
def test_openai_speech_with_nothing_to_say_is_an_openai_shaped_400(
    client: httpx.Client, text: str, response_format: str
) -> None:
    body = {"model": "tts-1", "input": text, "voice": "alloy", "response_format": response_format}
    response = client.post("/v1/audio/speech", json=body)
    assert response.status_code == 400, response.content[:100]
    error = response.json()["error"]
    assert (error["code"], error["type"]) == ("empty_text", "invalid_request_error")
    assert response.headers["X-Request-ID"]
