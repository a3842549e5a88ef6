"""Provisioning from the Django admin.

A new key's plaintext appears once, on the page that answers the action (or the tenant
creation) that made it, and nowhere else: never in a message, the session or a cookie
(Django's messages live in a cookie, signed but readable by whoever holds it). Afterwards
only its prefix is ever displayed.

Nothing here erases history: tenants are deactivated, not deleted; keys are revoked, after a
confirmation page, and stay listed.
"""

from __future__ import annotations

from collections.abc import Iterable

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME, ActionForm
from django.db.models import Count, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.cache import add_never_cache_headers

from tenants.models import ApiKey, Permission, Tenant, usable_keys_q
from tenants.services import (
    IssuedKey,
    api_key_issue,
    api_key_revoke,
    api_key_rotate,
    tenant_access_changed,
    tenant_set_active,
)
from tenants.tokens import normalise_origin

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


class TenantForm(forms.ModelForm[Tenant]):
    # Stored as a JSON list of names (Tenant.permissions); edited as one box per known name.
    permissions = forms.MultipleChoiceField(
        choices=Permission.choices,
        widget=forms.CheckboxSelectMultiple,
        required=False,
        help_text="What this tenant's keys may do besides synthesis.",
    )
    # Stored as a JSON list (Tenant.allowed_origins); edited as one origin per line.
    allowed_origins = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60}),
        required=False,
        label="Allowed browser origins",
        help_text="One per line, e.g. https://app.example.com. Pages on these origins may call the API "
        "with this tenant's key or client tokens; none by default.",
    )

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        origins = self.initial.get("allowed_origins")
        if isinstance(origins, list):
            self.initial["allowed_origins"] = "\n".join(origins)

    class Meta:
        model = Tenant
        fields = [
            "name",
            "is_active",
            "quota_minutes",
            "rate_limit_minute",
            "rate_limit_hour",
            "max_concurrent_streams",
            "permissions",
            "allowed_origins",
        ]

    def clean_allowed_origins(self) -> list[str]:
        origins: list[str] = []
        for line in str(self.cleaned_data["allowed_origins"] or "").splitlines():
            if not line.strip():
                continue
            origin = normalise_origin(line)
            if origin is None:
                raise forms.ValidationError(
                    f"{line.strip()!r} is not a browser origin: scheme and host only, e.g. https://app.example.com."
                )
            if origin not in origins:
                origins.append(origin)
        return origins

    def clean_permissions(self) -> list[str]:
        chosen = set(self.cleaned_data["permissions"])
        return [value for value in Permission.values if value in chosen]  # one order, whatever the form's


def _new_keys_page(
    request: HttpRequest,
    model_admin: admin.ModelAdmin[Tenant],
    issued: Iterable[tuple[Tenant, IssuedKey]],
    *,
    title: str,
    note: str = "",
    back_url: str,
) -> TemplateResponse:
    """The one place a new key's plaintext is shown: this response's body."""
    context = {
        **model_admin.admin_site.each_context(request),
        "title": title,
        "opts": model_admin.model._meta,
        "keys": [(tenant, key.plaintext) for tenant, key in issued],
        "note": note,
        "back_url": back_url,
    }
    response = TemplateResponse(request, "admin/tenants/tenant/new_keys.html", context)
    add_never_cache_headers(response)  # a live secret: no browser or proxy keeps a copy
    return response


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
    form = TenantForm
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

    def has_delete_permission(self, request: HttpRequest, obj: Tenant | None = None) -> bool:
        return False  # deactivate instead: its keys and usage rows are the audit trail

    def save_model(
        self, request: HttpRequest, obj: Tenant, form: forms.ModelForm[Tenant], change: bool
    ) -> None:
        super().save_model(request, obj, form, change)
        if change and "is_active" in form.changed_data and not obj.is_active:
            tenant_access_changed(obj.id)

    def response_add(
        self, request: HttpRequest, obj: Tenant, post_url_continue: str | None = None
    ) -> HttpResponse:
        # The first key is issued here rather than in save_model, because only the response can
        # show it (still inside the add view's transaction).
        issued = api_key_issue(tenant=obj, name="initial")
        return _new_keys_page(
            request,
            self,
            [(obj, issued)],
            title=f"Tenant {obj.name} added",
            back_url=reverse("admin:tenants_tenant_change", args=[obj.pk]),
        )

    @admin.action(description="Issue an additional API key")
    def issue_key(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> TemplateResponse:
        issued = [(tenant, api_key_issue(tenant=tenant, name="admin")) for tenant in queryset]
        return _new_keys_page(
            request,
            self,
            issued,
            title="New API keys",
            back_url=reverse("admin:tenants_tenant_changelist"),
        )

    @admin.action(description="Rotate API keys (new key; old keys stop as chosen)")
    def rotate_keys(self, request: HttpRequest, queryset: QuerySet[Tenant]) -> TemplateResponse:
        raw = request.POST.get("grace_seconds") or "86400"
        choices = dict(GRACE_CHOICES)
        grace_seconds = int(raw) if raw.isdigit() and int(raw) in choices else 86400
        issued = [(tenant, api_key_rotate(tenant=tenant, grace_seconds=grace_seconds)) for tenant in queryset]
        return _new_keys_page(
            request,
            self,
            issued,
            title="Rotated API keys",
            note=f"The keys these replace stop working {choices[grace_seconds]}.",
            back_url=reverse("admin:tenants_tenant_changelist"),
        )

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
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> TemplateResponse | None:
        # As Django's own delete: the first POST asks, and only the confirmation page's POST acts.
        if request.POST.get("post") == "yes":
            revoked = sum(api_key_revoke(api_key=api_key) for api_key in queryset)
            messages.info(request, f"Revoked {revoked} key(s).")
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Revoke these API keys?",
            "opts": self.model._meta,
            "keys": list(queryset.select_related("tenant")),
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
            "back_url": reverse("admin:tenants_apikey_changelist"),
        }
        return TemplateResponse(request, "admin/tenants/apikey/revoke_confirmation.html", context)
