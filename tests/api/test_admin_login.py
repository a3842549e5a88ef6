"""Admin login throttling (django-axes): wrong passwords lock out one username from one address,
the right password too while locked, and nothing else; the API's key authentication is untouched."""

from __future__ import annotations

from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.conf import settings
from django.test import Client

from tests.support.tenants import bearer

pytestmark = pytest.mark.django_db
PASSWORD = "a long and right password"


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_superuser("root", "root@example.com", PASSWORD)


def log_in(username: str, password: str, address: str = "198.51.100.7"):
    client = Client(REMOTE_ADDR=address)
    response = client.post("/admin/login/", {"username": username, "password": password, "next": "/admin/"})
    logged_in = "_auth_user_id" in client.session
    return response, logged_in


def lock_out(username: str, address: str = "198.51.100.7") -> None:
    for _attempt in range(settings.AXES_FAILURE_LIMIT - 1):
        response, logged_in = log_in(username, "wrong", address)
        assert response.status_code == 200  # the login form again, with its error
        assert not logged_in
    response, _ = log_in(username, "wrong", address)
    assert response.status_code == 429


def test_the_defaults_are_five_failures_and_fifteen_minutes() -> None:
    limit, cool_off = settings.AXES_FAILURE_LIMIT, settings.AXES_COOLOFF_TIME
    assert (limit, cool_off) == (5, timedelta(minutes=15))


def test_wrong_passwords_lock_the_admin_login_even_for_the_right_password(staff) -> None:
    lock_out("root")
    response, logged_in = log_in("root", PASSWORD)
    assert response.status_code == 429
    assert "too many login attempts" in response.content.decode()
    assert not logged_in


def test_the_lock_holds_one_username_from_one_address_only(staff, django_user_model) -> None:
    django_user_model.objects.create_superuser("other", "other@example.com", PASSWORD)
    lock_out("root", address="198.51.100.7")
    response, logged_in = log_in("root", PASSWORD, address="203.0.113.9")
    assert (response.status_code, logged_in) == (302, True)
    response, logged_in = log_in("other", PASSWORD, address="198.51.100.7")
    assert (response.status_code, logged_in) == (302, True)


def test_the_lock_ends_after_the_cool_off(staff) -> None:
    lock_out("root")
    # As if the cool-off had passed (axes counts only failures younger than it).
    attempts = AccessAttempt.objects.filter(username="root")
    assert attempts.exists()
    attempts.update(
        attempt_time=attempts.get().attempt_time - settings.AXES_COOLOFF_TIME - timedelta(seconds=1)
    )
    response, logged_in = log_in("root", PASSWORD)
    assert (response.status_code, logged_in) == (302, True)


def test_a_right_password_before_the_limit_forgets_the_failures(staff) -> None:
    for _attempt in range(settings.AXES_FAILURE_LIMIT - 1):
        log_in("root", "wrong")
    assert log_in("root", PASSWORD)[1]
    for _attempt in range(settings.AXES_FAILURE_LIMIT - 1):
        assert log_in("root", "wrong")[0].status_code == 200


def test_api_key_failures_are_not_counted_and_the_api_is_not_locked(tenant_and_key) -> None:
    _tenant, issued = tenant_and_key
    client = Client(REMOTE_ADDR="198.51.100.7")
    for _attempt in range(settings.AXES_FAILURE_LIMIT * 2):
        response = client.get("/v1/tenant", headers=bearer(issued.plaintext[:-4] + "AAAA"))
        assert response.status_code == 401
    assert not AccessAttempt.objects.exists()
    assert client.get("/v1/tenant", headers=bearer(issued.plaintext)).status_code == 200
    # Under Daphne the API's requests never pass the admin's middleware at all.
    assert not [path for path in settings.API_MIDDLEWARE if path.startswith("axes")]
