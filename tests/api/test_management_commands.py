from __future__ import annotations

import io

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from tenants import keys
from tenants.authentication import authenticate_token
from tenants.models import ApiKey, Tenant

pytestmark = pytest.mark.django_db


def run(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue().strip(), err.getvalue()


def test_create_tenant_prints_a_working_key_once() -> None:
    key, notice = run("create_tenant", "acme", "--rate-limit-minute", "30", "--permission", "upload")
    assert keys.parse_key(key) is not None
    assert "shown only now" in notice
    principal = authenticate_token(key)
    assert principal.tenant.name == "acme"
    assert principal.tenant.rate_limit_minute == 30
    assert principal.tenant.permissions == ["upload"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create_tenant", "   "], "cannot be empty"),
        (["create_tenant", "x", "--quota-minutes", "-5"], "invalid positive_int"),
        (["create_tenant", "x", "--permission", "admin"], "invalid choice"),
    ],
)
def test_create_tenant_rejects_bad_input(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        run(*args)
    assert not Tenant.objects.exists()


def test_create_tenant_refuses_a_duplicate_name() -> None:
    run("create_tenant", "acme")
    with pytest.raises(CommandError, match="already exists"):
        run("create_tenant", "acme")
    assert Tenant.objects.count() == 1


def test_rotate_api_key_issues_a_new_key_and_sets_the_old_ones_to_expire() -> None:
    old, _ = run("create_tenant", "acme")
    tenant = Tenant.objects.get(name="acme")
    new, _ = run("rotate_api_key", str(tenant.id), "--grace-seconds", "600")
    assert new != old
    assert authenticate_token(old).tenant == tenant  # still inside the grace period
    assert authenticate_token(new).tenant == tenant
    old_key = ApiKey.objects.get(prefix=keys.parse_key(old).prefix)  # type: ignore[union-attr]
    assert old_key.expires_at is not None


def test_rotate_api_key_finds_tenants_by_name_too() -> None:
    run("create_tenant", "acme")
    new, _ = run("rotate_api_key", "acme")
    assert authenticate_token(new).tenant.name == "acme"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["rotate_api_key", "nobody"], "No tenant"),
        (["rotate_api_key", "acme", "--grace-seconds", "-1"], "cannot be negative"),
        (["rotate_api_key", "acme", "--grace-seconds", "soon"], "invalid int"),
    ],
)
def test_rotate_api_key_rejects_bad_input(args: list[str], message: str) -> None:
    run("create_tenant", "acme")
    with pytest.raises(CommandError, match=message):
        run(*args)
    assert ApiKey.objects.count() == 1


def test_revoke_api_key_by_prefix_or_pasted_key() -> None:
    key, _ = run("create_tenant", "acme")
    prefix = keys.parse_key(key).prefix  # type: ignore[union-attr]
    summary, _ = run("revoke_api_key", f"cwt_{prefix}")
    assert "Revoked" in summary
    assert ApiKey.objects.get(prefix=prefix).revoked_at is not None
    with pytest.raises(CommandError, match="already revoked"):
        run("revoke_api_key", prefix)


@pytest.mark.parametrize(
    ("prefix", "message"),
    [("zzzzzzzz", "No API key"), ("NOT-A-PREFIX", "not a key prefix"), ("", "not a key prefix")],
)
def test_revoke_api_key_rejects_bad_input(prefix: str, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        run("revoke_api_key", prefix)


def test_list_tenants_shows_limits_and_usable_key_count() -> None:
    run("create_tenant", "acme", "--max-concurrent-streams", "9")
    run("rotate_api_key", "acme", "--grace-seconds", "3600")
    listing, _ = run("list_tenants")
    header, row = listing.splitlines()
    assert header.split()[:4] == ["id", "name", "active", "keys"]
    fields = row.split()
    assert fields[1:4] == ["acme", "yes", "2"]
    assert fields[-1] == "9"


def test_ensure_demo_tenant_reuses_its_key_across_runs(tmp_path) -> None:
    key_file = tmp_path / "demo_key"
    first, _ = run("ensure_demo_tenant", "--key-file", str(key_file))
    second, _ = run("ensure_demo_tenant", "--key-file", str(key_file))
    key = key_file.read_text().strip()
    assert key in first
    assert first == second
    assert authenticate_token(key).tenant.name == "demo"
    assert Tenant.objects.filter(name="demo").count() == 1
