"""Provisioning from the Django admin.

A new key's plaintext appears once, in the message shown after the action
that made it; afterwards only its prefix is ever displayed.
"""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ActionForm
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.utils import timezone

from tenants.models import ApiKey, Tenant, usable_keys_q
from tenants.services import (
    IssuedKey,
    api_key_issue,
    api_key_revoke,
    api_key_rotate,
    tenant_access_changed,
    tenant_set_active,
)

GRACE_CHOICES = [
    (0, "immediately"),
    (3600, "after 1 hour"),
    (86400, "after 24 hours"),
    (7 * 86400, "after 7 days"),
    (30 * 86400, "after 30 days"),
]


class TenantActionForm(ActionForm):
    grace_seconds = forms.TypedChoiceField(
        label="Old keys stop working",
        choices=GRACE_CHOICES,
        coerce=int,
        initial=86400,
        required=False,
    )


def _show_key_once(request: HttpRequest, tenant: Tenant, issued: IssuedKey) -> None:
    messages.warning(
        request,
        f"New API key for {tenant.name}: {issued.plaintext} — copy it now, it will not be shown again.",
    )


class ApiKeyInline(admin.TabularInline[ApiKey, Tenant]):
    model = ApiKey
    extra = 0
    can_delete = False
    fields = ["prefix", "name", "created_at", "last_used_at", "expires_at", "revoked_at"]
    readonly_fields = ["prefix", "created_at", "last_used_at", "expires_at", "revoked_at"]
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Tenant | None = None) -> bool:
        return False  # keys are made by the tenant actions, which show the plaintext once


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin[Tenant]):
    list_display = [
        "name",
        "is_active",
        "usable_keys",
        "quota_minutes",
        "rate_limit_minute",
        "rate_limit_hour",
        "max_concurrent_streams",
        "created_at",
    ]
    list_filter = ["is_active"]
    search_fields = ["name", "id"]
    readonly_fields = ["id", "created_at"]
    inlines = [ApiKeyInline]  # usage/admin.py adds audio used per month
    action_form = TenantActionForm
    actions = ["issue_key", "rotate_keys", "deactivate", "activate"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Tenant]:
        usable = usable_keys_q(timezone.now(), via="api_keys__")
        return super().get_queryset(request).annotate(usable_key_count=Count("api_keys", filter=usable))

    @admin.display(description="Usable keys", ordering="usable_key_count")
    def usable_keys(self, tenant: Tenant) -> int:
        return int(getattr(tenant, "usable_key_count", 0))

    def save_model(
        self, request: HttpRequest, obj: Tenant, form: forms.ModelForm[Tenant], change: bool
    ) -> None:
        super().save_model(request, obj, form, change)
        if not change:
            _show_key_once(request, obj, api_key_issue(tenant=obj, name="initial"))
        elif "is_active" in form.changed_data and not obj.is_active:
            tenant_access_changed(obj.id)

    @admin.action(description="Issue an additional API key")
    def issue_key(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        for tenant in queryset:
            _show_key_once(request, tenant, api_key_issue(tenant=tenant, name="admin"))

    @admin.action(description="Rotate API keys (new key; old keys stop as chosen)")
    def rotate_keys(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        raw = request.POST.get("grace_seconds") or "86400"
        allowed = {value for value, _label in GRACE_CHOICES}
        grace_seconds = int(raw) if raw.isdigit() and int(raw) in allowed else 86400
        for tenant in queryset:
            _show_key_once(request, tenant, api_key_rotate(tenant=tenant, grace_seconds=grace_seconds))

    @admin.action(description="Deactivate (all keys stop working)")
    def deactivate(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        count = tenant_set_active(tenants=queryset, active=False)
        messages.info(request, f"Deactivated {count} tenant(s).")

    @admin.action(description="Activate")
    def activate(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> None:
        count = tenant_set_active(tenants=queryset, active=True)
        messages.info(request, f"Activated {count} tenant(s).")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin[ApiKey]):
    list_display = ["__str__", "tenant", "name", "created_at", "last_used_at", "expires_at", "revoked_at"]
    list_filter = ["tenant", "revoked_at"]
    search_fields = ["prefix", "tenant__name", "name"]
    fields = ["tenant", "prefix", "name", "created_at", "last_used_at", "expires_at", "revoked_at"]
    readonly_fields = ["tenant", "prefix", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # issue keys from the tenant page, which shows the plaintext once

    def has_delete_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        return False  # revoke instead: the row keeps the audit trail

    @admin.action(description="Revoke selected keys (cannot be undone)")
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        revoked = sum(api_key_revoke(api_key=api_key) for api_key in queryset)
        messages.info(request, f"Revoked {revoked} key(s).")
