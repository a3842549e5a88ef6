from __future__ import annotations

import math
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from tenants import keys
from tenants.authentication import ApiKeyError
from tenants.models import ApiKey, Tenant
from tenants.services import api_key_issue, api_key_revoke, api_key_rotate
from tests.support.tenants import TenantFactory, bearer

pytestmark = pytest.mark.django_db


def error_code(response) -> str:
    return str(response.json()["error"]["code"])


def test_issued_key_has_the_documented_format_and_enough_entropy(tenant_and_key) -> None:
    _tenant, issued = tenant_and_key
    namespace, prefix, secret = issued.plaintext.split("_")
    assert namespace == "cwt"
    assert prefix == issued.api_key.prefix
    assert len(secret) * math.log2(len(keys.SECRET_ALPHABET)) >= 128


def test_database_never_holds_the_plaintext_secret(tenant_and_key) -> None:
    _tenant, issued = tenant_and_key
    secret = keys.parse_key(issued.plaintext).secret  # type: ignore[union-attr]
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM tenants_apikey")
        rows = cursor.fetchall()
    dumped = repr(rows)
    assert secret not in dumped
    assert issued.plaintext not in dumped
    assert keys.hash_secret(secret) in dumped
    assert secret not in str(issued.api_key)


def test_valid_key_returns_the_callers_tenant(api_client: APIClient, tenant_and_key) -> None:
    tenant, issued = tenant_and_key
    response = api_client.get("/v1/tenant", headers=bearer(issued.plaintext))
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == str(tenant.id)
    assert body["name"] == "acme"
    assert body["rate_limit_minute"] == tenant.rate_limit_minute
    assert body["api_key_prefix"] == issued.api_key.prefix


def test_successful_use_records_last_used_at(api_client: APIClient, tenant_and_key) -> None:
    _tenant, issued = tenant_and_key
    assert issued.api_key.last_used_at is None
    api_client.get("/v1/tenant", headers=bearer(issued.plaintext))
    issued.api_key.refresh_from_db()
    assert issued.api_key.last_used_at is not None


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (None, "missing_api_key"),
        ("Basic dXNlcjpwYXNz", "missing_api_key"),
        ("Bearer ", "missing_api_key"),
        ("Bearer not-a-key", "invalid_api_key"),
        ("Bearer cwt_short_secret", "invalid_api_key"),
        ("Bearer cwt_aaaaaaaa_" + "A" * 32, "invalid_api_key"),
    ],
)
def test_missing_or_malformed_keys_get_401_with_a_bearer_challenge(
    api_client: APIClient, header: str | None, code: str
) -> None:
    headers = {"Authorization": header} if header is not None else {}
    response = api_client.get("/v1/tenant", headers=headers)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    body = response.json()
    assert body["error"]["code"] == code
    assert body["error"]["request_id"] == response["X-Request-ID"]


def test_right_prefix_with_wrong_secret_is_rejected(api_client: APIClient, tenant_and_key) -> None:
    _tenant, issued = tenant_and_key
    forged = keys.format_key(issued.api_key.prefix, keys.generate_secret())
    response = api_client.get("/v1/tenant", headers=bearer(forged))
    assert response.status_code == 401
    assert error_code(response) == "invalid_api_key"


def test_revoked_key_is_rejected(api_client: APIClient, tenant_and_key) -> None:
    _tenant, issued = tenant_and_key
    assert api_key_revoke(api_key=issued.api_key) is True
    assert api_key_revoke(api_key=issued.api_key) is False
    response = api_client.get("/v1/tenant", headers=bearer(issued.plaintext))
    assert response.status_code == 401
    assert error_code(response) == "revoked_api_key"


def test_expired_key_is_rejected(api_client: APIClient, tenant_and_key) -> None:
    tenant, _issued = tenant_and_key
    expired = api_key_issue(tenant=tenant, expires_at=timezone.now() - timedelta(seconds=1))
    response = api_client.get("/v1/tenant", headers=bearer(expired.plaintext))
    assert response.status_code == 401
    assert error_code(response) == "expired_api_key"


def test_keys_of_an_inactive_tenant_are_rejected(api_client: APIClient, tenant_and_key) -> None:
    tenant, issued = tenant_and_key
    Tenant.objects.filter(pk=tenant.pk).update(is_active=False)
    response = api_client.get("/v1/tenant", headers=bearer(issued.plaintext))
    assert response.status_code == 401
    assert error_code(response) == "tenant_inactive"


def test_a_tenant_can_hold_several_usable_keys(api_client: APIClient, tenant_and_key) -> None:
    tenant, first = tenant_and_key
    second = api_key_issue(tenant=tenant)
    for issued in (first, second):
        assert api_client.get("/v1/tenant", headers=bearer(issued.plaintext)).status_code == 200
    assert ApiKey.objects.filter(tenant=tenant).usable().count() == 2


def test_rotation_keeps_the_old_key_valid_until_the_grace_period_ends(
    api_client: APIClient, tenant_and_key
) -> None:
    tenant, old = tenant_and_key
    new = api_key_rotate(tenant=tenant, grace_seconds=2)
    assert new.plaintext != old.plaintext
    assert api_client.get("/v1/tenant", headers=bearer(old.plaintext)).status_code == 200
    assert api_client.get("/v1/tenant", headers=bearer(new.plaintext)).status_code == 200
    time.sleep(2.2)
    response = api_client.get("/v1/tenant", headers=bearer(old.plaintext))
    assert response.status_code == 401
    assert error_code(response) == "expired_api_key"
    assert api_client.get("/v1/tenant", headers=bearer(new.plaintext)).status_code == 200


def test_rotation_never_extends_a_key_that_expires_sooner(tenant_and_key) -> None:
    tenant, _ = tenant_and_key
    soon = timezone.now() + timedelta(seconds=30)
    short_lived = api_key_issue(tenant=tenant, expires_at=soon)
    api_key_rotate(tenant=tenant, grace_seconds=3600)
    short_lived.api_key.refresh_from_db()
    assert short_lived.api_key.expires_at == soon


def test_rotation_with_zero_grace_retires_old_keys_at_once(api_client: APIClient, tenant_and_key) -> None:
    tenant, old = tenant_and_key
    api_key_rotate(tenant=tenant, grace_seconds=0)
    assert api_client.get("/v1/tenant", headers=bearer(old.plaintext)).status_code == 401


def test_keys_of_one_tenant_never_resolve_to_another(
    api_client: APIClient, make_tenant: TenantFactory
) -> None:
    tenant_a, key_a = make_tenant("a")
    _tenant_b, key_b = make_tenant("b")
    assert api_client.get("/v1/tenant", headers=bearer(key_a.plaintext)).json()["id"] == str(tenant_a.id)
    assert api_client.get("/v1/tenant", headers=bearer(key_b.plaintext)).json()["id"] != str(tenant_a.id)


def test_sane_client_request_id_is_echoed_and_unsafe_one_replaced(api_client: APIClient) -> None:
    echoed = api_client.get("/v1/health", HTTP_X_REQUEST_ID="call-42.abc")
    assert echoed["X-Request-ID"] == "call-42.abc"
    replaced = api_client.get("/v1/health", HTTP_X_REQUEST_ID="bad id\r\nSet-Cookie: x")
    assert replaced["X-Request-ID"] != "bad id\r\nSet-Cookie: x"
    assert len(replaced["X-Request-ID"]) == 32


def test_unknown_path_answers_the_json_error_shape(api_client: APIClient) -> None:
    response = api_client.get("/v1/nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_verified_keys_are_cached_briefly_but_expiry_is_always_checked(settings, tenant_and_key) -> None:
    from tenants.authentication import authenticate_token, principal_cache

    settings.API_KEY_CACHE_SECONDS = 0.5
    principal_cache.clear()
    tenant, issued = tenant_and_key
    assert authenticate_token(issued.plaintext).tenant == tenant
    api_key_revoke(api_key=issued.api_key)
    # Within the cache window the process has not heard of the revocation yet...
    assert authenticate_token(issued.plaintext).tenant == tenant
    time.sleep(0.6)
    # ...and after it, it has.
    with pytest.raises(ApiKeyError, match="revoked"):
        authenticate_token(issued.plaintext)

    expiring = api_key_issue(tenant=tenant, expires_at=timezone.now() + timedelta(seconds=0.3))
    assert authenticate_token(expiring.plaintext).tenant == tenant
    time.sleep(0.35)
    with pytest.raises(ApiKeyError, match="expired"):
        authenticate_token(expiring.plaintext)
    principal_cache.clear()
