"""Admin login throttling on the real server: Daphne runs Django's middleware in its async mode,
which the test client does not, and the limit comes from the environment."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from axes.models import AccessAttempt, AccessLog
from django.contrib.auth import get_user_model

from tests.support.servers import ServiceEnv, daphne_server
from tests.support.tenants import bearer

pytestmark = [pytest.mark.slow, pytest.mark.django_db]  # the server shares pytest's test database
PASSWORD = "a long and right password"
CSRF_FIELD = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')


@pytest.fixture(scope="module")  # made before, and outside, the test's transaction
def committed_staff(django_db_blocker: Any, test_database_url: str) -> Iterator[str]:
    username = f"staff-{uuid.uuid4().hex[:8]}"
    with django_db_blocker.unblock():
        get_user_model().objects.create_superuser(username, f"{username}@example.com", PASSWORD)
    try:
        yield username
    finally:
        with django_db_blocker.unblock():
            AccessAttempt.objects.filter(username=username).delete()
            AccessLog.objects.filter(username=username).delete()
            get_user_model().objects.filter(username=username).delete()


def log_in(client: httpx.Client, username: str, password: str) -> httpx.Response:
    form = client.get("/admin/login/")
    match = CSRF_FIELD.search(form.text)
    assert match is not None, form.text[:500]
    return client.post(
        "/admin/login/",
        data={
            "username": username,
            "password": password,
            "next": "/admin/",
            "csrfmiddlewaretoken": match.group(1),
        },
    )


@pytest.mark.timeout(180)
def test_the_admin_login_locks_out_on_daphne_and_the_api_keeps_answering(
    service_env: ServiceEnv, committed_staff: str, module_tenant
) -> None:
    _tenant, issued = module_tenant
    with (
        daphne_server(service_env(ADMIN_LOGIN_FAILURE_LIMIT="3")) as base_url,
        httpx.Client(base_url=base_url, timeout=30) as client,
    ):
        assert log_in(client, committed_staff, "wrong").status_code == 200
        assert log_in(client, committed_staff, "wrong").status_code == 200
        assert log_in(client, committed_staff, "wrong").status_code == 429
        locked = log_in(client, committed_staff, PASSWORD)
        assert locked.status_code == 429
        assert "too many login attempts" in locked.text
        assert "sessionid" not in client.cookies

        # The same address's API requests are answered as ever, right key or wrong.
        assert client.get("/v1/tenant", headers=bearer(issued.plaintext)).status_code == 200
        assert client.get("/v1/tenant", headers=bearer(issued.plaintext[:-4] + "AAAA")).status_code == 401
