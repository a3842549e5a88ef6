"""Usage rows in the admin: read-only and undeletable, filterable per tenant, endpoint, outcome and date."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from tenants.admin import TenantAdmin
from tenants.models import Tenant
from usage.models import QuotaUsage, UsageLog


class QuotaUsageInline(admin.TabularInline[QuotaUsage, Tenant]):
    """Audio used per month, as the quota counts it (read-only: the service keeps it)."""

    model = QuotaUsage
    extra = 0
    can_delete = False
    fields = ["month", "audio_seconds"]
    readonly_fields = ["month", "audio_seconds"]
    ordering = ["-month"]


# The tenant page shows its quota counters; tenants/ knows nothing of usage/ (layers).
TenantAdmin.inlines = [*TenantAdmin.inlines, QuotaUsageInline]


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

    # Usage is a record of what happened (the audit trail and the bill): it is never edited
    # or deleted by hand. Without delete permission Django offers no bulk delete either.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: UsageLog | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: UsageLog | None = None) -> bool:
        return False
