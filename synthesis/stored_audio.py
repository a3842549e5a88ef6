"""Synthesized audio behind signed, expiring URLs (for Twilio <Play> and WhatsApp), with a phrase cache.

A request's audio is stored once per tenant under the hash of everything that
decides it (SynthesisPlan.cache_key); a repeat within PHRASE_CACHE_SECONDS is
answered from storage without running the engine. URLs are S3 presigned GETs
when the default storage is S3, else links to our own download view signed
with Django's signing over (object name, expiry).

The download view answers byte ranges (`Range: bytes=0-99` -> 206 Partial Content), as
browsers' `<audio>` elements and Twilio's fetcher ask for them; S3 does the same for its
presigned links itself. One range per request: a header naming several, or one that does
not parse, is ignored and the whole object is sent (RFC 9110 allows both), which every
client handles.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from asgiref.sync import sync_to_async
from cachetools import LRUCache
from django.conf import settings
from django.core import signing
from django.core.files.base import ContentFile
from django.core.files.storage import FileSystemStorage, default_storage
from django.db import IntegrityError
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from core.errors import ServiceError
from synthesis.audio import AudioFormat
from synthesis.models import IdempotencyRecord, PhraseAudio
from synthesis.services import SynthesisPlan, SynthesisResult, synthesis_audio
from tenants.models import Tenant

EXTENSIONS = {
    AudioFormat.WAV: "wav",
    AudioFormat.PCM: "pcm",
    AudioFormat.MP3: "mp3",
    AudioFormat.OPUS: "ogg",
    AudioFormat.FLAC: "flac",
    AudioFormat.MULAW: "ulaw",
    AudioFormat.AAC: "aac",
}
# Every format has its extension (a format without one could be made but never stored).
assert set(EXTENSIONS) == set(AudioFormat)
STORED_NAME = re.compile(
    rf"^tenants/[0-9a-f-]{{36}}/phrases/[0-9a-f]{{64}}\.({'|'.join(sorted(EXTENSIONS.values()))})$"
)
EXPIRES = re.compile(r"[0-9]{1,20}")  # a Unix time, as the signature covers it
_signer = signing.Signer(salt="synthesis.stored-audio-url")


@dataclass(frozen=True)
class StoredAudio:
    phrase: PhraseAudio
    cached: bool


def _phrase_is_fresh(phrase: PhraseAudio) -> bool:
    return phrase.created_at > timezone.now() - timedelta(seconds=settings.PHRASE_CACHE_SECONDS)


class _RecentPhrases:
    """Phrase rows this process has seen, so that a hit needs no database round trip.

    Safe to keep: a name is the hash of everything that made its audio, so a
    row never changes; freshness is still checked on every use. Event loop only.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        self._entries: LRUCache[tuple[uuid.UUID, str], PhraseAudio] = LRUCache(maxsize=max_entries)

    def get(self, tenant: Tenant, cache_key: str) -> PhraseAudio | None:
        phrase = self._entries.get((tenant.id, cache_key))
        if phrase is None:
            return None
        if not _phrase_is_fresh(phrase):
            self._entries.pop((tenant.id, cache_key), None)
            return None
        return phrase

    def put(self, phrase: PhraseAudio) -> None:
        self._entries[(phrase.tenant_id, phrase.cache_key)] = phrase


recent_phrases = _RecentPhrases()


async def stored_audio_for(*, tenant: Tenant, plan: SynthesisPlan) -> StoredAudio:
    """The stored audio for this request: from the phrase cache, or synthesized and stored now."""
    cache_key = plan.cache_key()
    if (known := recent_phrases.get(tenant, cache_key)) is not None:
        return StoredAudio(phrase=known, cached=True)
    existing = await PhraseAudio.objects.filter(tenant=tenant, cache_key=cache_key).afirst()
    if existing is not None and _phrase_is_fresh(existing):
        recent_phrases.put(existing)
        return StoredAudio(phrase=existing, cached=True)

    result = SynthesisResult(spec=plan.spec)
    body = b"".join([part.data async for part in synthesis_audio(plan, result, streaming=False)])
    name = f"tenants/{tenant.id}/phrases/{cache_key}.{EXTENSIONS[plan.spec.format]}"
    if existing is not None:  # expired: replace it
        await sync_to_async(default_storage.delete, thread_sensitive=False)(existing.storage_name)
        await PhraseAudio.objects.filter(pk=existing.pk).adelete()
    saved_name = await sync_to_async(default_storage.save, thread_sensitive=False)(name, ContentFile(body))
    try:
        phrase = await PhraseAudio.objects.acreate(
            tenant=tenant,
            cache_key=cache_key,
            storage_name=saved_name,
            format=plan.spec.format.value,
            content_type=plan.spec.content_type,
            sample_rate=plan.spec.sample_rate,
            size_bytes=len(body),
            duration_s=round(result.file_seconds, 3),
        )
    except IntegrityError:  # a concurrent identical request stored it first
        await sync_to_async(default_storage.delete, thread_sensitive=False)(saved_name)
        return StoredAudio(
            phrase=await PhraseAudio.objects.aget(tenant=tenant, cache_key=cache_key), cached=True
        )
    return StoredAudio(phrase=phrase, cached=False)


def local_url_signature(name: str, expires: int) -> str:
    return _signer.signature(f"{name}|{expires}")


def signed_url(name: str) -> tuple[str, datetime]:
    """A URL that fetches the object until the returned expiry."""
    expiry_seconds = settings.SIGNED_URL_EXPIRY_SECONDS
    expires = int(time.time()) + expiry_seconds
    if isinstance(default_storage, FileSystemStorage):
        query = urlencode({"expires": expires, "signature": local_url_signature(name, expires)})
        return f"{settings.PUBLIC_BASE_URL}/v1/audio/{name}?{query}", datetime.fromtimestamp(expires, UTC)
    # django-storages' S3 backend presigns for its querystring_expire (set from the same setting).
    return default_storage.url(name), datetime.fromtimestamp(expires, UTC)


def verify_local_signature(name: str, expires: str, signature: str) -> None:
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if not STORED_NAME.match(name) or not EXPIRES.fullmatch(expires):
        raise ServiceError(403, "invalid_signature", "This audio link is not valid.")
    if not constant_time_compare(local_url_signature(name, int(expires)), signature):
        raise ServiceError(403, "invalid_signature", "This audio link is not valid.")
    if int(expires) < time.time():
        raise ServiceError(403, "link_expired", "This audio link has expired; ask for a new one.")


# `bytes=<first>-<last>`, `bytes=<first>-` or `bytes=-<suffix length>`: one range.
_BYTE_RANGE = re.compile(r"bytes=([0-9]{0,20})-([0-9]{0,20})", re.IGNORECASE)


@dataclass(frozen=True)
class ByteRange:
    start: int
    end: int  # inclusive, as Content-Range writes it

    @property
    def length(self) -> int:
        return self.end - self.start + 1


class RangeNotSatisfiable(ServiceError):
    def __init__(self, size: int) -> None:
        super().__init__(
            416,
            "range_not_satisfiable",
            f"The range starts past the end: this audio is {size} bytes.",
            headers={"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"},
        )


def requested_range(header: str | None, size: int) -> ByteRange | None:
    """The one byte range a `Range` header asks of an object of `size` bytes; None to send
    it whole; RangeNotSatisfiable when the range lies wholly past the end."""
    match = _BYTE_RANGE.fullmatch((header or "").strip().replace(" ", ""))
    if match is None:
        return None  # absent, another unit, several ranges, or malformed
    first, last = match.groups()
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignored
    if start >= size:
        raise RangeNotSatisfiable(size)
    return ByteRange(start, min(int(last), size - 1) if last else size - 1)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def stored_audio_body(*, stored: StoredAudio, request_id: str) -> dict[str, Any]:
    url, expires_at = signed_url(stored.phrase.storage_name)
    return {
        "url": url,
        "expires_at": _iso(expires_at),
        "format": stored.phrase.format,
        "content_type": stored.phrase.content_type,
        "duration_s": stored.phrase.duration_s,
        "bytes": stored.phrase.size_bytes,
        "request_id": request_id,
        "cached": stored.cached,
    }


def request_fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


async def idempotent_replay(
    *, tenant: Tenant, endpoint: str, key: str, fingerprint: str
) -> dict[str, Any] | None:
    """The answer for a retry, with a freshly signed link to the same audio; None for a new
    key (or one whose audio is gone: the request then runs again); 409 if the key came with
    another body."""
    record = await IdempotencyRecord.objects.filter(tenant=tenant, endpoint=endpoint, key=key).afirst()
    if record is None or record.created_at < timezone.now() - timedelta(seconds=settings.IDEMPOTENCY_SECONDS):
        return None
    if record.request_hash != fingerprint:
        raise ServiceError(
            409, "idempotency_key_reused", "This Idempotency-Key was used with a different request body."
        )
    answer = dict(record.response)
    if (
        not record.storage_name
        or not await PhraseAudio.objects.filter(tenant=tenant, storage_name=record.storage_name).aexists()
    ):
        # Its audio left the phrase cache: answer as a new request, under the same key.
        await IdempotencyRecord.objects.filter(pk=record.pk).adelete()
        return None
    answer["url"], expires_at = signed_url(record.storage_name)
    answer["expires_at"] = _iso(expires_at)
    return answer


async def idempotency_record(
    *,
    tenant: Tenant,
    endpoint: str,
    key: str,
    fingerprint: str,
    stored: StoredAudio,
    response: dict[str, Any],
) -> dict[str, Any]:
    """Remember the answer; if a concurrent retry got there first, answer what it stored."""
    await IdempotencyRecord.objects.filter(
        tenant=tenant,
        endpoint=endpoint,
        key=key,
        created_at__lt=timezone.now() - timedelta(seconds=settings.IDEMPOTENCY_SECONDS),
    ).adelete()
    try:
        await IdempotencyRecord.objects.acreate(
            tenant=tenant,
            endpoint=endpoint,
            key=key,
            request_hash=fingerprint,
            response=response,
            storage_name=stored.phrase.storage_name,
        )
    except IntegrityError:
        replay = await idempotent_replay(tenant=tenant, endpoint=endpoint, key=key, fingerprint=fingerprint)
        if replay is not None:
            return replay
    return response
