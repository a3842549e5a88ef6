"""/playground in process: a public page that holds no credential, and the staff path that mints
a streaming token for a chosen tenant server side (CSRF-checked, never cached).
tests/e2e/test_browser.py plays audio with it in a real browser."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import User
from django.test import Client

from tenants import tokens
from tenants.services import api_key_issue, api_key_revoke
from tests.support.tenants import TenantFactory

pytestmark = pytest.mark.django_db


def test_the_page_is_public_labelled_and_holds_no_token() -> None:
    response = Client().get("/playground")
    assert response.status_code == 200
    page = response.content.decode()
    for control in ("token", "voice", "format", "speed", "sample-rate", "text"):
        assert f'<label for="{control}">' in page
        assert f'id="{control}"' in page
    assert 'value="cwtc_' not in page
    assert "Sign in as staff" in page
    assert "/static/callwaiting_tts/playground.js" in page
    assert "no-store" in response["Cache-Control"]


def test_only_staff_may_mint_and_only_with_a_csrf_token(make_tenant: TenantFactory) -> None:
    tenant, _issued = make_tenant("playground-tenant")
    anonymous = Client().post("/playground", {"tenant": str(tenant.id)})
    assert 'value="cwtc_' not in anonymous.content.decode()
    staff = User.objects.create_user("operator", password="a-long-password-1", is_staff=True)
    guarded = Client(enforce_csrf_checks=True)
    guarded.force_login(staff)
    assert guarded.post("/playground", {"tenant": str(tenant.id)}).status_code == 403  # no CSRF token


def test_staff_mint_a_streaming_token_from_the_tenants_newest_usable_key(make_tenant: TenantFactory) -> None:
    tenant, first = make_tenant("playground-tenant")
    newest = api_key_issue(tenant=tenant, name="newer")
    staff = User.objects.create_user("operator", password="a-long-password-1", is_staff=True)
    client = Client()
    client.force_login(staff)
    page = client.get("/playground").content.decode()
    assert f'<option value="{tenant.id}">playground-tenant</option>' in page
    response = client.post("/playground", {"tenant": str(tenant.id)})
    assert "no-store" in response["Cache-Control"]
    [token] = re.findall(r'value="(cwtc_[^"]+)"', response.content.decode())
    claims = tokens.read(token)
    assert claims.key_prefix == newest.api_key.prefix != first.api_key.prefix
    assert claims.routes == frozenset({"stream"})
    api_key_revoke(api_key=newest.api_key)
    api_key_revoke(api_key=first.api_key)
    response = client.post("/playground", {"tenant": str(tenant.id)})
    assert "has no usable API key" in response.content.decode()
