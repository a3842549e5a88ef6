"""/playground in process: a public page that holds no credential, and the staff path that mints
a streaming token for a chosen tenant server side (CSRF-checked, never cached).
tests/e2e/test_browser.py plays audio with it in a real browser."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import Group, Permission, User
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


def _minter(codenames: tuple[str, ...] = ("mint_client_token", "view_tenant")) -> User:
    """A staff user holding these tenants permissions (by default: mint and view)."""
    user = User.objects.create_user("operator", password="a-long-password-1", is_staff=True)
    granted = Permission.objects.filter(content_type__app_label="tenants", codename__in=codenames)
    user.user_permissions.set(granted)
    return user


def _assert_refused_as_json(response: object) -> None:
    assert getattr(response, "status_code", None) == 403
    body = response.json()  # type: ignore[attr-defined]
    assert body["error"]["code"] == "permission_denied"
    assert "Can mint client tokens" in body["error"]["message"]
    assert response["X-Request-ID"] == body["error"]["request_id"]  # type: ignore[index]
    assert "cwtc_" not in response.content.decode()  # type: ignore[attr-defined]


def test_only_staff_may_mint_and_only_with_a_csrf_token(make_tenant: TenantFactory) -> None:
    tenant, _issued = make_tenant("playground-tenant")
    _assert_refused_as_json(Client().post("/playground", {"tenant": str(tenant.id)}))
    staff = _minter()
    guarded = Client(enforce_csrf_checks=True)
    guarded.force_login(staff)
    assert guarded.post("/playground", {"tenant": str(tenant.id)}).status_code == 403  # no CSRF token


def test_staff_mint_a_streaming_token_from_the_tenants_newest_usable_key(make_tenant: TenantFactory) -> None:
    tenant, first = make_tenant("playground-tenant")
    newest = api_key_issue(tenant=tenant, name="newer")
    staff = _minter()
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


@pytest.mark.parametrize(
    "codenames",
    [(), ("mint_client_token",), ("view_tenant",), ("change_tenant", "view_apikey")],
    ids=["no permissions", "mint but not view tenants", "view tenants but not mint", "other admin rights"],
)
def test_staff_without_the_mint_permission_and_tenant_view_are_refused_and_see_no_tenants(
    make_tenant: TenantFactory, codenames: tuple[str, ...]
) -> None:
    tenant, _issued = make_tenant("playground-secret-tenant")
    user = _minter(codenames)
    client = Client()
    client.force_login(user)
    page = client.get("/playground")
    assert page.status_code == 200
    assert "playground-secret-tenant" not in page.content.decode()
    assert "Can mint client tokens" in page.content.decode()
    _assert_refused_as_json(client.post("/playground", {"tenant": str(tenant.id)}))


def test_an_inactive_user_with_the_permission_is_refused(make_tenant: TenantFactory) -> None:
    tenant, _issued = make_tenant("playground-tenant")
    user = _minter()
    client = Client()
    client.force_login(user)
    User.objects.filter(pk=user.pk).update(is_active=False)
    response = client.post("/playground", {"tenant": str(tenant.id)})
    assert response.status_code == 403
    assert "cwtc_" not in response.content.decode()


def test_a_superuser_grants_the_permission_in_the_admin_and_the_group_member_then_mints(
    make_tenant: TenantFactory,
) -> None:
    tenant, _issued = make_tenant("playground-tenant")
    admin = Client()
    admin.force_login(User.objects.create_superuser("root", password="a-long-password-1"))
    wanted = Permission.objects.filter(
        content_type__app_label="tenants", codename__in=["mint_client_token", "view_tenant"]
    )
    assert {permission.name for permission in wanted} == {"Can mint client tokens", "Can view tenant"}
    form = admin.get("/admin/auth/group/add/").content.decode()
    assert "Can mint client tokens" in form
    response = admin.post(
        "/admin/auth/group/add/", {"name": "playground minters", "permissions": [p.pk for p in wanted]}
    )
    assert response.status_code == 302, response.content.decode()
    member = User.objects.create_user("operator", password="a-long-password-1", is_staff=True)
    client = Client()
    client.force_login(member)
    _assert_refused_as_json(client.post("/playground", {"tenant": str(tenant.id)}))
    member.groups.add(Group.objects.get(name="playground minters"))
    client.force_login(User.objects.get(pk=member.pk))  # a fresh user object: no permission cache
    response = client.post("/playground", {"tenant": str(tenant.id)})
    [token] = re.findall(r'value="(cwtc_[^"]+)"', response.content.decode())
    assert tokens.read(token).routes == frozenset({"stream"})
