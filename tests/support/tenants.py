"""Tenants for tests: a factory's type, the auth header, and tenants committed outside any
test's transaction for servers running in other processes."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from django.db import transaction

from tenants.models import ApiKey, Tenant
from tenants.services import IssuedKey, tenant_create
from usage.models import UsageLog

TenantFactory = Callable[..., tuple[Tenant, IssuedKey]]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextmanager
def committed_tenant(django_db_blocker: Any, label: str, **fields: Any) -> Iterator[tuple[Tenant, IssuedKey]]:
    """A tenant committed outside any test's transaction, so that servers in
    subprocesses see it; deleted (with all it owns) afterwards."""
    with django_db_blocker.unblock():
        tenant, issued = tenant_create(name=f"{label}-{uuid.uuid4().hex[:8]}", **fields)
    try:
        yield tenant, issued
    finally:
        with django_db_blocker.unblock(), transaction.atomic():
            # Keys and usage rows protect their tenant (the service never deletes history):
            # a test's own rows go first. The tenant's row is locked first, so that a server
            # still writing this tenant's usage waits for the delete (and then drops its rows)
            # instead of adding one between the two deletes.
            if Tenant.objects.select_for_update().filter(pk=tenant.pk).exists():
                UsageLog.objects.filter(tenant=tenant).delete()
                ApiKey.objects.filter(tenant=tenant).delete()
                Tenant.objects.filter(pk=tenant.pk).delete()
