from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from tenants.models import Tenant
from tenants.services import IssuedKey, tenant_create
from tests.support.database import retry_flush_on_deadlock
from tests.support.servers import RedisServer, ServiceEnv, base_env
from tests.support.tenants import TenantFactory, committed_tenant

retry_flush_on_deadlock()


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


@pytest.fixture(scope="session")
def xtts_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, randomly initialised tiny XTTS checkpoint, made once per test run."""
    from synthesis.management.commands.make_xtts_checkpoint import write_checkpoint

    directory = tmp_path_factory.mktemp("xtts_tiny")
    write_checkpoint(directory, full=False, speakers=["Ana Florence", "Claribel Dervla"], seed=0)
    return directory


@pytest.fixture(scope="session")
def test_database_url(django_db_setup: None) -> str:
    """The URL of pytest-django's test database, for servers run in subprocesses."""
    from django.db import connection

    database = connection.settings_dict
    return f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}"


@pytest.fixture(scope="module")
def module_tenant(django_db_blocker: Any, test_database_url: str) -> Iterator[tuple[Tenant, IssuedKey]]:
    # 0: unlimited; these tests are about other things than limits.
    limits = {"max_concurrent_streams": 100, "rate_limit_minute": 0, "rate_limit_hour": 0}
    with committed_tenant(django_db_blocker, "e2e", **limits) as tenant_and_key:
        yield tenant_and_key


@pytest.fixture(scope="session", autouse=True)
def close_connections_of_async_tests(django_db_setup: None) -> Iterator[None]:
    """Async tests' ORM calls run on asgiref's shared sync thread, whose database
    connection would otherwise still be open when the test database is dropped."""
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    SyncToAsync.single_thread_executor.submit(connections.close_all).result(timeout=10)


@pytest.fixture(scope="session")
def service_env(test_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> ServiceEnv:
    """Environment for a Daphne subprocess sharing this run's test database.

    It gets the tests' SECRET_KEY (API key hashes are keyed with it), its own
    media and log folders, and deterministic Piper (noise 0), unless overridden.
    """
    from django.conf import settings

    def make(**overrides: str) -> dict[str, str]:
        return base_env(
            **{
                "SECRET_KEY": settings.SECRET_KEY,
                "DATABASE_URL": test_database_url,
                # Servers given REDIS_URL share this run's keyspace, not another run's.
                "REDIS_KEY_PREFIX": settings.REDIS_KEY_PREFIX,
                "MEDIA_ROOT": str(tmp_path_factory.mktemp("media")),
                "CWT_TEST_LOG_DIR": str(tmp_path_factory.mktemp("logs")),
                "USAGE_SPOOL_DIR": str(tmp_path_factory.mktemp("usage-spool")),
                "USAGE_FLUSH_SECONDS": "0.2",
                "TTS_ENGINE": "piper",
                "PIPER_NOISE_SCALE": "0",
                "PIPER_NOISE_W_SCALE": "0",
                # Not by the loaded machine's speed (tests/settings.py); admission tests set it.
                "ENGINE_ADMISSION": "fixed",
                **overrides,
            }
        )

    return make


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server that the test may stop and start."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


# A whole API key (`cwt_<prefix>_<secret>`; the prefix alone is not secret) or the value of a
# signature in a query string (signed audio links, S3's presigned ones), not redacted.
# A client token (`cwtc_<signed payload>`, tenants.tokens) is a credential as well.
_SECRET_IN_LOG = re.compile(
    r"cwt_[a-z0-9]{8}_[A-Za-z0-9_-]{16,}|cwtc_[A-Za-z0-9_.:-]{16,}"
    r"|(?i:\b(?:signature|x-amz-signature|sig)=(?!REDACTED)[^&\s\"']+)"
)


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_server_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After the whole run: no line that any server wrote holds a key or a signature."""
    yield
    leaks = [
        f"{path.name}: {line.strip()[:200]}"
        for path in sorted(tmp_path_factory.getbasetemp().glob("logs*/daphne-*.log"))
        for line in path.read_text(errors="replace").splitlines()
        if _SECRET_IN_LOG.search(line)
    ]
    assert not leaks, "secrets in server logs:\n" + "\n".join(leaks[:20])
