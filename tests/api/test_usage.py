"""Usage metering: the spool, the writer, rows per request, GET /v1/usage, the admin.

Requests here run in-process; tests/e2e/test_usage_e2e.py drives Daphne (the
1,000-request load test and the database outage).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import OperationalError
from django.test import Client
from rest_framework.test import APIClient

from tenants.models import Tenant
from tests.support.servers import ROOT
from tests.support.tenants import TenantFactory, bearer
from usage.models import QuotaUsage, UsageLog
from usage.quotas import current_month
from usage.recorder import UsageMeter, usage_flush, usage_records_write
from usage.spool import UsageRecord, UsageSpool

UNLIMITED = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0}


def _record(
    tenant_id: uuid.UUID, *, seconds: float = 1.5, cached: bool = False, **fields: Any
) -> UsageRecord:
    meter = UsageMeter(endpoint="synthesize", request_id=uuid.uuid4().hex, tenant_id=tenant_id, cached=cached)
    meter.audio_sent(4000, seconds)
    for name, value in fields.items():
        setattr(meter, name, value)
    return meter.record(200)


def _rows(tenant: Tenant) -> list[UsageLog]:
    usage_flush()
    return list(UsageLog.objects.filter(tenant=tenant).order_by("created_at"))


# --- The spool and the writer ---------------------------------------------------------


def test_spooled_records_become_rows_once_and_count_toward_the_quota_once(
    make_tenant: TenantFactory, tmp_path: Path
) -> None:
    tenant, _ = make_tenant(**UNLIMITED)
    spool = UsageSpool(tmp_path)
    for _ in range(5):
        spool.append(_record(tenant.id, seconds=1.5))
    spool.append(_record(tenant.id, seconds=9.0, cached=True))  # a phrase-cache hit: no new audio
    spool.seal()

    # The database fails after the second batch was committed (as if the
    # process died before deleting the file): the file stays...
    batches: list[int] = []

    def write_then_fail(batch: list[UsageRecord]) -> None:
        batches.append(len(batch))
        usage_records_write(batch)
        if len(batches) == 2:
            raise OperationalError("the database went away")

    with pytest.raises(OperationalError):
        spool.drain(write_then_fail, batch_size=2)
    assert spool.pending()[0] == 1
    # ...and the retry stores the rest without doubling anything.
    assert spool.drain(usage_records_write, batch_size=2) == 6
    assert UsageLog.objects.filter(tenant=tenant).count() == 6
    assert QuotaUsage.objects.get(tenant=tenant, month=current_month()).audio_seconds == pytest.approx(7.5)
    assert spool.pending() == (0, 0)


def test_records_of_a_deleted_tenant_are_dropped_without_blocking_the_rest(
    make_tenant: TenantFactory, tmp_path: Path
) -> None:
    tenant, _ = make_tenant(**UNLIMITED)
    spool = UsageSpool(tmp_path)
    spool.append(_record(uuid.uuid4()))
    spool.append(_record(tenant.id))
    assert usage_flush_of(spool) == 2  # both read; one stored
    assert UsageLog.objects.filter(tenant=tenant).count() == 1
    assert spool.pending() == (0, 0)


def test_a_record_the_database_refuses_goes_to_the_dead_letters_and_its_batch_is_written(
    make_tenant: TenantFactory, tmp_path: Path
) -> None:
    tenant, _ = make_tenant(**UNLIMITED)
    spool = UsageSpool(tmp_path)
    refused = _record(tenant.id)
    refused["voice_id"] = "a\x00b"  # Postgres stores no NUL
    not_a_record = {"id": "not a uuid"}
    for record in (_record(tenant.id), refused, not_a_record, _record(tenant.id)):
        spool.append(record)
    assert usage_flush_of(spool) == 4  # all read and done with: two rows, two dead letters
    assert UsageLog.objects.filter(tenant=tenant).count() == 2
    assert spool.pending() == (0, 0)
    assert spool.dead_letters() == 2
    # A new process on the same spool is not held up by them either.
    next_process = UsageSpool(tmp_path)
    next_process.append(_record(tenant.id))
    assert usage_flush_of(next_process) == 1
    assert UsageLog.objects.filter(tenant=tenant).count() == 3


def usage_flush_of(spool: UsageSpool) -> int:
    spool.seal()
    return spool.drain(lambda records: usage_records_write(records, spool=spool))


def test_a_torn_last_line_is_skipped_and_the_rest_is_written(
    make_tenant: TenantFactory, tmp_path: Path
) -> None:
    import json

    tenant, _ = make_tenant(**UNLIMITED)
    whole = json.dumps(_record(tenant.id))
    (tmp_path / "crashed-000001.jsonl").write_text(whole + "\n" + whole[:40])
    assert UsageSpool(tmp_path).drain(usage_records_write) == 1
    assert UsageLog.objects.filter(tenant=tenant).count() == 1


_SPOOL_WRITER = """
import sys, time
from pathlib import Path
from usage.spool import UsageSpool
spool = UsageSpool(Path(sys.argv[1]))
spool.append({"marker": "from-another-process"})
print("appended", flush=True)
time.sleep(120)
"""


def test_a_live_writers_file_is_left_alone_and_a_dead_writers_file_is_recovered(tmp_path: Path) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", _SPOOL_WRITER, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "appended"
        seen: list[UsageRecord] = []
        spool = UsageSpool(tmp_path)
        assert spool.drain(seen.extend) == 0  # its active file is locked by its writer
        assert spool.pending()[0] == 1
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=10)
        assert spool.drain(seen.extend) == 1  # the kernel dropped the dead writer's lock
        assert seen == [{"marker": "from-another-process"}]
        assert spool.pending() == (0, 0)
    finally:
        writer.kill()
        writer.wait()


# --- One row per request (in-process) ---------------------------------------------------


def test_a_whole_synthesis_leaves_one_row_with_its_counts_and_no_text(
    api_client: APIClient, make_tenant: TenantFactory
) -> None:
    tenant, issued = make_tenant(**UNLIMITED)
    text = "Usage rows count the characters of this sentence but never keep them."
    response = api_client.post(
        "/v1/synthesize",
        {"text": text, "format": "pcm", "sample_rate": 16000},
        format="json",
        headers=bearer(issued.plaintext),
    )
    assert response.status_code == 200
    [row] = _rows(tenant)
    assert row.request_id == response["X-Request-ID"]
    assert (row.endpoint, row.status_code, row.error_code) == ("synthesize", 200, None)
    assert row.input_chars == len(text)
    assert row.audio_bytes == len(response.content)
    assert row.audio_seconds == pytest.approx(len(response.content) / 2 / 16000, abs=1e-4)
    assert row.audio_seconds == pytest.approx(float(response["X-Audio-Duration"]), abs=1e-3)
    assert (row.format, row.streaming, row.cached) == ("pcm", False, False)
    assert row.voice_id  # the default voice, resolved
    assert row.latency_ms is not None
    assert 0 < row.latency_ms <= row.total_ms
    stored = UsageLog.objects.filter(pk=row.pk).values().get()
    assert not any("never keep" in str(value) for value in stored.values())


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"text": ""}, 400, "empty_text"),
        ({"text": "Hi.", "format": "aiff"}, 400, "unsupported_format"),
        ({"text": "Hi.", "voice_id": "nobody"}, 404, "voice_not_found"),
        ({"text": 42}, 400, "invalid_request"),
        ("{not json", 400, "malformed_json"),
    ],
)
def test_a_refused_request_leaves_a_row_with_its_error_code(
    api_client: APIClient, make_tenant: TenantFactory, body: Any, status: int, code: str
) -> None:
    tenant, issued = make_tenant(**UNLIMITED)
    payload = body if isinstance(body, str) else None
    if payload is not None:
        response = api_client.post(
            "/v1/synthesize", payload, content_type="application/json", headers=bearer(issued.plaintext)
        )
    else:
        response = api_client.post("/v1/synthesize", body, format="json", headers=bearer(issued.plaintext))
    assert response.status_code == status
    [row] = _rows(tenant)
    assert (row.status_code, row.error_code, row.audio_bytes, row.audio_seconds) == (status, code, 0, 0.0)
    assert row.latency_ms is None


def test_rate_limited_requests_leave_rows_and_unauthenticated_ones_do_not(
    api_client: APIClient, make_tenant: TenantFactory
) -> None:
    tenant, issued = make_tenant(rate_limit_minute=1, rate_limit_hour=0, quota_minutes=0)
    body = {"text": "Hi."}
    assert (
        api_client.post("/v1/synthesize", body, format="json", headers=bearer(issued.plaintext)).status_code
        == 200
    )
    refused = api_client.post("/v1/synthesize", body, format="json", headers=bearer(issued.plaintext))
    assert refused.status_code == 429
    anonymous = api_client.post("/v1/synthesize", body, format="json")
    assert anonymous.status_code == 401
    rows = _rows(tenant)
    assert [(row.status_code, row.error_code) for row in rows] == [(200, None), (429, "rate_limited")]
    assert not UsageLog.objects.filter(request_id=anonymous["X-Request-ID"]).exists()


def test_signed_url_rows_mark_cache_hits_which_cost_no_quota(
    api_client: APIClient, make_tenant: TenantFactory
) -> None:
    tenant, issued = make_tenant(rate_limit_minute=0, rate_limit_hour=0, quota_minutes=10)
    body = {"text": "A phrase worth caching.", "format": "mp3"}
    made = api_client.post("/v1/synthesize-url", body, format="json", headers=bearer(issued.plaintext)).json()
    hit = api_client.post("/v1/synthesize-url", body, format="json", headers=bearer(issued.plaintext)).json()
    assert (made["cached"], hit["cached"]) == (False, True)
    twiml = api_client.post("/v1/twiml/play", body, format="json", headers=bearer(issued.plaintext))
    assert twiml.status_code == 200
    rows = _rows(tenant)
    assert [(row.endpoint, row.cached) for row in rows] == [
        ("synthesize-url", False),
        ("synthesize-url", True),
        ("twiml-play", True),
    ]
    assert all(row.audio_bytes == made["bytes"] for row in rows)
    assert all(row.audio_seconds == pytest.approx(made["duration_s"], abs=1e-3) for row in rows)
    quota = QuotaUsage.objects.get(tenant=tenant, month=current_month())
    assert quota.audio_seconds == pytest.approx(made["duration_s"], abs=1e-3)  # the first only


# --- GET /v1/usage ------------------------------------------------------------------------


def _log(tenant: Tenant, at: datetime, **fields: Any) -> UsageLog:
    values: dict[str, Any] = {
        "request_id": uuid.uuid4().hex,
        "endpoint": "synthesize",
        "input_chars": 10,
        "audio_bytes": 1000,
        "audio_seconds": 1.0,
        "latency_ms": 100.0,
        "total_ms": 400.0,
        "voice_id": "joe",
        "format": "mp3",
        "status_code": 200,
        **fields,
    }
    return UsageLog.objects.create(tenant=tenant, created_at=at, **values)


@pytest.fixture
def usage_history(make_tenant: TenantFactory) -> tuple[Tenant, str]:
    tenant, issued = make_tenant(rate_limit_minute=0, rate_limit_hour=0, quota_minutes=10)
    other, _ = make_tenant(**UNLIMITED)
    _log(tenant, datetime(2026, 10, 31, 23, 59, 59, tzinfo=UTC))  # before the period
    _log(tenant, datetime(2026, 11, 2, 10, 0, tzinfo=UTC), latency_ms=100.0)
    _log(tenant, datetime(2026, 11, 2, 23, 59, 59, tzinfo=UTC), endpoint="synthesize-url", latency_ms=300.0)
    _log(
        tenant,
        datetime(2026, 11, 3, 0, 0, tzinfo=UTC),
        voice_id="clone-1",
        status_code=400,
        error_code="empty_text",
        input_chars=0,
        audio_bytes=0,
        audio_seconds=0.0,
        latency_ms=None,
    )
    _log(
        tenant,
        datetime(2026, 11, 3, 12, 0, tzinfo=UTC),
        voice_id="clone-1",
        streaming=True,
        error_code="client_disconnected",
        audio_bytes=500,
        audio_seconds=0.5,
        latency_ms=200.0,
    )
    _log(other, datetime(2026, 11, 2, 12, 0, tzinfo=UTC), input_chars=999)  # another tenant's
    return tenant, issued.plaintext


def _usage(api_client: APIClient, key: str, **params: str) -> Any:
    response = api_client.get("/v1/usage", params, headers=bearer(key))
    assert response.status_code == 200, response.content
    return response.json()


def test_usage_totals_and_daily_groups_over_inclusive_dates(
    api_client: APIClient, usage_history: tuple[Tenant, str]
) -> None:
    _tenant, key = usage_history
    report = _usage(api_client, key, **{"from": "2026-11-02", "to": "2026-11-03", "group_by": "day"})
    assert (report["from"], report["to"]) == ("2026-11-02T00:00:00Z", "2026-11-04T00:00:00Z")
    assert report["totals"] == {
        "requests": 4,
        "errors": 1,
        "cancelled": 1,
        "characters": 30,
        "audio_seconds": 2.5,
        "audio_bytes": 2500,
        "latency_ms_p50": 200.0,  # of 100, 200, 300: rows without audio have no latency
        "latency_ms_p95": 290.0,
    }
    by_day = {group["key"]: group for group in report["groups"]}
    assert list(by_day) == ["2026-11-02", "2026-11-03"]
    assert (by_day["2026-11-02"]["requests"], by_day["2026-11-02"]["latency_ms_p50"]) == (2, 200.0)
    assert (by_day["2026-11-03"]["errors"], by_day["2026-11-03"]["cancelled"]) == (1, 1)
    assert by_day["2026-11-03"]["latency_ms_p95"] == 200.0


def test_usage_bounds_a_date_includes_its_day_a_datetime_is_exact(
    api_client: APIClient, usage_history: tuple[Tenant, str]
) -> None:
    _tenant, key = usage_history
    assert _usage(api_client, key, **{"from": "2026-11-02", "to": "2026-11-02"})["totals"]["requests"] == 2
    exact = _usage(api_client, key, **{"from": "2026-11-02T10:00:00Z", "to": "2026-11-02T23:59:59Z"})
    assert exact["totals"]["requests"] == 1  # `to` is exclusive
    assert _usage(api_client, key, **{"from": "2026-10-01", "to": "2026-10-31"})["totals"]["requests"] == 1
    naive = _usage(api_client, key, **{"from": "2026-11-03T00:00:00", "to": "2026-11-04T00:00:00+00:00"})
    assert naive["totals"]["requests"] == 2  # no offset: UTC


@pytest.mark.parametrize(
    ("group_by", "keys"),
    [("voice", ["clone-1", "joe"]), ("endpoint", ["synthesize", "synthesize-url"])],
)
def test_usage_groups_by_voice_and_endpoint(
    api_client: APIClient, usage_history: tuple[Tenant, str], group_by: str, keys: list[str]
) -> None:
    _tenant, key = usage_history
    report = _usage(api_client, key, **{"from": "2026-11-01", "to": "2026-11-30", "group_by": group_by})
    assert [group["key"] for group in report["groups"]] == keys
    assert sum(group["requests"] for group in report["groups"]) == report["totals"]["requests"] == 4


def test_usage_shows_only_the_callers_rows_and_this_months_quota(
    api_client: APIClient, usage_history: tuple[Tenant, str]
) -> None:
    tenant, key = usage_history
    _log(tenant, datetime.now(UTC) - timedelta(seconds=1))
    QuotaUsage.objects.create(tenant=tenant, month=current_month(), audio_seconds=90.0)
    report = _usage(api_client, key)  # default: this month so far
    month_start = datetime.combine(current_month(), datetime.min.time(), tzinfo=UTC)
    assert report["from"] == month_start.isoformat().replace("+00:00", "Z")
    # The history's November rows fall in "this month" only in November 2026.
    assert (
        report["totals"]["requests"]
        == UsageLog.objects.filter(tenant=tenant, created_at__gte=month_start).count()
    )
    assert report["totals"]["requests"] >= 1
    assert report["quota"] == {
        "month": current_month().strftime("%Y-%m"),
        "used_seconds": 90.0,
        "limit_seconds": 600,
        "remaining_seconds": 510.0,
    }
    november = _usage(api_client, key, **{"from": "2026-11-02", "to": "2026-11-02"})
    assert november["totals"]["characters"] == 20  # not the other tenant's 999


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"group_by": "hour"}, "group_by"),
        ({"from": "yesterday"}, "from"),
        ({"from": "2026-11-05", "to": "2026-11-04"}, "to"),
        ({"from": "2024-01-01", "to": "2026-01-01"}, "to"),
    ],
)
def test_bad_usage_parameters_are_400_naming_the_field(
    api_client: APIClient, usage_history: tuple[Tenant, str], params: dict[str, str], field: str
) -> None:
    _tenant, key = usage_history
    response = api_client.get("/v1/usage", params, headers=bearer(key))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert field in error["details"]


def test_usage_needs_a_key(api_client: APIClient, db: None) -> None:
    response = api_client.get("/v1/usage")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "missing_api_key"


# --- The admin ------------------------------------------------------------------------------


def test_the_admin_lists_usage_per_tenant_and_allows_no_edits(
    admin_client: Client, usage_history: tuple[Tenant, str], make_tenant: TenantFactory
) -> None:
    tenant, _key = usage_history
    page = admin_client.get(
        "/admin/usage/usagelog/", {"tenant__id__exact": str(tenant.pk), "endpoint": "synthesize"}
    )
    assert page.status_code == 200
    listed = page.context["cl"].result_list
    assert {row.tenant_id for row in listed} == {tenant.pk}
    assert {row.endpoint for row in listed} == {"synthesize"}
    assert len(listed) == 4
    assert admin_client.get("/admin/usage/usagelog/add/").status_code == 403
    row = listed[0]
    change = admin_client.post(f"/admin/usage/usagelog/{row.pk}/change/", {"audio_seconds": "0"})
    assert change.status_code == 403
    row.refresh_from_db()
    assert row.audio_seconds != 0


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.95, 1.0])
def test_the_percentiles_for_sqlite_match_postgres(db: None, fraction: float) -> None:
    import random

    from django.db import connection

    from usage.services import _percentile

    values = [round(random.uniform(1, 900), 2) for _ in range(37)]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT percentile_cont(%s) WITHIN GROUP (ORDER BY v) FROM unnest(%s::float8[]) AS v",
            [fraction, values],
        )
        (expected,) = cursor.fetchone()
    assert _percentile(sorted(values), fraction) == pytest.approx(expected)
