"""POST /v1/synthesize end to end: a real Daphne, the real Piper engine, real decoders.

Piper runs with its noise scales at 0 here, which makes it deterministic, so
that streamed and non-streamed audio can be compared sample for sample.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile

from synthesis.audio import SAMPLE_RATES, AudioFormat, OutputSpec
from tests.support.audio import decode
from tests.support.servers import ServiceEnv, daphne_server
from tests.support.waiting import wait_until
from usage.models import UsageLog

# django_db makes pytest-django create the test database these servers share.
pytestmark = [pytest.mark.slow, pytest.mark.django_db]
SHORT_TEXT = "Hello, this is CallWaiting. How can I help you today?"
LONG_TEXT = " ".join(f"This is sentence number {n} of a long answer that goes on." for n in range(60))


@pytest.fixture(scope="module")
def piper_server(service_env: ServiceEnv) -> Iterator[str]:
    with daphne_server(service_env()) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(piper_server: str, module_tenant: Any) -> Iterator[httpx.Client]:
    _tenant, issued = module_tenant
    with httpx.Client(
        base_url=piper_server, headers={"Authorization": f"Bearer {issued.plaintext}"}, timeout=60
    ) as client:
        yield client


def synthesize(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post("/v1/synthesize", json={"text": SHORT_TEXT, **body})


FORMAT_CASES = [
    (fmt.value, rate)
    for fmt in AudioFormat
    if fmt is not AudioFormat.MULAW
    for rate in SAMPLE_RATES
    if not (fmt is AudioFormat.OPUS and rate in (22050, 44100))
] + [("mulaw", 8000)]


@pytest.mark.parametrize(("audio_format", "rate"), FORMAT_CASES)
def test_every_format_and_rate_streams_and_downloads_as_valid_audio(
    client: httpx.Client, audio_format: str, rate: int
) -> None:
    spec = OutputSpec.parse(audio_format, rate)
    whole = synthesize(client, format=audio_format, sample_rate=rate)
    assert whole.status_code == 200, whole.text
    assert whole.headers["Content-Type"] == spec.content_type
    assert int(whole.headers["Content-Length"]) == len(whole.content)
    duration = float(whole.headers["X-Audio-Duration"])
    assert 2.0 < duration < 6.0

    streamed = synthesize(client, format=audio_format, sample_rate=rate, streaming=True)
    assert streamed.status_code == 200, streamed.text
    assert "Content-Length" not in streamed.headers
    for body in (whole.content, streamed.content):
        audio = decode(body, spec)
        assert abs(len(audio) / spec.sample_rate - duration) < 0.35
        assert np.abs(audio).max() > 0.05


@pytest.mark.parametrize("audio_format", ["wav", "pcm"])
def test_streamed_and_non_streamed_audio_are_sample_identical(
    client: httpx.Client, audio_format: str
) -> None:
    text = "First sentence, with a clause. Second sentence! And a third one, to be sure."
    spec = OutputSpec.parse(audio_format, None)
    whole = decode(synthesize(client, text=text, format=audio_format).content, spec)
    streamed = decode(synthesize(client, text=text, format=audio_format, streaming=True).content, spec)
    np.testing.assert_array_equal(streamed, whole)


def test_streamed_response_arrives_in_several_chunks_before_the_end(client: httpx.Client) -> None:
    arrivals = []
    with client.stream(
        "POST", "/v1/synthesize", json={"text": LONG_TEXT[:1500], "streaming": True}
    ) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            arrivals.append((time.monotonic(), len(chunk)))
    assert len(arrivals) > 5
    first, last = arrivals[0][0], arrivals[-1][0]
    assert last - first > 0.2  # audio kept coming after the first bytes left


def test_non_streamed_wav_has_exact_headers(client: httpx.Client) -> None:
    response = synthesize(client)
    with soundfile.SoundFile(io.BytesIO(response.content)) as handle:
        assert handle.samplerate == 24000
        assert handle.channels == 1
        assert handle.subtype == "PCM_16"
        assert handle.frames / 24000 == pytest.approx(float(response.headers["X-Audio-Duration"]), abs=0.001)


@pytest.mark.parametrize("audio_format", [member.value for member in AudioFormat])
def test_a_whole_file_decodes_to_exactly_its_stated_duration_in_every_format(
    client: httpx.Client, audio_format: str
) -> None:
    spec = OutputSpec.parse(audio_format, None)
    response = synthesize(client, text="Your table for two is booked.", format=audio_format)
    assert response.status_code == 200, response.text
    decoded_seconds = len(decode(response.content, spec)) / spec.sample_rate
    # AAC said the speech's length and decoded up to 85 ms longer (its priming and padding).
    assert decoded_seconds == pytest.approx(float(response.headers["X-Audio-Duration"]), abs=0.001)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"text": ""}, 400, "empty_text"),
        ({"text": "   \n "}, 400, "empty_text"),
        ({"text": "a" * 5001}, 413, "text_too_long"),
        ({"text": "Hi.", "voice_id": "nobody"}, 404, "voice_not_found"),
        ({"text": "Hi.", "format": "aiff"}, 400, "unsupported_format"),
        ({"text": "Hi.", "sample_rate": 11025}, 400, "unsupported_sample_rate"),
        ({"text": "Hi.", "format": "mulaw", "sample_rate": 24000}, 400, "unsupported_sample_rate"),
        ({"text": "Hi.", "speed": 10}, 400, "invalid_speed"),
        ({"text": "Hi.", "language": "xx"}, 400, "unsupported_language"),
        ({"text": "Hi.", "language": "fr-US"}, 400, "unsupported_language"),
        ({"text": "<speak><p>oops</speak>"}, 400, "invalid_ssml"),
        ({"voice_id": "joe"}, 400, "invalid_request"),
        ({"text": "Hi.", "sample_rate": "fast"}, 400, "invalid_request"),
        ({"text": 42}, 400, "invalid_request"),
        ({"text": "Hi.", "streaming": "yes"}, 400, "invalid_request"),
        ({"text": "Hi.", "speed": True}, 400, "invalid_request"),
        ({"text": "Hi.", "voice_id": ["joe"]}, 400, "invalid_request"),
    ],
)
def test_bad_requests_get_a_clear_error(
    client: httpx.Client, body: dict[str, Any], status: int, code: str
) -> None:
    response = client.post("/v1/synthesize", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == response.headers["X-Request-ID"]


@pytest.mark.parametrize("language", ["en", "EN", "en-US", "en_US", "en-us", "en-GB", "en-Latn-US"])
def test_any_form_of_a_language_tag_the_voice_speaks_is_accepted(client: httpx.Client, language: str) -> None:
    response = client.post("/v1/synthesize", json={"text": "Hi.", "language": language})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"', b""])
def test_malformed_bodies_get_malformed_json(client: httpx.Client, raw: bytes) -> None:
    response = client.post("/v1/synthesize", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "malformed_json"


def test_other_methods_are_405_for_authenticated_callers(client: httpx.Client) -> None:
    response = client.get("/v1/synthesize")
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"


def test_voices_and_health_describe_the_engine(client: httpx.Client) -> None:
    voices = client.get("/v1/voices").json()
    assert voices["engine"] == "piper"
    assert {"voice_id": "joe", "name": "en_US-joe-medium", "language": "en", "kind": "builtin"} in voices[
        "voices"
    ]
    engine = client.get("/v1/health").json()["engine"]
    assert engine["name"] == "piper"
    assert engine["loaded"] is True
    assert engine["sample_rate"] == 22050


def active_jobs(client: httpx.Client) -> int:
    return int(client.get("/v1/health").json()["engine"]["active_jobs"])


def test_a_client_that_disconnects_mid_stream_stops_the_engine_work(client: httpx.Client) -> None:
    with client.stream("POST", "/v1/synthesize", json={"text": LONG_TEXT, "streaming": True}) as response:
        assert response.status_code == 200
        request_id = response.headers["X-Request-ID"]
        body = response.iter_raw()  # held: a dropped iterator closes the connection
        next(body)
        assert active_jobs(client) == 1
    wait_until(lambda: active_jobs(client) == 0, what="the engine job to stop")
    wait_until(lambda: UsageLog.objects.filter(request_id=request_id).exists(), what="the usage row")
    row = UsageLog.objects.get(request_id=request_id)
    assert row.error_code == "client_disconnected"
    # The whole text is about three minutes of speech; the job stopped long before its end.
    assert 0 < row.audio_seconds < 60


def test_a_full_engine_refuses_with_503_and_retry_after(service_env: ServiceEnv, module_tenant: Any) -> None:
    _tenant, issued = module_tenant
    headers = {"Authorization": f"Bearer {issued.plaintext}"}
    env = service_env(ENGINE_MAX_ACTIVE_JOBS="1")
    with daphne_server(env) as base_url:
        holding = threading.Event()
        release = threading.Event()

        def hold_a_stream() -> None:
            with httpx.stream(
                "POST",
                f"{base_url}/v1/synthesize",
                json={"text": LONG_TEXT, "streaming": True},
                headers=headers,
            ) as response:
                body = response.iter_raw()
                next(body)
                holding.set()
                release.wait(30)

        holder = threading.Thread(target=hold_a_stream)
        holder.start()
        try:
            assert holding.wait(30)
            refused = httpx.post(
                f"{base_url}/v1/synthesize", json={"text": "Hi."}, headers=headers, timeout=30
            )
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "engine_overloaded"
            assert int(refused.headers["Retry-After"]) >= 1
        finally:
            release.set()
            holder.join()


def test_api_responses_carry_the_security_headers(client: httpx.Client) -> None:
    response = client.get("/v1/voices")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["X-Frame-Options"] == "DENY"
    assert response.headers["X-Request-ID"]


def test_the_api_middleware_never_waits_on_djangos_sync_thread() -> None:
    from django.conf import settings as django_settings
    from django.utils.deprecation import MiddlewareMixin
    from django.utils.module_loading import import_string

    for path in django_settings.API_MIDDLEWARE:
        middleware = import_string(path)
        runs_hooks_in_sync_thread = (
            issubclass(middleware, MiddlewareMixin) and middleware.__acall__ is MiddlewareMixin.__acall__
        )
        assert not runs_hooks_in_sync_thread, path
