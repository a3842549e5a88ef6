from __future__ import annotations

import re
import uuid
from datetime import datetime, timedelta

import pytest
from django.contrib.messages import get_messages
from django.contrib.sessions.models import Session
from django.core.exceptions import ValidationError
from django.db.models import ProtectedError
from django.test import Client
from django.utils import timezone

from tenants.authentication import ApiKeyError, authenticate_token
from tenants.models import ApiKey, Tenant
from tenants.services import api_key_revoke, api_key_rotate
from tests.support.tenants import TenantFactory
from usage.models import UsageLog

pytestmark = pytest.mark.django_db
KEY_PATTERN = re.compile(r"cwt_[a-z0-9]{8}_[A-Za-z0-9]{32}")


def shown_keys(response) -> list[str]:
    """The keys on the page that answered the action, each also checked to be kept nowhere else."""
    keys = KEY_PATTERN.findall(response.content.decode())
    for key in keys:
        assert_kept_out_of_cookies_and_session(response, key)
    return keys


def assert_kept_out_of_cookies_and_session(response, secret: str) -> None:
    assert "no-store" in response["Cache-Control"]
    for cookie in response.cookies.values():
        assert secret not in cookie.OutputString()
    for cookie in response.client.cookies.values():
        assert secret not in cookie.value
    assert not [m for m in get_messages(response.wsgi_request) if secret in str(m)]
    for session in Session.objects.all():
        assert secret not in str(session.get_decoded())
        assert secret not in session.session_data


def add_form(name: str) -> dict[str, str | list[str]]:
    return {
        "name": name,
        "is_active": "on",
        "quota_minutes": "100",
        "rate_limit_minute": "60",
        "rate_limit_hour": "1000",
        "max_concurrent_streams": "2",
        "permissions": ["upload"],
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
    response = admin_client.post("/admin/tenants/tenant/add/", add_form("acme"))
    assert response.status_code == 200  # the page itself, not a redirect to a page with a message
    (key,) = shown_keys(response)
    assert authenticate_token(key).tenant.name == "acme"
    assert "copy" in response.content.decode().lower()

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
    )
    (new,) = shown_keys(response)
    assert "after 1 hour" in response.content.decode()
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


def test_issuing_keys_for_several_tenants_shows_each_once_and_stores_none(
    admin_client: Client, make_tenant: TenantFactory
) -> None:
    tenants = [make_tenant("one")[0], make_tenant("two")[0]]
    response = admin_client.post(
        "/admin/tenants/tenant/",
        {"action": "issue_key", "_selected_action": [str(tenant.pk) for tenant in tenants]},
    )
    keys = shown_keys(response)
    assert sorted(authenticate_token(key).tenant.name for key in keys) == ["one", "two"]
    # The next pages (where a message would be shown) hold none of them.
    for path in ["/admin/tenants/tenant/", "/admin/tenants/apikey/", "/admin/"]:
        page = admin_client.get(path).content.decode()
        assert not [key for key in keys if key in page]


def test_revoking_from_the_admin_asks_first_then_stops_the_key(admin_client: Client, tenant_and_key) -> None:
    _tenant, issued = tenant_and_key
    selected = {"action": "revoke", "_selected_action": [str(issued.api_key.pk)]}
    confirmation = admin_client.post("/admin/tenants/apikey/", selected)
    assert confirmation.status_code == 200
    page = confirmation.content.decode()
    assert str(issued.api_key) in page
    assert 'name="post" value="yes"' in page
    assert authenticate_token(issued.plaintext).tenant == issued.api_key.tenant  # not yet

    response = admin_client.post("/admin/tenants/apikey/", {**selected, "post": "yes"})
    assert response.status_code == 302
    with pytest.raises(ApiKeyError, match="revoked"):
        authenticate_token(issued.plaintext)


def test_keys_cannot_be_added_or_deleted_directly_in_the_admin(admin_client: Client, tenant_and_key) -> None:
    _tenant, issued = tenant_and_key
    api_key_revoke(api_key=issued.api_key)
    assert admin_client.get("/admin/tenants/apikey/add/").status_code == 403
    assert admin_client.get(f"/admin/tenants/apikey/{issued.api_key.pk}/delete/").status_code == 403
    admin_client.post(
        "/admin/tenants/apikey/",
        {"action": "delete_selected", "_selected_action": [str(issued.api_key.pk)], "post": "yes"},
    )
    assert ApiKey.objects.filter(pk=issued.api_key.pk).exists()


def test_a_tenant_cannot_be_deleted_in_the_admin_nor_with_its_history(
    admin_client: Client, tenant_and_key
) -> None:
    tenant, _issued = tenant_and_key
    assert admin_client.get(f"/admin/tenants/tenant/{tenant.pk}/delete/").status_code == 403
    assert "delete_selected" not in admin_client.get("/admin/tenants/tenant/").content.decode()
    admin_client.post(
        "/admin/tenants/tenant/",
        {"action": "delete_selected", "_selected_action": [str(tenant.pk)], "post": "yes"},
    )
    assert Tenant.objects.filter(pk=tenant.pk).exists()
    # Nor in code: its keys protect it (and its usage rows, below).
    with pytest.raises(ProtectedError):
        tenant.delete()


def test_usage_rows_cannot_be_deleted_in_the_admin_nor_by_deleting_their_tenant(
    admin_client: Client, make_tenant: TenantFactory
) -> None:
    tenant, _issued = make_tenant("metered")
    row = UsageLog.objects.create(
        tenant=tenant,
        request_id=uuid.uuid4().hex,
        endpoint="synthesize",
        total_ms=12.0,
        status_code=200,
        created_at=timezone.now(),
    )
    assert admin_client.get(f"/admin/usage/usagelog/{row.pk}/delete/").status_code == 403
    assert "delete_selected" not in admin_client.get("/admin/usage/usagelog/").content.decode()
    admin_client.post(
        "/admin/usage/usagelog/",
        {"action": "delete_selected", "_selected_action": [str(row.pk)], "post": "yes"},
    )
    assert UsageLog.objects.filter(pk=row.pk).exists()
    ApiKey.objects.filter(tenant=tenant).delete()  # only the usage row holds the tenant now
    with pytest.raises(ProtectedError):
        tenant.delete()


def test_tenant_permissions_are_checkboxes_saved_as_the_list_of_names(
    admin_client: Client, tenant_and_key
) -> None:
    tenant, _issued = tenant_and_key
    url = f"/admin/tenants/tenant/{tenant.pk}/change/"
    page = admin_client.get(url).content.decode()
    assert re.search(r'<input type="checkbox" name="permissions" value="upload"', page)
    assert not re.search(r'<textarea[^>]*name="permissions"', page)

    form = {**add_form("acme"), "api_keys-TOTAL_FORMS": "1", "api_keys-INITIAL_FORMS": "1"}
    form["api_keys-0-id"] = str(tenant.api_keys.get().pk)
    form["api_keys-0-tenant"] = str(tenant.pk)
    assert admin_client.post(url, form).status_code == 302
    tenant.refresh_from_db()
    assert tenant.permissions == ["upload"]
    assert tenant.has_permission("upload")

    del form["permissions"]  # every box unticked
    assert admin_client.post(url, form).status_code == 302
    tenant.refresh_from_db()
    assert tenant.permissions == []


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


def test_allowed_origins_are_edited_one_per_line_and_stored_normalised(
    admin_client: Client, tenant_and_key
) -> None:
    tenant, _issued = tenant_and_key
    assert tenant.allowed_origins == []  # none by default
    url = f"/admin/tenants/tenant/{tenant.pk}/change/"
    form = {**add_form("acme"), "api_keys-TOTAL_FORMS": "1", "api_keys-INITIAL_FORMS": "1"}
    form["api_keys-0-id"] = str(tenant.api_keys.get().pk)
    form["api_keys-0-tenant"] = str(tenant.pk)
    form["allowed_origins"] = "HTTPS://App.Example.com:443/\n\nhttp://localhost:5173\nhttps://app.example.com"
    assert admin_client.post(url, form).status_code == 302
    tenant.refresh_from_db()
    assert tenant.allowed_origins == ["https://app.example.com", "http://localhost:5173"]
    page = admin_client.get(url).content.decode()
    assert "https://app.example.com\nhttp://localhost:5173</textarea>" in page

    form["allowed_origins"] = "https://app.example.com/some/path"
    response = admin_client.post(url, form)
    assert response.status_code == 200
    assert "is not a browser origin" in response.content.decode()
    tenant.refresh_from_db()
    assert tenant.allowed_origins == ["https://app.example.com", "http://localhost:5173"]


def _change_key_expiry(admin_client: Client, api_key: ApiKey, expires_at: datetime | None) -> str:
    """POST the admin's real change form for a key; the page's text when it refuses."""
    form = {
        "name": api_key.name,
        "expires_at_0": "" if expires_at is None else f"{expires_at:%Y-%m-%d}",
        "expires_at_1": "" if expires_at is None else f"{expires_at:%H:%M:%S}",
    }
    response = admin_client.post(f"/admin/tenants/apikey/{api_key.pk}/change/", form)
    return "" if response.status_code == 302 else response.content.decode()


def test_a_rotated_out_key_cannot_be_revived_by_clearing_or_postponing_its_expiry(
    admin_client: Client, tenant_and_key
) -> None:
    tenant, old = tenant_and_key
    api_key_rotate(tenant=tenant, grace_seconds=0)
    with pytest.raises(ApiKeyError) as refused:
        authenticate_token(old.plaintext)
    assert refused.value.code == "expired_api_key"
    ended_at = ApiKey.objects.get(pk=old.api_key.pk).expires_at
    assert ended_at is not None
    for wanted in (None, timezone.now() + timedelta(days=30), ended_at + timedelta(seconds=2)):
        page = _change_key_expiry(admin_client, old.api_key, wanted)
        assert "can only be brought forward" in page
        assert ApiKey.objects.get(pk=old.api_key.pk).expires_at == ended_at
        with pytest.raises(ApiKeyError) as refused:
            authenticate_token(old.plaintext)
        assert refused.value.code == "expired_api_key"


def test_a_keys_expiry_can_be_set_and_brought_forward_but_not_pushed_later(
    admin_client: Client, tenant_and_key
) -> None:
    _tenant, issued = tenant_and_key
    later = (timezone.now() + timedelta(days=10)).replace(microsecond=0)
    assert _change_key_expiry(admin_client, issued.api_key, later) == ""  # set
    assert ApiKey.objects.get(pk=issued.api_key.pk).expires_at == later
    sooner = later - timedelta(days=5)
    assert _change_key_expiry(admin_client, issued.api_key, sooner) == ""  # brought forward
    assert ApiKey.objects.get(pk=issued.api_key.pk).expires_at == sooner
    assert "can only be brought forward" in _change_key_expiry(admin_client, issued.api_key, later)
    assert "can only be brought forward" in _change_key_expiry(admin_client, issued.api_key, None)
    assert ApiKey.objects.get(pk=issued.api_key.pk).expires_at == sooner
    past = timezone.now().replace(microsecond=0) - timedelta(minutes=1)
    assert _change_key_expiry(admin_client, issued.api_key, past) == ""  # ended now, for good
    assert "can only be brought forward" in _change_key_expiry(admin_client, issued.api_key, sooner)


def test_a_revoked_keys_revocation_cannot_be_cleared_or_postponed(tenant_and_key) -> None:
    _tenant, issued = tenant_and_key
    api_key_revoke(api_key=issued.api_key)
    api_key = ApiKey.objects.get(pk=issued.api_key.pk)
    assert api_key.revoked_at is not None
    for wanted in (None, api_key.revoked_at + timedelta(hours=1)):
        api_key.revoked_at = wanted
        with pytest.raises(ValidationError) as refused:
            api_key.full_clean()
        assert "revoked_at" in refused.value.message_dict
    api_key.revoked_at = timezone.now() - timedelta(days=1)  # earlier: allowed
    api_key.full_clean()
