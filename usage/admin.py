"""Usage rows in the admin: read-only, filterable per tenant, endpoint, outcome and date."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from usage.models import UsageLog


@admin.register(UsageLog)
class UsageLogAdmin(admin.ModelAdmin[UsageLog]):
    list_display = (
        "created_at",
        "tenant",
        "endpoint",
        "status_code",
        "error_code",
        "voice_id",
        "format",
        "streaming",
        "cached",
        "input_chars",
        "audio_seconds",
        "audio_bytes",
        "latency_ms",
        "total_ms",
    )
    list_filter = ("tenant", "endpoint", "status_code", "error_code", "streaming", "cached", "format")
    list_select_related = ("tenant",)
    date_hierarchy = "created_at"
    search_fields = ("request_id",)
    show_full_result_count = False  # a count(*) over millions of rows on every page is slow

    # Usage is a record of what happened: it is never edited by hand.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: UsageLog | None = None) -> bool:
        return False
