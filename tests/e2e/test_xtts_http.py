"""The XTTS engine behind POST /v1/synthesize, through a real Daphne, on the tiny checkpoint."""

from __future__ import annotations

import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile

from synthesis.audio import OutputSpec
from tests.support.audio import decode
from tests.support.servers import ServiceEnv, daphne_server
from tests.support.tenants import bearer, committed_tenant

pytestmark = [pytest.mark.slow, pytest.mark.django_db]


@pytest.fixture(scope="module")
def xtts_client(xtts_checkpoint: Path, service_env: ServiceEnv, module_tenant: Any) -> Iterator[httpx.Client]:
    env = service_env(
        TTS_ENGINE="auto",
        XTTS_MODEL_PATH=str(xtts_checkpoint),
        XTTS_DEVICE="cpu",
        XTTS_STREAM_CHUNK_TOKENS="4",
        XTTS_MAX_AUDIO_TOKENS="12",
        XTTS_DETERMINISTIC="1",
        ENGINE_MAX_ACTIVE_JOBS="32",
        ENGINE_MAX_JOBS_PER_TENANT="32",  # the tests' one tenant may use the whole engine
    )
    _tenant, issued = module_tenant
    with (
        daphne_server(env, startup_timeout=120) as base_url,
        httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {issued.plaintext}"}, timeout=120
        ) as client,
    ):
        yield client


def test_auto_picks_xtts_when_a_checkpoint_is_configured(xtts_client: httpx.Client) -> None:
    engine = xtts_client.get("/v1/health").json()["engine"]
    assert engine["name"] == "xtts"
    assert engine["loaded"] is True
    assert engine["sample_rate"] == 24000
    voices = xtts_client.get("/v1/voices").json()["voices"]
    assert [voice["voice_id"] for voice in voices] == ["ana-florence", "claribel-dervla"]


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize(
    ("audio_format", "rate"), [("wav", 24000), ("mp3", 24000), ("mulaw", None), ("opus", 48000)]
)
def test_xtts_audio_decodes_in_each_format(
    xtts_client: httpx.Client, audio_format: str, rate: int | None, streaming: bool
) -> None:
    response = xtts_client.post(
        "/v1/synthesize",
        json={"text": "Hello there.", "format": audio_format, "sample_rate": rate, "streaming": streaming},
    )
    assert response.status_code == 200, response.text
    spec = OutputSpec.parse(audio_format, rate)
    audio = decode(response.content, spec)
    # 12 audio tokens at most: about half a second of (random) speech.
    assert 0.2 < len(audio) / spec.sample_rate < 1.5


def test_unknown_language_for_xtts_is_a_400(xtts_client: httpx.Client) -> None:
    response = xtts_client.post("/v1/synthesize", json={"text": "Hola.", "language": "tlh"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unsupported_language"


@pytest.mark.timeout(600)
def test_twenty_simultaneous_http_requests_each_get_their_own_audio(xtts_client: httpx.Client) -> None:
    def body(index: int) -> dict[str, Any]:
        voice = ["ana-florence", "claribel-dervla"][index % 2]
        return {"text": f"Caller {index} here.", "voice_id": voice, "format": "pcm", "streaming": True}

    alone = [xtts_client.post("/v1/synthesize", json=body(index)).content for index in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        together = list(
            pool.map(lambda index: xtts_client.post("/v1/synthesize", json=body(index)), range(20))
        )
    for index, response in enumerate(together):
        assert response.status_code == 200
        assert response.content == alone[index], f"request {index} got other audio"
    assert len(set(alone)) > 1
    assert all(np.frombuffer(audio, dtype="<i2").any() for audio in alone)


@pytest.fixture(scope="module")
def uploader_key(django_db_blocker: Any, test_database_url: str) -> Iterator[str]:
    with committed_tenant(django_db_blocker, "xtts-uploader", permissions=["upload"]) as (_tenant, issued):
        yield issued.plaintext


def test_a_voice_upload_larger_than_the_server_body_limit_is_accepted(
    xtts_client: httpx.Client, uploader_key: str
) -> None:
    # 10 s of 16-bit stereo at 44.1 kHz: 1.8 MB, over REQUEST_BODY_MAX_BYTES (1 MiB),
    # which every route but the upload holds request bodies to.
    t = np.arange(441000) / 44100
    tone = (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([tone, tone], axis=1), 44100, format="WAV", subtype="PCM_16")
    assert buffer.tell() > 1024 * 1024
    response = xtts_client.post(
        "/v1/voices/upload",
        files={"file": ("reference.wav", buffer.getvalue(), "audio/wav")},
        data={"name": "Large Reference", "language": "en"},
        headers=bearer(uploader_key),
    )
    assert response.status_code == 201, response.text
    assert response.json()["voice_id"] == "large-reference"
