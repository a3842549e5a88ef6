"""GET /v1/voices, POST /v1/voices/upload, DELETE /v1/voices/{voice_id}."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.decorators import api_view
from rest_framework.request import Request
from rest_framework.response import Response

from api.views import async_api_view
from core.errors import ServiceError
from engines import get_engine
from tenants.authentication import Principal, request_tenant
from tenants.models import Permission
from voices.models import Voice
from voices.services import voice_create, voice_delete


class VoiceOutputSerializer(serializers.Serializer[Any]):
    voice_id = serializers.CharField()
    name = serializers.CharField()
    language = serializers.CharField()
    kind = serializers.ChoiceField(choices=["builtin", "cloned"])
    # Cloned voices only.
    reference_seconds = serializers.FloatField(required=False)
    created_at = serializers.DateTimeField(required=False)


class VoiceUploadInputSerializer(serializers.Serializer[dict[str, Any]]):
    name = serializers.CharField(max_length=200)
    language = serializers.CharField(max_length=16)
    voice_id = serializers.SlugField(max_length=48, required=False)


def cloned_voice_body(voice: Voice) -> dict[str, Any]:
    return {
        "voice_id": voice.voice_id,
        "name": voice.name,
        "language": voice.language,
        "kind": "cloned",
        "reference_seconds": voice.reference_seconds,
        "created_at": voice.created_at.isoformat(),
    }


@extend_schema(
    responses=inline_serializer(
        "VoiceList", {"voices": VoiceOutputSerializer(many=True), "engine": serializers.CharField()}
    ),
    summary="Built-in voices and the caller's own",
)
@api_view(["GET"])
def voice_list(request: Request) -> Response:
    engine = get_engine()
    voices: list[dict[str, Any]] = [
        {"voice_id": voice.voice_id, "name": voice.name, "language": voice.language, "kind": "builtin"}
        for voice in engine.builtin_voices()
    ]
    voices += [cloned_voice_body(voice) for voice in Voice.objects.filter(tenant=request_tenant(request))]
    return Response({"voices": voices, "engine": engine.name})


@async_api_view("POST")
async def voice_upload(request: HttpRequest, principal: Principal) -> HttpResponseBase:
    if not principal.tenant.has_permission(Permission.UPLOAD):
        raise ServiceError(403, "permission_denied", "This tenant may not upload voices.")
    cap = settings.VOICE_UPLOAD_MAX_BYTES
    # Refuse an oversized body from its declared length, before reading it (the
    # server does so too, before authentication: callwaiting_tts/http_server.py).
    declared = int(request.META.get("CONTENT_LENGTH") or 0)
    if declared > settings.VOICE_UPLOAD_MAX_BODY_BYTES:
        raise ServiceError(413, "upload_too_large", f"The upload is over the {cap} byte limit.")
    if not (request.content_type or "").startswith("multipart/form-data"):
        raise ServiceError(400, "invalid_request", "Send multipart/form-data with file, name and language.")
    upload = request.FILES.get("file")
    if upload is None:
        raise serializers.ValidationError({"file": ["This field is required."]})
    if upload.size is not None and upload.size > cap:
        raise ServiceError(413, "upload_too_large", f"The file is over the {cap} byte limit.")
    fields = VoiceUploadInputSerializer(data=request.POST.dict())
    fields.is_valid(raise_exception=True)
    voice = await voice_create(
        tenant=principal.tenant,
        engine=get_engine(),
        audio=upload.read(),
        name=fields.validated_data["name"],
        language=fields.validated_data["language"],
        voice_id=fields.validated_data.get("voice_id"),
    )
    return JsonResponse(cloned_voice_body(voice), status=201)


@async_api_view("DELETE")
async def voice_detail(request: HttpRequest, principal: Principal, voice_id: str) -> HttpResponseBase:
    await voice_delete(tenant=principal.tenant, voice_id=voice_id)
    return HttpResponse(status=204)
