from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, TypedDict, cast

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Count, Q, QuerySet
from django.utils import timezone
from django_stubs_ext import WithAnnotations


class Permission(models.TextChoices):
    UPLOAD = "upload", "Upload cloned voices"


MINT_CLIENT_TOKEN = "tenants.mint_client_token"  # noqa: S105  (a permission name)
VIEW_TENANT = "tenants.view_tenant"


def _no_permissions() -> list[str]:
    return []


def _no_origins() -> list[str]:
    return []


def usable_keys_q(at: datetime, via: str = "") -> Q:
    """Keys that are neither revoked nor expired at `at` (whatever their tenant's state);
    `via` is the lookup path from another model, e.g. "api_keys__" from Tenant."""
    return Q(**{f"{via}revoked_at__isnull": True}) & (
        Q(**{f"{via}expires_at__isnull": True}) | Q(**{f"{via}expires_at__gt": at})
    )


class UsableKeyCount(TypedDict):
    usable_key_count: int


class TenantQuerySet(QuerySet["Tenant"]):
    def with_usable_key_count(
        self, at: datetime | None = None
    ) -> QuerySet[WithAnnotations[Tenant, UsableKeyCount]]:
        """Each tenant with `usable_key_count`: its keys that are neither revoked nor expired."""
        usable = usable_keys_q(at or timezone.now(), via="api_keys__")
        # cast: the plugin names the annotation with an anonymous TypedDict of the same shape.
        annotated = self.annotate(usable_key_count=Count("api_keys", filter=usable))
        return cast("QuerySet[WithAnnotations[Tenant, UsableKeyCount]]", annotated)


class Tenant(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200, unique=True)
    is_active = models.BooleanField(default=True)
    quota_minutes = models.PositiveIntegerField(
        default=600, help_text="Minutes of synthesized audio per calendar month (UTC)."
    )
    rate_limit_minute = models.PositiveIntegerField(default=60, help_text="Requests per minute.")
    rate_limit_hour = models.PositiveIntegerField(default=1000, help_text="Requests per hour.")
    max_concurrent_streams = models.PositiveIntegerField(default=4)
    permissions = models.JSONField(default=_no_permissions, blank=True, help_text='e.g. ["upload"]')
    # Browser origins (`https://app.example.com`) whose pages may call the API with this
    # tenant's key or client tokens (tenants.origins); none by default.
    allowed_origins = models.JSONField(
        default=_no_origins, blank=True, help_text='e.g. ["https://app.example.com"]'
    )
    created_at = models.DateTimeField(auto_now_add=True)

    # DRF's IsAuthenticated asks the principal on the request; a tenant that an
    # API key resolved to is authenticated.
    is_authenticated: ClassVar[bool] = True
    is_anonymous: ClassVar[bool] = False

    objects = TenantQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        # Granted to staff users or groups in the admin (Users, Groups): the playground mints a
        # streaming token for a tenant only for a user who holds it and may view tenants.
        permissions = [("mint_client_token", "Can mint client tokens")]

    def __str__(self) -> str:
        return self.name

    def has_permission(self, permission: Permission | str) -> bool:
        return str(permission) in self.permissions


class ApiKeyQuerySet(QuerySet["ApiKey"]):
    def usable(self, at: datetime | None = None) -> ApiKeyQuerySet:
        return self.filter(usable_keys_q(at or timezone.now()))


@dataclass(frozen=True)
class KeyRefusal:
    """Why a key that matches its secret is refused: a stable code and a sentence."""

    code: str
    message: str


KEY_REVOKED = KeyRefusal("revoked_api_key", "This API key has been revoked.")
KEY_EXPIRED = KeyRefusal("expired_api_key", "This API key has expired; use the tenant's current key.")
TENANT_INACTIVE = KeyRefusal("tenant_inactive", "The tenant for this API key is deactivated.")


class ApiKey(models.Model):
    """A tenant's credential. Only a keyed hash of the secret is stored.

    The full key, `cwt_<prefix>_<secret>`, exists in plaintext only in the
    response that created it (see tenants.keys).
    """

    # PROTECT: a tenant is deactivated, never deleted with the record of its keys.
    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="api_keys")
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    name = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"cwt_{self.prefix}_…"

    def is_expired(self, at: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (at or timezone.now())

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def clean(self) -> None:
        """A key's end only moves toward ending: `expires_at` and `revoked_at` may be set or
        brought forward, never cleared or pushed later, so a key that has ended (a rotated-out
        key past its grace, a revoked one) stays ended. Checked against the stored row, by
        every ModelForm (the admin's change form) through full_clean()."""
        if self.pk is None:
            return
        stored = ApiKey.objects.filter(pk=self.pk).values_list("expires_at", "revoked_at").first()
        if stored is None:
            return
        problems: dict[str, str] = {}
        changes = (
            ("expires_at", "Expires at", stored[0], self.expires_at),
            ("revoked_at", "Revoked at", stored[1], self.revoked_at),
        )
        for field, label, before, after in changes:
            if before is None:
                continue  # not set yet: it may be set to any time
            if after is None:
                problems[field] = f"{label} cannot be cleared: a key's end can only be brought forward."
            elif after > before:
                problems[field] = (
                    f"{label} cannot move later than {before:%Y-%m-%d %H:%M:%S %Z}: a key's end can only "
                    "be brought forward. Issue a new key instead."
                )
        if problems:
            raise ValidationError(problems)

    def refusal(self, at: datetime | None = None) -> KeyRefusal | None:
        """Why this key may not be used now, or None: the one rule for authentication
        and for open streams re-checking their key."""
        if self.is_revoked:
            return KEY_REVOKED
        if self.is_expired(at):
            return KEY_EXPIRED
        if not self.tenant.is_active:
            return TENANT_INACTIVE
        return None
