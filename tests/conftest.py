from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from rest_framework.test import APIClient

from tenants.models import Tenant
from tenants.services import IssuedKey, tenant_create

TenantFactory = Callable[..., tuple[Tenant, IssuedKey]]


@pytest.fixture
def make_tenant(db: None) -> TenantFactory:
    counter = iter(range(1_000_000))

    def factory(name: str | None = None, **limits: object) -> tuple[Tenant, IssuedKey]:
        return tenant_create(name=name or f"tenant-{next(counter)}", **limits)  # type: ignore[arg-type]

    return factory


@pytest.fixture
def tenant_and_key(make_tenant: TenantFactory) -> tuple[Tenant, IssuedKey]:
    return make_tenant("acme")


@pytest.fixture
def api_client() -> APIClient:
    return APIClient()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def xtts_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, randomly initialised tiny XTTS checkpoint, made once per test run."""
    from synthesis.management.commands.make_xtts_checkpoint import write_checkpoint

    directory = tmp_path_factory.mktemp("xtts_tiny")
    write_checkpoint(directory, full=False, speakers=["Ana Florence", "Claribel Dervla"], seed=0)
    return directory
