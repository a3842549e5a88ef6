from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from voices.models import Voice
from voices.services import voice_delete_sync


@admin.register(Voice)
class VoiceAdmin(admin.ModelAdmin[Voice]):
    list_display = ["voice_id", "tenant", "name", "language", "reference_seconds", "created_at"]
    list_filter = ["tenant", "language"]
    search_fields = ["voice_id", "name", "tenant__name"]
    readonly_fields = ["tenant", "voice_id", "reference_audio", "reference_seconds", "created_at"]
    fields = [
        "tenant",
        "voice_id",
        "name",
        "language",
        "meta",
        "reference_audio",
        "reference_seconds",
        "created_at",
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # voices come from POST /v1/voices/upload, which validates the audio

    def delete_model(self, request: HttpRequest, obj: Voice) -> None:
        voice_delete_sync(obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Voice]) -> None:
        for voice in queryset:
            voice_delete_sync(voice)
