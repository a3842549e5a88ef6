"""POST /v1/synthesize, /v1/synthesize-url, /v1/twiml/play, and the signed download view.

`synthesize` is a plain async Django view (DRF has no async views): under
Daphne it runs on the event loop, so a streamed response never holds Django's
one sync thread, and audio bytes go out as the engine produces them.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from xml.etree.ElementTree import Element, SubElement, tostring

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.core.files.storage import default_storage
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse, StreamingHttpResponse
from django.utils.http import http_date

from api.errors import error_response, service_error_response
from api.views import async_api_view
from core.bounded_json import bounded_json_loads
from core.errors import ServiceError, database_error
from core.request_ids import request_id_for
from synthesis.admission import Admission, native_request, service_error_for, synthesis_admit
from synthesis.models import PhraseAudio
from synthesis.services import AudioPart, SynthesisResult, synthesis_audio
from synthesis.stored_audio import (
    RangeNotSatisfiable,
    idempotency_record,
    idempotent_replay,
    request_fingerprint,
    requested_range,
    stored_audio_body,
    stored_audio_for,
    verify_local_signature,
)
from synthesis.stream.stats import stream_stats
from tenants.authentication import Principal, principal_require_voice
from tenants.limits import StreamLease
from usage.recorder import SYNTHESIZE, SYNTHESIZE_URL, TWIML_PLAY, usage_meter_of


def json_object_body(request: HttpRequest) -> dict[str, Any]:
    """The request body as a JSON object, or the API's errors for anything else."""
    try:
        payload = bounded_json_loads(request.body or b"null", max_depth=settings.JSON_MAX_DEPTH)
    except RequestDataTooBig:
        raise ServiceError(413, "request_too_large", "The request body is too large.") from None
    except (ValueError, UnicodeDecodeError):
        raise ServiceError(400, "malformed_json", "The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise ServiceError(400, "malformed_json", "The request body must be a JSON object.")
    return payload


async def stream_parts_closing(
    first: AudioPart | None, rest: AsyncIterator[AudioPart], lease: StreamLease
) -> AsyncIterator[AudioPart]:
    """The parts of a streamed response. However it ends, the engine stops and the
    stream's lease is freed (the usage meter around it counts what was sent)."""
    stream_stats.http_streams += 1
    try:
        if first is not None:
            yield first
        async for part in rest:
            yield part
    finally:
        stream_stats.http_streams -= 1
        try:
            await rest.aclose()  # type: ignore[attr-defined]
        finally:
            await lease.release()


@async_api_view("POST", usage_endpoint=SYNTHESIZE)
async def synthesize(request: HttpRequest, principal: Principal) -> HttpResponseBase:
    wanted = native_request(json_object_body(request))
    principal_require_voice(principal, wanted.voice_id)
    admission = await synthesis_admit(
        tenant=principal.tenant, request=wanted, meter=usage_meter_of(request), lease=wanted.streaming
    )
    return await audio_response(request, admission)


async def stream_body_closing(
    first: AudioPart | None, rest: AsyncIterator[AudioPart], lease: StreamLease
) -> AsyncIterator[bytes]:
    """The streamed response body: the audio of stream_parts_closing."""
    async for part in stream_parts_closing(first, rest, lease):
        if part.data:
            yield part.data


AudioBody = Callable[
    [AudioPart | None, AsyncIterator[AudioPart], StreamLease, SynthesisResult], AsyncIterator[bytes]
]


async def audio_response(
    request: HttpRequest,
    admission: Admission,
    *,
    stream_body: AudioBody | None = None,
    content_type: str | None = None,
) -> HttpResponseBase:
    """Run an admitted plan and answer its audio: streamed as it is made (when the
    admission holds a stream lease), or whole.

    `stream_body` wraps a streamed answer differently (OpenAI's SSE events); it
    then counts its own audio for usage.
    """
    plan, lease = admission.plan, admission.lease
    try:
        assert plan is not None  # HTTP requests carry their whole text
        result = SynthesisResult(spec=plan.spec)
        audio = synthesis_audio(plan, result, streaming=lease is not None)
        # Wait for the first audio before answering: refusals (overload) and
        # early engine failures still get a real status code, and the first
        # bytes go out with the headers.
        first = await anext(audio, None)
    except BaseException as exc:
        if lease is not None:
            await lease.release()
        if isinstance(exc, Exception):
            raise service_error_for(exc, request_id=request_id_for(request)) from exc
        raise

    headers = {"X-Audio-Format": plan.spec.format.value, "X-Sample-Rate": str(plan.spec.sample_rate)}
    response: HttpResponseBase
    meter = usage_meter_of(request)
    if lease is not None:
        lease.keep_alive()
        if meter is not None:
            meter.audio_clock = lambda: result.audio_seconds
            meter.cut_short = lambda: result.cut_short
            meter.counts_own_audio = stream_body is not None
        body = (
            stream_body_closing(first, audio, lease)
            if stream_body is None
            else stream_body(first, audio, lease, result)
        )
        response = StreamingHttpResponse(body, content_type=content_type or plan.spec.content_type)
        response["Cache-Control"] = "no-store"
        response["X-Accel-Buffering"] = "no"  # let proxies pass chunks through
    else:
        parts = [first.data] if first is not None else []
        try:
            async for part in audio:
                parts.append(part.data)
        except Exception as exc:
            raise service_error_for(exc, request_id=request_id_for(request)) from exc
        whole = b"".join(parts)
        if meter is not None:
            meter.audio_sent(len(whole), result.audio_seconds)
        response = HttpResponse(whole, content_type=content_type or plan.spec.content_type)
        response["Content-Length"] = str(len(whole))
        response["X-Audio-Duration"] = f"{result.file_seconds:.3f}"
    for name, value in headers.items():
        response[name] = value
    return response


# What an Idempotency-Key may be (synthesis.schema says the same): it is stored and compared.
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{0,255}")

# The fields an Idempotency-Key's request is recognised by, with their defaults: the same
# as they have always been, so that a retry keeps matching the request it repeats.
_FINGERPRINTED = (
    ("text", None),
    ("voice_id", ""),
    ("language", ""),
    ("format", "wav"),
    ("sample_rate", None),
    ("speed", 1.0),
    ("streaming", False),
)


async def _stored_audio_answer(request: HttpRequest, principal: Principal, endpoint: str) -> dict[str, Any]:
    """Synthesize-and-store (or find in the phrase cache), honouring an Idempotency-Key."""
    payload = json_object_body(request)
    wanted = native_request(payload)
    principal_require_voice(principal, wanted.voice_id)
    idempotency_key = request.headers.get("Idempotency-Key", "").strip()
    if not IDEMPOTENCY_KEY.fullmatch(idempotency_key):
        raise ServiceError(
            400,
            "invalid_idempotency_key",
            "Idempotency-Key is at most 255 visible ASCII characters (no spaces).",
        )
    fingerprint = request_fingerprint(
        {name: default if payload.get(name) is None else payload[name] for name, default in _FINGERPRINTED}
    )
    if idempotency_key and (
        replay := await idempotent_replay(
            tenant=principal.tenant, endpoint=endpoint, key=idempotency_key, fingerprint=fingerprint
        )
    ):
        _meter_stored_audio(request, replay["bytes"], replay["duration_s"], cached=True)
        return replay
    meter = usage_meter_of(request)
    admission = await synthesis_admit(tenant=principal.tenant, request=wanted, meter=meter)
    assert admission.plan is not None
    try:
        stored = await stored_audio_for(tenant=principal.tenant, plan=admission.plan)
    except Exception as exc:
        raise service_error_for(exc, request_id=request_id_for(request)) from exc
    _meter_stored_audio(request, stored.phrase.size_bytes, stored.phrase.duration_s, cached=stored.cached)
    answer = stored_audio_body(stored=stored, request_id=request_id_for(request))
    if idempotency_key:
        answer = await idempotency_record(
            tenant=principal.tenant,
            endpoint=endpoint,
            key=idempotency_key,
            fingerprint=fingerprint,
            stored=stored,
            response=answer,
        )
    return answer


def _meter_stored_audio(request: HttpRequest, nbytes: int, seconds: float, *, cached: bool) -> None:
    """Stored audio is paid for when made: a phrase-cache hit or replay costs no quota."""
    if (meter := usage_meter_of(request)) is not None:
        meter.cached = cached
        meter.audio_sent(nbytes, seconds)


@async_api_view("POST", usage_endpoint=SYNTHESIZE_URL)
async def synthesize_url(request: HttpRequest, principal: Principal) -> HttpResponseBase:
    return JsonResponse(await _stored_audio_answer(request, principal, "synthesize-url"))


@async_api_view("POST", usage_endpoint=TWIML_PLAY)
async def twiml_play(request: HttpRequest, principal: Principal) -> HttpResponseBase:
    answer = await _stored_audio_answer(request, principal, "twiml-play")
    root = Element("Response")
    SubElement(root, "Play").text = answer["url"]
    document = b'<?xml version="1.0" encoding="UTF-8"?>' + tostring(root)
    return HttpResponse(document, content_type="text/xml; charset=utf-8")


async def audio_download(request: HttpRequest, name: str) -> HttpResponseBase:
    """The signed download link for locally stored audio (public: the signature is the credential)."""
    if request.method != "GET":  # HEAD arrives as GET (callwaiting_tts.middleware.MethodMiddleware)
        return error_response(request, 405, "method_not_allowed", "Use GET.", headers={"Allow": "GET, HEAD"})
    try:
        verify_local_signature(name, request.GET.get("expires", ""), request.GET.get("signature", ""))
    except ServiceError as exc:
        return service_error_response(request, exc)
    try:
        phrase = await PhraseAudio.objects.filter(storage_name=name).afirst()
    except DatabaseError as exc:  # a plain view: nothing else turns this into the 503 to retry
        return service_error_response(request, database_error(exc))
    if phrase is None or not await sync_to_async(default_storage.exists, thread_sensitive=False)(name):
        return error_response(request, 404, "not_found", "This audio no longer exists.")

    etag = f'"{phrase.cache_key[:32]}"'
    size = phrase.size_bytes
    response: HttpResponseBase
    if request.headers.get("If-None-Match") == etag:
        response = HttpResponse(status=304)
    else:
        # If-Range: the range only if the client's copy is still this one (it always is:
        # the name is the content's hash), else the whole.
        if_range = request.headers.get("If-Range")
        range_header = request.headers.get("Range") if if_range in (None, etag) else None
        try:
            wanted = requested_range(range_header, size)
        except RangeNotSatisfiable as exc:
            return service_error_response(request, exc)
        start, length = (0, size) if wanted is None else (wanted.start, wanted.length)

        def read() -> bytes:
            with default_storage.open(name, "rb") as handle:
                handle.seek(start)
                return bytes(handle.read(length))

        head = request.META.get("REQUEST_METHOD") == "HEAD"
        body = b"" if head else await sync_to_async(read, thread_sensitive=False)()
        response = HttpResponse(body, content_type=phrase.content_type, status=200 if wanted is None else 206)
        response["Content-Length"] = str(length)
        if wanted is not None:
            response["Content-Range"] = f"bytes {wanted.start}-{wanted.end}/{size}"
    response["Accept-Ranges"] = "bytes"
    remaining = max(0, int(request.GET["expires"]) - int(time.time()))
    response["ETag"] = etag
    response["Last-Modified"] = http_date(phrase.created_at.timestamp())
    # The content behind a name never changes (the name is its hash): cache it
    # for as long as the link is valid.
    response["Cache-Control"] = f"private, max-age={remaining}, immutable"
    return response
