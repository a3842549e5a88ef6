"""Cloned voices: validate and store a reference, compute its conditioning once, serve it fast.

Conditioning (XTTS: GPT latents and speaker embedding) is computed at upload
and stored with the voice, tagged with the engine model it was made for. At
synthesis time it comes from a bounded in-process cache, else from the
database; a different engine model recomputes it from the stored reference.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass

import numpy as np
import soundfile
import soxr
from asgiref.sync import sync_to_async
from cachetools import LRUCache
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError
from django.utils.text import slugify

from core.errors import ServiceError
from engines import CloningNotSupported, SpeechEngine
from tenants.models import Tenant
from voices.models import Voice

REFERENCE_SAMPLE_RATE = 22050
MIN_REFERENCE_SECONDS = 3.0
MAX_REFERENCE_SECONDS = 60.0
_MAX_CHANNELS = 8
_DECODE_BLOCK = 1 << 16


@dataclass(frozen=True)
class ReferenceAudio:
    samples: np.ndarray  # float32, mono, REFERENCE_SAMPLE_RATE
    seconds: float

    def wav_bytes(self) -> bytes:
        buffer = io.BytesIO()
        soundfile.write(buffer, self.samples, REFERENCE_SAMPLE_RATE, format="WAV", subtype="PCM_16")
        return buffer.getvalue()


def reference_audio_decode(data: bytes) -> ReferenceAudio:
    """Decode WAV, FLAC, Ogg or MP3; mono-mix; resample; check the decoded duration.

    Durations come from the decoded samples, never from the header (a WAV may
    claim any size), and decoding stops as soon as the limit is passed.
    """
    if not data:
        raise ServiceError(400, "invalid_audio", "The uploaded file is empty.")
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as audio_file:
            rate, channels = audio_file.samplerate, audio_file.channels
            if not 1 <= channels <= _MAX_CHANNELS or not 4000 <= rate <= 192_000:
                raise ServiceError(
                    400, "invalid_audio", f"Unsupported audio layout: {channels} channels at {rate} Hz."
                )
            limit = int((MAX_REFERENCE_SECONDS + 1) * rate)
            blocks: list[np.ndarray] = []
            decoded = 0
            for block in audio_file.blocks(blocksize=_DECODE_BLOCK, dtype="float32", always_2d=True):
                blocks.append(block.mean(axis=1))
                decoded += len(block)
                if decoded > limit:
                    break
    except soundfile.LibsndfileError:
        raise ServiceError(
            400, "invalid_audio", "The file is not audio we can decode (WAV, FLAC, Ogg or MP3)."
        ) from None
    seconds = decoded / rate
    if seconds < MIN_REFERENCE_SECONDS:
        raise ServiceError(
            422,
            "audio_too_short",
            f"The reference is {seconds:.1f} s; at least {MIN_REFERENCE_SECONDS:.0f} s.",
        )
    if seconds > MAX_REFERENCE_SECONDS:
        raise ServiceError(422, "audio_too_long", f"The reference is over {MAX_REFERENCE_SECONDS:.0f} s.")
    mono = np.concatenate(blocks).astype(np.float32)
    if rate != REFERENCE_SAMPLE_RATE:
        mono = soxr.resample(mono, rate, REFERENCE_SAMPLE_RATE).astype(np.float32)
    return ReferenceAudio(samples=mono, seconds=seconds)


def storage_key(tenant: Tenant) -> str:
    """Chosen by the service, never from the uploaded file name."""
    return f"tenants/{tenant.id}/voices/{uuid.uuid4()}.wav"


class ConditioningCache:
    """Most recently used conditioning blobs, keyed by (voice, version, model). Event loop only."""

    def __init__(self, max_entries: int) -> None:
        self._entries: LRUCache[tuple[uuid.UUID, int, str], bytes] = LRUCache(maxsize=max_entries)

    def get(self, key: tuple[uuid.UUID, int, str]) -> bytes | None:
        return self._entries.get(key)

    def put(self, key: tuple[uuid.UUID, int, str], value: bytes) -> None:
        self._entries[key] = value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


conditioning_cache = ConditioningCache(settings.VOICE_CACHE_ENTRIES)


async def voice_create(
    *,
    tenant: Tenant,
    engine: SpeechEngine,
    audio: bytes,
    name: str,
    language: str,
    voice_id: str | None,
) -> Voice:
    if not engine.supports_cloning:
        raise ServiceError(
            422,
            "cloning_not_supported",
            f"The {engine.name} engine cannot clone voices; the service needs XTTS.",
        )
    spoken = engine.speaks(language)
    if spoken is None:
        raise ServiceError(400, "unsupported_language", f"The engine speaks {', '.join(engine.languages)}.")
    language = spoken
    voice_id = voice_id or slugify(name)[:48] or f"voice-{uuid.uuid4().hex[:8]}"
    if engine.find_builtin_voice(voice_id) is not None:
        raise ServiceError(409, "voice_exists", f"{voice_id!r} is a built-in voice; choose another voice_id.")
    if await Voice.objects.filter(tenant=tenant, voice_id=voice_id).aexists():
        raise ServiceError(409, "voice_exists", f"You already have a voice {voice_id!r}.")
    reference = await sync_to_async(reference_audio_decode, thread_sensitive=False)(audio)
    try:
        conditioning = await engine.compute_conditioning(reference.samples, REFERENCE_SAMPLE_RATE)
    except CloningNotSupported as exc:
        raise ServiceError(422, "cloning_not_supported", str(exc)) from None
    key = await sync_to_async(default_storage.save, thread_sensitive=False)(
        storage_key(tenant), ContentFile(reference.wav_bytes())
    )
    try:
        voice = await Voice.objects.acreate(
            tenant=tenant,
            voice_id=voice_id,
            name=name,
            language=language,
            reference_audio=key,
            reference_seconds=round(reference.seconds, 3),
            conditioning=conditioning,
            conditioning_model=engine.model_identity,
        )
    except IntegrityError:
        await sync_to_async(default_storage.delete, thread_sensitive=False)(key)
        raise ServiceError(409, "voice_exists", f"You already have a voice {voice_id!r}.") from None
    except BaseException:
        await sync_to_async(default_storage.delete, thread_sensitive=False)(key)
        raise
    conditioning_cache.put((voice.id, voice.conditioning_version, engine.model_identity), conditioning)
    return voice


async def voice_delete(*, tenant: Tenant, voice_id: str) -> None:
    voice = (
        await Voice.objects.filter(tenant=tenant, voice_id=voice_id).only("id", "reference_audio").afirst()
    )
    if voice is None:
        raise ServiceError(404, "voice_not_found", f"No voice {voice_id!r}.")
    await Voice.objects.filter(pk=voice.pk).adelete()
    await sync_to_async(default_storage.delete, thread_sensitive=False)(str(voice.reference_audio.name))


def voice_delete_sync(voice: Voice) -> None:
    """For the admin: the row and its stored reference go together."""
    name = str(voice.reference_audio.name)
    voice.delete()
    default_storage.delete(name)


async def tenant_voice_find(*, tenant: Tenant, voice_id: str) -> Voice | None:
    return (
        await Voice.objects.filter(tenant=tenant, voice_id=voice_id)
        .only("id", "voice_id", "language", "conditioning_model", "conditioning_version", "reference_audio")
        .afirst()
    )


async def voice_conditioning(*, engine: SpeechEngine, voice: Voice) -> bytes:
    """The voice's conditioning for this engine model: cached, stored, or (new model) recomputed."""
    key = (voice.id, voice.conditioning_version, engine.model_identity)
    if (cached := conditioning_cache.get(key)) is not None:
        return cached
    if voice.conditioning_model == engine.model_identity:
        stored = await Voice.objects.filter(pk=voice.pk).values_list("conditioning", flat=True).afirst()
        if stored is None:
            raise ServiceError(404, "voice_not_found", f"No voice {voice.voice_id!r}.")
        conditioning = bytes(stored)
    else:
        conditioning = await _recompute(engine=engine, voice=voice)
        key = (voice.id, voice.conditioning_version, engine.model_identity)
    conditioning_cache.put(key, conditioning)
    return conditioning


async def _recompute(*, engine: SpeechEngine, voice: Voice) -> bytes:
    if not engine.supports_cloning:
        raise ServiceError(409, "voice_unavailable", f"The {engine.name} engine cannot speak cloned voices.")

    def read_reference() -> bytes:
        with default_storage.open(str(voice.reference_audio.name), "rb") as handle:
            return bytes(handle.read())

    reference = reference_audio_decode(await sync_to_async(read_reference, thread_sensitive=False)())
    conditioning = await engine.compute_conditioning(reference.samples, REFERENCE_SAMPLE_RATE)
    new_version = voice.conditioning_version + 1
    await Voice.objects.filter(pk=voice.pk, conditioning_version=voice.conditioning_version).aupdate(
        conditioning=conditioning, conditioning_model=engine.model_identity, conditioning_version=new_version
    )
    voice.conditioning_version = new_version
    voice.conditioning_model = engine.model_identity
    return conditioning
