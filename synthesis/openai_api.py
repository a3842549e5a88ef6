"""POST /v1/audio/speech: OpenAI's speech API, so OpenAI clients work by changing the base URL.

The same engine, auth, limits, quotas, usage rows and metrics as /v1/synthesize;
only the request body, the response framing and the error shape are OpenAI's:

    {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}

`model` is accepted whatever it names (this service has one engine). OpenAI's
voice names map to built-in voices (OPENAI_VOICE_MAP); any other `voice` (or
`{"id": ...}`) is one of ours, built-in or the tenant's cloned voice.
`instructions` is accepted and ignored: neither engine takes style prompts.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import AsyncIterator
from typing import Any

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.http.response import HttpResponseBase

from api.views import async_api_view
from core.errors import ServiceError
from core.request_ids import REQUEST_ID_HEADER, request_id_for
from engines import get_engine
from synthesis.admission import SynthesisRequest, synthesis_admit
from synthesis.services import AudioPart, SynthesisResult
from synthesis.views import audio_response, json_object_body, stream_body_closing
from tenants.authentication import Principal, principal_require_voice
from tenants.limits import StreamLease
from usage.recorder import AUDIO_SPEECH, usage_meter_of

OPENAI_VOICES = frozenset(
    {
        "alloy",
        "ash",
        "ballad",
        "coral",
        "echo",
        "fable",
        "nova",
        "onyx",
        "sage",
        "shimmer",
        "verse",
        "marin",
        "cedar",
    }
)
RESPONSE_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
MAX_INPUT_CHARS = 4096
# OpenAI's pcm is 24 kHz; the other formats take the same rate.
SAMPLE_RATE = 24000

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error_response(request: HttpRequest, error: ServiceError) -> HttpResponseBase:
    """An ServiceError in OpenAI's shape, so OpenAI SDKs raise their usual exceptions."""
    details = error.details if isinstance(error.details, dict) else {}
    kind = "insufficient_quota" if error.code == "quota_exceeded" else _ERROR_TYPES.get(error.status_code)
    body = {
        "error": {
            "message": error.message,
            "type": kind or "server_error",
            # A field's problems are a list of messages; other details (a limit) name no param.
            "param": next((name for name, value in details.items() if isinstance(value, list)), None),
            "code": error.code,
        }
    }
    response = JsonResponse(body, status=error.status_code)
    for name, value in error.headers.items():
        response[name] = value
    response[REQUEST_ID_HEADER] = request_id_for(request)
    response.error_code = error.code  # type: ignore[attr-defined]  # for usage metering
    return response


def _invalid(param: str, message: str, code: str = "invalid_request") -> ServiceError:
    return ServiceError(400, code, message, details={param: [message]})


def _parse(request: HttpRequest) -> tuple[SynthesisRequest, str]:
    """OpenAI's request body as ours, and its `stream_format` ("audio" or "sse")."""
    body = json_object_body(request)
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _invalid("model", "`model` is required (any OpenAI speech model name works).")
    text = body.get("input")
    if not isinstance(text, str):
        raise _invalid("input", "`input` is required: the text to speak.")
    if len(text) > MAX_INPUT_CHARS:
        raise _invalid("input", f"`input` is at most {MAX_INPUT_CHARS} characters.", "text_too_long")
    voice = body.get("voice")
    if isinstance(voice, dict):
        voice = voice.get("id")
    if not isinstance(voice, str) or not voice:
        raise _invalid("voice", '`voice` is required: a voice name or {"id": "<voice_id>"}.')
    response_format = "mp3" if body.get("response_format") is None else body["response_format"]
    if response_format not in RESPONSE_FORMATS:
        raise _invalid(
            "response_format",
            f"`response_format` is one of {', '.join(RESPONSE_FORMATS)}.",
            "unsupported_format",
        )
    speed = body.get("speed", 1.0)
    if not isinstance(speed, int | float) or isinstance(speed, bool):
        raise _invalid("speed", "`speed` must be a number from 0.25 to 4.0.", "invalid_speed")
    stream_format = "audio" if body.get("stream_format") is None else body["stream_format"]
    if stream_format not in ("audio", "sse"):
        raise _invalid("stream_format", '`stream_format` is "audio" or "sse".')
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _invalid("instructions", "`instructions` must be a string.")
    wanted = SynthesisRequest(
        text=text,
        voice_id=voice_for(voice),
        audio_format=response_format,
        sample_rate=SAMPLE_RATE,
        speed=float(speed),
        # OpenAI's endpoint streams its body as it is made, except a WAV: a WAV's header holds
        # its length, so a streamed one must say "unknown" there, and clients that read the
        # whole file (wave.open, strict decoders) then get a wrong length. A WAV comes whole,
        # with true sizes; `pcm` is the same audio streamed, and SSE streams whatever it carries.
        streaming=stream_format == "sse" or response_format != "wav",
    )
    return wanted, stream_format


def voice_for(name: str) -> str | None:
    """Our voice id for an OpenAI voice name (None: the engine's default); other names pass through."""
    if name.lower() not in OPENAI_VOICES:
        return name
    mapped = settings.OPENAI_VOICE_MAP.get(name.lower())
    if mapped and get_engine().find_builtin_voice(mapped) is not None:
        return mapped
    return None


def _usage(input_chars: int, audio_seconds: float) -> dict[str, int]:
    """OpenAI reports tokens; we have no tokenizer, so: input ~ 4 characters a
    token, output one token per 20 ms of audio (both documented estimates)."""
    input_tokens = math.ceil(input_chars / 4)
    output_tokens = math.ceil(audio_seconds * 50)
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


@async_api_view("POST", usage_endpoint=AUDIO_SPEECH, render_error=openai_error_response)
async def audio_speech(request: HttpRequest, principal: Principal) -> HttpResponseBase:
    wanted, stream_format = _parse(request)
    principal_require_voice(principal, wanted.voice_id)  # our voice id, after OpenAI's names are mapped
    text = wanted.text or ""
    meter = usage_meter_of(request)
    admission = await synthesis_admit(
        tenant=principal.tenant, request=wanted, meter=meter, lease=wanted.streaming
    )
    if stream_format == "audio":
        return await audio_response(request, admission)

    input_chars = len(text)

    async def events(
        first: AudioPart | None, rest: AsyncIterator[AudioPart], lease: StreamLease, result: SynthesisResult
    ) -> AsyncIterator[bytes]:
        async for audio in stream_body_closing(first, rest, lease):
            if meter is not None:
                meter.audio_sent(len(audio), result.audio_seconds)
            yield _sse({"type": "speech.audio.delta", "audio": base64.b64encode(audio).decode("ascii")})
        yield _sse({"type": "speech.audio.done", "usage": _usage(input_chars, result.audio_seconds)})

    return await audio_response(request, admission, stream_body=events, content_type="text/event-stream")
