"""Tenant and API key operations: the one place keys are issued, rotated and revoked."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from tenants import keys
from tenants.models import ApiKey, Permission, Tenant
from tenants.tokens import normalise_origin

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IssuedKey:
    """A freshly issued key. `plaintext` must be shown once and then forgotten."""

    api_key: ApiKey
    plaintext: str


class TenantNotFound(Exception):
    pass


def api_key_issue(*, tenant: Tenant, name: str = "", expires_at: datetime | None = None) -> IssuedKey:
    secret = keys.generate_secret()
    # A prefix collision is astronomically rare (36^8) but harmless to retry.
    for _attempt in range(5):
        prefix = keys.generate_prefix()
        try:
            with transaction.atomic():
                api_key = ApiKey.objects.create(
                    tenant=tenant,
                    prefix=prefix,
                    secret_hash=keys.hash_secret(secret),
                    name=name,
                    expires_at=expires_at,
                )
        except IntegrityError:
            continue
        return IssuedKey(api_key=api_key, plaintext=keys.format_key(prefix, secret))
    raise RuntimeError("Could not find a free API key prefix after 5 attempts.")


def tenant_create(
    *,
    name: str,
    quota_minutes: int | None = None,
    rate_limit_minute: int | None = None,
    rate_limit_hour: int | None = None,
    max_concurrent_streams: int | None = None,
    permissions: Iterable[str] = (),
    allowed_origins: Iterable[str] = (),
) -> tuple[Tenant, IssuedKey]:
    unknown = sorted(set(permissions) - set(Permission.values))
    if unknown:
        raise ValueError(
            f"Unknown permission(s): {', '.join(unknown)}. Known: {', '.join(Permission.values)}."
        )
    origins = {origin: normalise_origin(origin) for origin in allowed_origins}
    if bad := sorted(origin for origin, normalised in origins.items() if normalised is None):
        raise ValueError(f"Not browser origins (scheme://host[:port]): {', '.join(bad)}.")
    limits = {
        "quota_minutes": quota_minutes,
        "rate_limit_minute": rate_limit_minute,
        "rate_limit_hour": rate_limit_hour,
        "max_concurrent_streams": max_concurrent_streams,
    }
    with transaction.atomic():
        tenant = Tenant.objects.create(
            name=name,
            permissions=sorted(set(permissions)),
            allowed_origins=sorted({origin for origin in origins.values() if origin is not None}),
            **{field: value for field, value in limits.items() if value is not None},
        )
        issued = api_key_issue(tenant=tenant, name="initial")
    return tenant, issued


def api_key_rotate(*, tenant: Tenant, grace_seconds: int) -> IssuedKey:
    """Issue a new key; the tenant's current keys stay valid for `grace_seconds` more.

    The overlap lets a client deploy the new key before the old one stops
    working. A key that already expires sooner keeps its earlier expiry.
    """
    if grace_seconds < 0:
        raise ValueError("The grace period cannot be negative.")
    now = timezone.now()
    retire_at = now + timedelta(seconds=grace_seconds)
    with transaction.atomic():
        current = ApiKey.objects.select_for_update().filter(tenant=tenant).usable(now)
        current.filter(expires_at__isnull=True).update(expires_at=retire_at)
        current.filter(expires_at__gt=retire_at).update(expires_at=retire_at)
        issued = api_key_issue(tenant=tenant, name=f"rotated {now:%Y-%m-%d %H:%M}")
        tenant_access_changed(tenant.id)
        return issued


def api_key_revoke(*, api_key: ApiKey) -> bool:
    """Revoke for good. Returns False if the key was already revoked."""
    updated = ApiKey.objects.filter(pk=api_key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    api_key.refresh_from_db(fields=["revoked_at"])
    if updated:
        tenant_access_changed(api_key.tenant_id)
    return updated == 1


def tenant_set_active(*, tenants: QuerySet[Tenant], active: bool) -> int:
    """Activate or deactivate tenants; open streams of a deactivated one close."""
    ids = list(tenants.values_list("id", flat=True))
    count = Tenant.objects.filter(id__in=ids).update(is_active=active)
    if not active:
        for tenant_id in ids:
            tenant_access_changed(tenant_id)
    return count


def tenant_access_group(tenant_id: uuid.UUID) -> str:
    """The channel-layer group of a tenant's open WebSocket streams."""
    return f"tenant-access.{tenant_id.hex}"


_broadcasts: set[asyncio.Task[None]] = set()


def tenant_access_changed(tenant_id: uuid.UUID) -> None:
    """Tell every server process's open streams of this tenant to check their key
    again (revoked, expired, or tenant deactivated: they close). Sent once the
    change is committed, through the channel layer (Redis in production)."""

    def broadcast() -> None:
        layer = get_channel_layer()
        if layer is None:
            return
        group, message = tenant_access_group(tenant_id), {"type": "access.changed"}
        try:
            task = asyncio.get_running_loop().create_task(layer.group_send(group, message))
        except RuntimeError:
            pass  # no event loop in this thread (the admin, a management command)
        else:
            # The event loop keeps only a weak reference to a task: hold it until it is done.
            _broadcasts.add(task)
            task.add_done_callback(_broadcasts.discard)
            return
        try:
            async_to_sync(layer.group_send)(group, message)
        except Exception:
            # Streams then close when their key's expiry or the next check finds it.
            logger.exception("Could not tell open streams of tenant %s about an access change.", tenant_id)

    transaction.on_commit(broadcast)


def tenant_resolve(identifier: str) -> Tenant:
    """Find a tenant by its UUID or its exact name."""
    try:
        return Tenant.objects.get(pk=uuid.UUID(identifier))
    except (ValueError, Tenant.DoesNotExist):
        pass
    try:
        return Tenant.objects.get(name=identifier)
    except Tenant.DoesNotExist:
        raise TenantNotFound(f"No tenant with id or name {identifier!r}.") from None
