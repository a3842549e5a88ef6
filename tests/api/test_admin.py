from __future__ import annotations

import re

import pytest
from django.contrib.messages import get_messages
from django.test import Client

from tenants.authentication import ApiKeyError, authenticate_token
from tenants.models import ApiKey, Tenant
from tests.support.tenants import TenantFactory

pytestmark = pytest.mark.django_db
KEY_PATTERN = re.compile(r"cwt_[a-z0-9]{8}_[A-Za-z0-9]{32}")


def shown_keys(response) -> list[str]:
    return [
        key for message in get_messages(response.wsgi_request) for key in KEY_PATTERN.findall(str(message))
    ]


def add_form(name: str) -> dict[str, str]:
    return {
        "name": name,
        "is_active": "on",
        "quota_minutes": "100",
        "rate_limit_minute": "60",
        "rate_limit_hour": "1000",
        "max_concurrent_streams": "2",
        "permissions": '["upload"]',
        "api_keys-TOTAL_FORMS": "0",
        "api_keys-INITIAL_FORMS": "0",
        "api_keys-MIN_NUM_FORMS": "0",
        "api_keys-MAX_NUM_FORMS": "1000",
        "quota_usage-TOTAL_FORMS": "0",
        "quota_usage-INITIAL_FORMS": "0",
        "quota_usage-MIN_NUM_FORMS": "0",
        "quota_usage-MAX_NUM_FORMS": "1000",
    }


def test_creating_a_tenant_in_the_admin_shows_its_first_key_once(admin_client: Client) -> None:
    response = admin_client.post("/admin/tenants/tenant/add/", add_form("acme"), follow=True)
    assert response.status_code == 200
    (key,) = shown_keys(response)
    assert authenticate_token(key).tenant.name == "acme"

    tenant = Tenant.objects.get(name="acme")
    page = admin_client.get(f"/admin/tenants/tenant/{tenant.pk}/change/").content.decode()
    assert key not in page
    assert ApiKey.objects.get(tenant=tenant).prefix in page


def test_rotating_from_the_admin_keeps_old_keys_for_the_chosen_grace(
    admin_client: Client, tenant_and_key
) -> None:
    tenant, old = tenant_and_key
    response = admin_client.post(
        "/admin/tenants/tenant/",
        {"action": "rotate_keys", "_selected_action": [str(tenant.pk)], "grace_seconds": "3600"},
        follow=True,
    )
    (new,) = shown_keys(response)
    assert authenticate_token(new).tenant == tenant
    assert authenticate_token(old.plaintext).tenant == tenant
    old.api_key.refresh_from_db()
    assert old.api_key.expires_at is not None

    admin_client.post(
        "/admin/tenants/tenant/",
        {"action": "rotate_keys", "_selected_action": [str(tenant.pk)], "grace_seconds": "0"},
    )
    with pytest.raises(ApiKeyError):
        authenticate_token(new)


def test_revoking_from_the_admin_stops_the_key(admin_client: Client, tenant_and_key) -> None:
    _tenant, issued = tenant_and_key
    admin_client.post(
        "/admin/tenants/apikey/", {"action": "revoke", "_selected_action": [str(issued.api_key.pk)]}
    )
    with pytest.raises(ApiKeyError, match="revoked"):
        authenticate_token(issued.plaintext)


def test_keys_cannot_be_added_or_deleted_directly_in_the_admin(admin_client: Client, tenant_and_key) -> None:
    _tenant, issued = tenant_and_key
    assert admin_client.get("/admin/tenants/apikey/add/").status_code == 403
    assert admin_client.get(f"/admin/tenants/apikey/{issued.api_key.pk}/delete/").status_code == 403


def test_deactivating_a_tenant_in_the_admin_stops_its_keys(
    admin_client: Client, make_tenant: TenantFactory
) -> None:
    tenant, issued = make_tenant("gone")
    admin_client.post(
        "/admin/tenants/tenant/", {"action": "deactivate", "_selected_action": [str(tenant.pk)]}
    )
    with pytest.raises(ApiKeyError, match="deactivated"):
        authenticate_token(issued.plaintext)


def test_voices_are_listed_per_tenant_and_deleting_one_removes_its_audio(
    admin_client: Client, tenant_and_key, settings, tmp_path
) -> None:
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    from voices.models import Voice

    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": tmp_path},
        },
    }
    tenant, _ = tenant_and_key
    key = default_storage.save(f"tenants/{tenant.id}/voices/ref.wav", ContentFile(b"RIFF"))
    voice = Voice.objects.create(
        tenant=tenant,
        voice_id="desk",
        name="Desk",
        language="en",
        reference_audio=key,
        reference_seconds=4.0,
        conditioning=b"x",
        conditioning_model="xtts:test",
    )
    listing = admin_client.get(f"/admin/voices/voice/?tenant__id__exact={tenant.pk}").content.decode()
    assert "desk" in listing
    admin_client.post(
        "/admin/voices/voice/",
        {"action": "delete_selected", "_selected_action": [str(voice.pk)], "post": "yes"},
    )
    assert not Voice.objects.filter(pk=voice.pk).exists()
    assert not default_storage.exists(key)


def test_the_tenant_page_shows_audio_used_per_month(admin_client: Client, tenant_and_key) -> None:
    from datetime import date

    from usage.models import QuotaUsage

    tenant, _ = tenant_and_key
    QuotaUsage.objects.create(tenant=tenant, month=date(2026, 11, 1), audio_seconds=754.5)
    page = admin_client.get(f"/admin/tenants/tenant/{tenant.pk}/change/").content.decode()
    assert "754.5" in page
