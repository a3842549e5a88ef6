"""ElevenLabs' text-to-speech API, so that ElevenLabs clients (their SDK, Pipecat's and
LiveKit's ElevenLabs plugins) work against this service by changing the base URL.

Its HTTP routes (the wire formats they share with the WebSockets of
synthesis.stream.elevenlabs are in synthesis.elevenlabs_wire):

    POST /v1/text-to-speech/{voice_id}                        the whole file
    POST /v1/text-to-speech/{voice_id}/stream                 the audio as it is made
    POST /v1/text-to-speech/{voice_id}/stream/with-timestamps JSON lines: audio and alignment

The same auth, limits, quotas, usage rows (endpoint `elevenlabs-tts`) and synthesis path as
/v1/synthesize; only the request, the response framing and the error shape are ElevenLabs':

    {"detail": {"status": "<our stable code>", "message": "..."}, "error": {...}}

(`error` is the service's own error object, the same on every route.)

The key comes as ElevenLabs clients send it, `xi-api-key: <key>` (or `Authorization:
Bearer <key>`). `voice_id` is one of our voice ids (GET /v1/voices); `model_id` is accepted
whatever it names. Alignment (character timings) is estimated (engines.alignment).
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable

from django.http import HttpRequest
from django.http.response import HttpResponseBase
from django.views.decorators.csrf import csrf_exempt

from api.errors import service_error_response
from api.views import async_api_view
from core.errors import ServiceError
from engines.alignment import CharTimeline, CharTimings, chunks_are_sentences, spoken_text
from synthesis.admission import SynthesisRequest, synthesis_admit
from synthesis.elevenlabs_wire import alignment_seconds, output_format, speed_of, voice_settings_checked
from synthesis.services import AudioPart, SynthesisResult
from synthesis.views import audio_response, json_object_body, stream_parts_closing
from tenants.authentication import Principal, principal_require_voice
from tenants.limits import StreamLease
from usage.recorder import ELEVENLABS_TTS, usage_meter_of


def elevenlabs_error_response(request: HttpRequest, error: ServiceError) -> HttpResponseBase:
    """A ServiceError in ElevenLabs' shape (`detail`: their SDK raises ApiError with this
    body), next to the service's own `error` object, so that every client of the API finds
    the one shape too."""
    response = service_error_response(request, error)
    body = json.loads(response.content)
    body["detail"] = {"status": error.code, "message": error.message}
    response.content = json.dumps(body).encode()
    return response


def _parse(request: HttpRequest, voice_id: str, *, streaming: bool) -> SynthesisRequest:
    body = json_object_body(request)
    text = body.get("text")
    if not isinstance(text, str) or not text:
        raise ServiceError(
            400, "invalid_request", "`text` is required: the text to speak.", details={"text": ["Required."]}
        )
    for name in ("model_id", "language_code"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise ServiceError(
                400, "invalid_request", f"`{name}` must be a string.", details={name: ["A string."]}
            )
    audio_format, sample_rate = output_format(request.GET.get("output_format"))
    return SynthesisRequest(
        text=text,
        voice_id=voice_id,
        language=body.get("language_code") or None,
        audio_format=audio_format,
        sample_rate=sample_rate,
        speed=speed_of(voice_settings_checked(body.get("voice_settings"))),
        streaming=streaming,
    )


def _with_xi_api_key(request: HttpRequest) -> None:
    """ElevenLabs clients send the key as `xi-api-key`; the one authentication path reads
    `Authorization: Bearer`, so the key is handed on in that form (never logged either way)."""
    key = request.META.get("HTTP_XI_API_KEY")
    if key and "HTTP_AUTHORIZATION" not in request.META:
        request.META["HTTP_AUTHORIZATION"] = f"Bearer {key}"
        request.__dict__.pop("headers", None)  # a cached view of META (middleware may have read it)


# Django's URL typing knows only sync views; it calls coroutine views correctly (api.views).
ElevenLabsView = Callable[..., HttpResponseBase]


def _elevenlabs_view(*, streaming: bool, timestamps: bool) -> ElevenLabsView:
    @async_api_view("POST", usage_endpoint=ELEVENLABS_TTS, render_error=elevenlabs_error_response)
    async def view(request: HttpRequest, principal: Principal, voice_id: str) -> HttpResponseBase:
        return await _text_to_speech(request, principal, voice_id, streaming=streaming, timestamps=timestamps)

    @csrf_exempt
    async def with_key(request: HttpRequest, voice_id: str) -> HttpResponseBase:
        _with_xi_api_key(request)
        return await view(request, voice_id)  # type: ignore[misc,no-any-return]  # async_api_view: a coroutine view

    return with_key  # type: ignore[return-value]


async def _text_to_speech(
    request: HttpRequest, principal: Principal, voice_id: str, *, streaming: bool, timestamps: bool
) -> HttpResponseBase:
    """Timestamps come streamed (JSON lines); ElevenLabs' whole-file JSON form
    (/with-timestamps) is not offered."""
    wanted = _parse(request, voice_id, streaming=streaming)
    principal_require_voice(principal, wanted.voice_id)
    meter = usage_meter_of(request)
    admission = await synthesis_admit(
        tenant=principal.tenant, request=wanted, meter=meter, lease=wanted.streaming
    )
    if not timestamps:
        return await audio_response(request, admission)
    # Character timings over the audio as it comes (one piece: the whole text).
    timeline = CharTimeline(
        whole_pieces=chunks_are_sentences(admission.setup.engine.name), speed=admission.setup.speed
    )
    assert admission.plan is not None  # HTTP requests carry their whole text
    timeline.begin(spoken_text(wanted.text or "", admission.plan.job.segments), 0.0)

    async def lines(
        first: AudioPart | None, rest: AsyncIterator[AudioPart], lease: StreamLease, result: SynthesisResult
    ) -> AsyncIterator[bytes]:
        async for part in stream_parts_closing(first, rest, lease):
            if meter is not None:
                meter.audio_sent(len(part.data), result.audio_seconds)
            # The characters this part's audio speaks, from the words its chunk carries.
            yield _line(part.data, timeline.advance(part.end_s, part.words, part.text))
        if tail := timeline.finish(result.audio_seconds):
            yield _line(b"", tail)

    return await audio_response(request, admission, stream_body=lines, content_type="application/x-ndjson")


def _line(audio: bytes, timings: CharTimings) -> bytes:
    alignment = alignment_seconds(timings) if timings else None
    return (
        json.dumps(
            {
                "audio_base64": base64.b64encode(audio).decode("ascii"),
                "alignment": alignment,
                "normalized_alignment": alignment,
            }
        )
        + "\n"
    ).encode()


text_to_speech = _elevenlabs_view(streaming=False, timestamps=False)
text_to_speech_stream = _elevenlabs_view(streaming=True, timestamps=False)
text_to_speech_stream_with_timestamps = _elevenlabs_view(streaming=True, timestamps=True)
