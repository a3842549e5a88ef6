"""Every routed endpoint refuses every kind of bad credential: zero unauthenticated successes.

The route list is enumerated from the URL resolver, so a new endpoint is
covered the moment it is routed; only the names in PUBLIC_URL_NAMES may answer
without a key.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone

from callwaiting_tts.urls import OWN_CREDENTIAL_URL_NAMES, PUBLIC_URL_NAMES
from tenants import keys, tokens
from tenants.models import Tenant
from tenants.services import api_key_issue, api_key_revoke
from tests.support.tenants import TenantFactory

pytestmark = pytest.mark.django_db

METHODS = ["get", "post", "put", "patch", "delete"]
_CONVERTER_SAMPLES = {"int": "1", "uuid": str(uuid.uuid4()), "slug": "some-voice", "str": "x", "path": "x/y"}


def _sample_path(route: str) -> str:
    return re.sub(
        r"<(?:(\w+):)?\w+>",
        lambda match: _CONVERTER_SAMPLES.get(match.group(1) or "str", "x"),
        route,
    )


def routed_endpoints() -> Iterator[tuple[str, str | None, str | None]]:
    """(sample path, url name, namespace) for every routed pattern."""

    def walk(
        patterns: list[URLPattern | URLResolver], prefix: str, namespace: str | None
    ) -> Iterator[tuple[str, str | None, str | None]]:
        for pattern in patterns:
            route = str(pattern.pattern)
            if isinstance(pattern, URLResolver):
                yield from walk(pattern.url_patterns, prefix + route, pattern.namespace or namespace)
            elif isinstance(pattern, URLPattern):
                yield "/" + _sample_path(prefix + route).lstrip("^").rstrip("$"), pattern.name, namespace

    yield from walk(get_resolver().url_patterns, "", None)


def api_endpoints() -> list[str]:
    return sorted(
        path
        for path, name, namespace in routed_endpoints()
        if namespace != "admin" and name not in PUBLIC_URL_NAMES | OWN_CREDENTIAL_URL_NAMES
    )


def admin_endpoints() -> list[str]:
    public = {"login", "logout", "password_reset", "javascript-catalog"}
    return sorted(
        path
        for path, name, namespace in routed_endpoints()
        if namespace == "admin" and name not in public and "(?P" not in path and "^" not in path
    )


@pytest.fixture
def bad_authorization_headers(make_tenant: TenantFactory) -> dict[str, str | None]:
    tenant, revoked = make_tenant("revoked-key-tenant")
    api_key_revoke(api_key=revoked.api_key)
    expired = api_key_issue(tenant=tenant, expires_at=timezone.now() - timedelta(minutes=1))
    inactive_tenant, inactive_key = make_tenant("inactive-tenant")
    Tenant.objects.filter(pk=inactive_tenant.pk).update(is_active=False)
    _tenant, valid = make_tenant("valid-tenant")
    # Client tokens allowed every route they can be, yet not good: expired, of a revoked key, altered.
    every_route = tokens.TokenRequest(ttl_seconds=60, routes=tokens.TOKEN_ROUTES, voices=None, origins=None)
    expired_token, _ = tokens.mint(valid.api_key.prefix, every_route, now=time.time() - 120)
    revoked_token, _ = tokens.mint(revoked.api_key.prefix, every_route)
    good_token, _ = tokens.mint(valid.api_key.prefix, every_route)
    return {
        "missing": None,
        "wrong scheme": f"Token {valid.plaintext}",
        "empty bearer": "Bearer ",
        "malformed": "Bearer cwt_nonsense",
        "unknown": "Bearer " + keys.format_key(keys.generate_prefix(), keys.generate_secret()),
        "wrong secret": "Bearer " + keys.format_key(valid.api_key.prefix, keys.generate_secret()),
        "expired": f"Bearer {expired.plaintext}",
        "revoked": f"Bearer {revoked.plaintext}",
        "inactive tenant": f"Bearer {inactive_key.plaintext}",
        "expired client token": f"Bearer {expired_token}",
        "client token of a revoked key": f"Bearer {revoked_token}",
        "altered client token": f"Bearer {good_token[:-4]}AAAA",
    }


def test_the_route_list_is_not_empty() -> None:
    assert "/v1/tenant" in api_endpoints()
    assert "/v1/health" not in api_endpoints()


def test_every_api_endpoint_refuses_every_bad_credential(
    bad_authorization_headers: dict[str, str | None],
) -> None:
    client = Client()
    successes = []
    for path in api_endpoints():
        for method in METHODS:
            for variant, header in bad_authorization_headers.items():
                extra = {"HTTP_AUTHORIZATION": header} if header is not None else {}
                response = getattr(client, method)(path, **extra)
                if response.status_code != 401 or not response.get("WWW-Authenticate", "").startswith(
                    "Bearer"
                ):
                    successes.append((method.upper(), path, variant, response.status_code))
                elif "error" not in response.json():
                    successes.append((method.upper(), path, variant, "no error body"))
    assert successes == []


def test_admin_pages_require_a_staff_login() -> None:
    client = Client()
    paths = admin_endpoints()
    assert "/admin/" in paths
    for path in paths:
        response = client.get(path)
        assert response.status_code in {301, 302, 404}, path
        if response.status_code == 302:
            assert "/admin/login/" in response["Location"], path
