"""Cloned voices on the real tiny XTTS engine, real Postgres, and real storage (disk and S3)."""

from __future__ import annotations

import io
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from asgiref.sync import sync_to_async
from django.core.files.storage import default_storage
from django.test import AsyncClient

import engines
from engines.xtts import XttsEngine
from tenants.models import Tenant
from tenants.services import IssuedKey, tenant_create
from tests.support.servers import moto_s3_server, s3_client
from tests.support.xtts import loaded_tiny_xtts
from voices.models import Voice
from voices.services import conditioning_cache

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]
BUCKET = "voices-test"


def reference_wav(seconds: float, rate: int = 44100, channels: int = 2, audio_format: str = "WAV") -> bytes:
    rng = np.random.default_rng(7)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 180 * t) + 0.01 * rng.standard_normal(t.size)
    buffer = io.BytesIO()
    soundfile.write(buffer, np.stack([tone] * channels, axis=1).astype(np.float32), rate, format=audio_format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def xtts_engine(xtts_checkpoint: Path) -> Iterator[XttsEngine]:
    with loaded_tiny_xtts(xtts_checkpoint, max_audio_tokens=8) as engine:
        yield engine


@pytest.fixture
def engine(xtts_engine: XttsEngine, monkeypatch: pytest.MonkeyPatch) -> XttsEngine:
    """The process's engine is XTTS for this test."""
    monkeypatch.setattr(engines, "_engine", xtts_engine)
    conditioning_cache.clear()
    return xtts_engine


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_s3_server() as endpoint:
        s3_client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint


@pytest.fixture(params=["disk", "s3"])
def storage(request: pytest.FixtureRequest, settings: Any, tmp_path: Path) -> str:
    if request.param == "disk":
        settings.STORAGES = {
            **settings.STORAGES,
            "default": {
                "BACKEND": "django.core.files.storage.FileSystemStorage",
                "OPTIONS": {"location": tmp_path},
            },
        }
    else:
        endpoint = request.getfixturevalue("s3_endpoint")
        settings.STORAGES = {
            **settings.STORAGES,
            "default": {
                "BACKEND": "storages.backends.s3.S3Storage",
                "OPTIONS": {
                    "bucket_name": BUCKET,
                    "endpoint_url": endpoint,
                    "region_name": "us-east-1",
                    "access_key": "test",
                    "secret_key": "test",
                    "addressing_style": "path",
                    "file_overwrite": False,
                },
            },
        }
    return str(request.param)


def bucket_keys(endpoint: str) -> set[str]:
    s3 = s3_client(endpoint)
    return {item["Key"] for item in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])}


def stored_names(tenant: Tenant) -> list[str]:
    directory = f"tenants/{tenant.id}/voices"
    try:
        _dirs, files = default_storage.listdir(directory)
    except FileNotFoundError:
        return []
    return list(files)


@pytest.fixture
def uploader() -> tuple[Tenant, IssuedKey]:
    return tenant_create(name=f"uploader-{uuid.uuid4().hex[:6]}", permissions=["upload"])


class TenantClient:
    """An AsyncClient that sends the tenant's key on every request."""

    def __init__(self, issued: IssuedKey) -> None:
        self._client = AsyncClient()
        self._headers = {"Authorization": f"Bearer {issued.plaintext}"}

    async def get(self, path: str) -> Any:
        return await self._client.get(path, headers=self._headers)

    async def delete(self, path: str) -> Any:
        return await self._client.delete(path, headers=self._headers)

    async def post(self, path: str, data: Any, content_type: str | None = None) -> Any:
        if content_type is None:
            return await self._client.post(path, data=data, headers=self._headers)
        return await self._client.post(path, data=data, content_type=content_type, headers=self._headers)


def client_for(issued: IssuedKey) -> TenantClient:
    return TenantClient(issued)


async def upload(client: TenantClient, audio: bytes, filename: str = "ref.wav", **fields: str) -> Any:
    data: dict[str, Any] = {"name": "Front Desk", "language": "en", **fields}
    if audio is not None:
        data["file"] = io.BytesIO(audio)
        data["file"].name = filename
    return await client.post("/v1/voices/upload", data=data)


async def test_upload_list_synthesize_and_delete(
    engine: XttsEngine, storage: str, uploader: Any, request: pytest.FixtureRequest
) -> None:
    tenant, issued = uploader
    client = client_for(issued)
    created = await upload(client, reference_wav(5.0), voice_id="front-desk")
    assert created.status_code == 201, created.content
    assert created.json()["voice_id"] == "front-desk"
    assert created.json()["reference_seconds"] == pytest.approx(5.0, abs=0.01)

    voice = await Voice.objects.aget(tenant=tenant, voice_id="front-desk")
    assert str(voice.reference_audio.name).startswith(f"tenants/{tenant.id}/voices/")
    assert await default_storage_exists(str(voice.reference_audio.name))
    if storage == "s3":  # really in the bucket, as seen by a separate S3 client
        assert voice.reference_audio.name in bucket_keys(request.getfixturevalue("s3_endpoint"))
    assert voice.conditioning_model == engine.model_identity

    listed = (await client.get("/v1/voices")).json()["voices"]
    assert {"front-desk", "ana-florence"} <= {v["voice_id"] for v in listed}

    spoken = await client.post(
        "/v1/synthesize",
        {"text": "Hello from the front desk.", "voice_id": "front-desk"},
        content_type="application/json",
    )
    assert spoken.status_code == 200
    assert soundfile.info(io.BytesIO(spoken.content)).duration > 0.1

    deleted = await client.delete("/v1/voices/front-desk")
    assert deleted.status_code == 204
    assert not await default_storage_exists(str(voice.reference_audio.name))
    if storage == "s3":
        assert voice.reference_audio.name not in bucket_keys(request.getfixturevalue("s3_endpoint"))
    assert not await Voice.objects.filter(pk=voice.pk).aexists()
    again = await client.post(
        "/v1/synthesize", {"text": "Hello.", "voice_id": "front-desk"}, content_type="application/json"
    )
    assert again.status_code == 404
    assert (await client.delete("/v1/voices/front-desk")).status_code == 404


async def default_storage_exists(name: str) -> bool:
    return bool(await sync_to_async(default_storage.exists)(name))


def huge_header_wav() -> bytes:
    real = reference_wav(1.0, rate=16000, channels=1)
    header = bytearray(real[:44])
    header[4:8] = struct.pack("<I", 0xFFFFFFF0)
    header[40:44] = struct.pack("<I", 0xFFFFFF00)
    return bytes(header) + real[44:]


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("empty file", 400, "invalid_audio"),
        ("not audio", 400, "invalid_audio"),
        ("huge header", 422, "audio_too_short"),
        ("too short", 422, "audio_too_short"),
        ("too long", 422, "audio_too_long"),
        ("over the cap", 413, "upload_too_large"),
        ("missing file", 400, "invalid_request"),
        ("missing name", 400, "invalid_request"),
        ("missing language", 400, "invalid_request"),
        ("bad voice_id", 400, "invalid_request"),
    ],
)
async def test_bad_uploads_get_a_clear_error_and_store_nothing(
    engine: XttsEngine, storage: str, settings: Any, uploader: Any, case: str, status: int, code: str
) -> None:
    tenant, issued = uploader
    settings.VOICE_UPLOAD_MAX_BYTES = 2_000_000
    client = client_for(issued)
    good = reference_wav(4.0, rate=16000, channels=1)
    audio: Any = {
        "empty file": b"",
        "not audio": b"RIFF....this is not a wave file at all" * 100,
        "huge header": huge_header_wav(),
        "too short": reference_wav(2.0, rate=16000, channels=1),
        "too long": reference_wav(61.0, rate=8000, channels=1, audio_format="FLAC"),
        "over the cap": reference_wav(30.0, rate=44100, channels=1),
        "missing file": None,
    }.get(case, good)
    fields = {
        "missing name": {"name": ""},
        "missing language": {"language": ""},
        "bad voice_id": {"voice_id": "../../etc"},
    }.get(case, {})
    response = await upload(client, audio, **fields)
    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code
    assert not await Voice.objects.filter(tenant=tenant).aexists()
    assert stored_names(tenant) == []


async def test_the_uploaded_file_name_never_reaches_storage(
    engine: XttsEngine, storage: str, uploader: Any
) -> None:
    tenant, issued = uploader
    response = await upload(client_for(issued), reference_wav(3.5), filename="../../../../etc/passwd.wav")
    assert response.status_code == 201
    voice = await Voice.objects.aget(tenant=tenant)
    assert str(voice.reference_audio.name).startswith(f"tenants/{tenant.id}/voices/")
    assert "passwd" not in str(voice.reference_audio.name)
    assert ".." not in str(voice.reference_audio.name)


@pytest.mark.parametrize("audio_format", ["FLAC", "OGG", "MP3"])
async def test_flac_ogg_and_mp3_references_are_accepted(
    engine: XttsEngine, storage: str, uploader: Any, audio_format: str
) -> None:
    _tenant, issued = uploader
    audio = reference_wav(4.0, rate=24000, channels=1, audio_format=audio_format)
    response = await upload(client_for(issued), audio, filename=f"ref.{audio_format.lower()}")
    assert response.status_code == 201, response.content


async def test_another_tenant_can_neither_list_use_nor_delete_a_voice(
    engine: XttsEngine, uploader: Any
) -> None:
    _tenant_a, key_a = uploader
    _tenant_b, key_b = await sync_to_async(tenant_create)(
        name=f"other-{uuid.uuid4().hex[:6]}", permissions=["upload"]
    )
    assert (await upload(client_for(key_a), reference_wav(4.0), voice_id="secret-voice")).status_code == 201
    other = client_for(key_b)
    listed = (await other.get("/v1/voices")).json()["voices"]
    assert "secret-voice" not in {v["voice_id"] for v in listed}
    used = await other.post(
        "/v1/synthesize", {"text": "Hi.", "voice_id": "secret-voice"}, content_type="application/json"
    )
    assert used.status_code == 404
    assert (await other.delete("/v1/voices/secret-voice")).status_code == 404
    assert await Voice.objects.filter(voice_id="secret-voice").aexists()


async def test_uploading_needs_the_upload_permission(engine: XttsEngine) -> None:
    _tenant, issued = await sync_to_async(tenant_create)(name=f"plain-{uuid.uuid4().hex[:6]}")
    response = await upload(client_for(issued), reference_wav(4.0))
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"


async def test_a_duplicate_voice_id_is_409(engine: XttsEngine, uploader: Any) -> None:
    _tenant, issued = uploader
    client = client_for(issued)
    assert (await upload(client, reference_wav(4.0), voice_id="desk")).status_code == 201
    second = await upload(client, reference_wav(4.0), voice_id="desk")
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "voice_exists"


async def test_an_engine_that_cannot_clone_says_so(uploader: Any) -> None:
    _tenant, issued = uploader  # the process engine here is Piper
    response = await upload(client_for(issued), reference_wav(4.0))
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "cloning_not_supported"


@pytest.fixture(scope="module")
def retrained_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[XttsEngine]:
    """The same architecture with other weights: what a model upgrade looks like to the service."""
    from synthesis.management.commands.make_xtts_checkpoint import write_checkpoint

    directory = tmp_path_factory.mktemp("xtts_retrained")
    write_checkpoint(directory, full=False, speakers=["Ana Florence"], seed=1)
    with loaded_tiny_xtts(directory, max_audio_tokens=8) as engine:
        yield engine


def count_conditioning(engine: XttsEngine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spy (the real computation still runs): one entry per conditioning computed."""
    computations: list[int] = []
    real_compute = engine.compute_conditioning

    async def counting_compute(audio: np.ndarray, sample_rate: int) -> bytes:
        computations.append(sample_rate)
        return await real_compute(audio, sample_rate)

    monkeypatch.setattr(engine, "compute_conditioning", counting_compute)
    return computations


async def test_conditioning_is_computed_once_and_again_only_for_a_new_model(
    engine: XttsEngine, retrained_engine: XttsEngine, uploader: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant, issued = uploader
    computations = count_conditioning(engine, monkeypatch)
    client = client_for(issued)
    assert (await upload(client, reference_wav(4.0), voice_id="desk")).status_code == 201
    assert len(computations) == 1

    body = {"text": "Hello.", "voice_id": "desk"}
    for _ in range(2):
        assert (await client.post("/v1/synthesize", body, content_type="application/json")).status_code == 200
    conditioning_cache.clear()  # as a fresh process would be: loads from the database
    assert (await client.post("/v1/synthesize", body, content_type="application/json")).status_code == 200
    assert len(computations) == 1

    # The process now runs a different model: the stored latents are stale.
    assert retrained_engine.model_identity != engine.model_identity
    retrained_computations = count_conditioning(retrained_engine, monkeypatch)
    monkeypatch.setattr(engines, "_engine", retrained_engine)
    assert (await client.post("/v1/synthesize", body, content_type="application/json")).status_code == 200
    assert len(retrained_computations) == 1
    voice = await Voice.objects.aget(tenant=tenant, voice_id="desk")
    assert voice.conditioning_model == retrained_engine.model_identity
    assert voice.conditioning_version == 2
    assert (await client.post("/v1/synthesize", body, content_type="application/json")).status_code == 200
    assert len(retrained_computations) == 1
    assert len(computations) == 1
