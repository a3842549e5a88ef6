"""POST /v1/synthesize.

`synthesize` is a plain async Django view (DRF has no async views): under
Daphne it runs on the event loop, so a streamed response never holds Django's
one sync thread, and audio bytes go out as the engine produces them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from rest_framework import serializers

from callwaiting_tts.async_views import async_api_view
from callwaiting_tts.errors import ApiError, error_response
from synthesis.engines import EngineFailure, EngineOverloaded
from synthesis.services import SynthesisResult, synthesis_audio, synthesis_plan
from tenants.authentication import Principal


class SynthesizeInputSerializer(serializers.Serializer[dict[str, Any]]):
    text = serializers.CharField(allow_blank=True, trim_whitespace=False)
    voice_id = serializers.CharField(required=False, allow_blank=True, max_length=100)
    language = serializers.CharField(required=False, allow_blank=True, max_length=16)
    format = serializers.CharField(required=False, default="wav", max_length=16)
    sample_rate = serializers.IntegerField(required=False, allow_null=True)
    speed = serializers.FloatField(required=False, default=1.0)
    streaming = serializers.BooleanField(required=False, default=False)


def _parse_body(request: HttpRequest) -> dict[str, Any]:
    try:
        payload = json.loads(request.body or b"null")
    except RequestDataTooBig:
        raise ApiError(413, "request_too_large", "The request body is too large.") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "malformed_json", "The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "malformed_json", "The request body must be a JSON object.")
    serializer = SynthesizeInputSerializer(data=payload)
    if not serializer.is_valid():
        raise serializers.ValidationError(serializer.errors)
    return dict(serializer.validated_data)


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        yield first
        async for data in rest:
            yield data
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


@async_api_view("POST")
async def synthesize(request: HttpRequest, principal: Principal) -> HttpResponseBase:
    fields = _parse_body(request)
    plan = await synthesis_plan(
        tenant=principal.tenant,
        text=fields["text"],
        voice_id=fields.get("voice_id"),
        language=fields.get("language"),
        audio_format=fields["format"],
        sample_rate=fields.get("sample_rate"),
        speed=fields["speed"],
    )
    result = SynthesisResult(spec=plan.spec)
    streaming = fields["streaming"]
    audio = synthesis_audio(plan, result, streaming=streaming)
    try:
        # Wait for the first audio before answering: refusals (overload) and
        # early engine failures still get a real status code, and the first
        # bytes go out with the headers.
        first = await anext(audio, b"")
    except EngineOverloaded as exc:
        return error_response(
            request, 503, "engine_overloaded", str(exc), headers={"Retry-After": str(exc.retry_after_s)}
        )
    except EngineFailure as exc:
        return error_response(request, 500, "engine_error", f"The speech engine failed: {exc}")

    headers = {"X-Audio-Format": plan.spec.format.value, "X-Sample-Rate": str(plan.spec.sample_rate)}
    response: HttpResponseBase
    if streaming:
        response = StreamingHttpResponse(_prepend(first, audio), content_type=plan.spec.content_type)
        response["Cache-Control"] = "no-store"
        response["X-Accel-Buffering"] = "no"  # let proxies pass chunks through
    else:
        parts = [first]
        try:
            async for data in audio:
                parts.append(data)
        except EngineFailure as exc:
            return error_response(request, 500, "engine_error", f"The speech engine failed: {exc}")
        body = b"".join(parts)
        response = HttpResponse(body, content_type=plan.spec.content_type)
        response["Content-Length"] = str(len(body))
        response["X-Audio-Duration"] = f"{result.audio_seconds:.3f}"
    for name, value in headers.items():
        response[name] = value
    return response
