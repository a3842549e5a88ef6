"""Per-tenant rate limits: atomic GCRA in the real Redis, shared by every process."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from django.conf import settings
from rest_framework.test import APIClient

from core.errors import ServiceError
from tenants import keys
from tenants.models import Tenant
from tests.support.servers import RedisServer, ServiceEnv, daphne_process, daphne_server, free_port
from tests.support.tenants import TenantFactory, bearer, committed_tenant
from tests.support.waiting import wait_until

pytestmark = pytest.mark.django_db


def get_tenant(client: APIClient, key: str) -> Any:
    return client.get("/v1/tenant", headers=bearer(key))


def test_every_authenticated_response_carries_the_remaining_budget(
    api_client: APIClient, make_tenant: TenantFactory
) -> None:
    _tenant, issued = make_tenant(rate_limit_minute=3, rate_limit_hour=100)
    remaining = []
    for _ in range(3):
        response = get_tenant(api_client, issued.plaintext)
        assert response.status_code == 200
        assert response["X-RateLimit-Limit"] == "3"
        assert response["X-RateLimit-Policy"] == "3;w=60"
        remaining.append(int(response["X-RateLimit-Remaining"]))
    assert remaining == [2, 1, 0]

    refused = get_tenant(api_client, issued.plaintext)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert refused["X-RateLimit-Remaining"] == "0"
    assert 19 <= int(refused["Retry-After"]) <= 20  # one request per 20 s refills


def test_retry_after_is_never_earlier_than_the_real_reset(
    api_client: APIClient, make_tenant: TenantFactory
) -> None:
    _tenant, issued = make_tenant(rate_limit_minute=60, rate_limit_hour=10_000)
    statuses = [get_tenant(api_client, issued.plaintext).status_code for _ in range(60)]
    assert statuses == [200] * 60  # the burst is the minute's whole budget
    # One more request refills every second, so a slow machine gets a few more
    # through before the first refusal: how many is timing, not behaviour.
    for _ in range(60):
        refused = get_tenant(api_client, issued.plaintext)
        if refused.status_code == 429:
            break
    assert refused.status_code == 429
    wait = int(refused["Retry-After"])
    assert wait == 1
    time.sleep(wait)
    assert get_tenant(api_client, issued.plaintext).status_code == 200


def test_the_hour_window_is_enforced_on_its_own(api_client: APIClient, make_tenant: TenantFactory) -> None:
    _tenant, issued = make_tenant(rate_limit_minute=0, rate_limit_hour=2)
    assert [get_tenant(api_client, issued.plaintext).status_code for _ in range(2)] == [200, 200]
    refused = get_tenant(api_client, issued.plaintext)
    assert refused.status_code == 429
    assert refused["X-RateLimit-Policy"] == "2;w=3600"
    assert 1790 <= int(refused["Retry-After"]) <= 1800


def test_a_limit_changed_in_the_database_takes_effect(
    api_client: APIClient, make_tenant: TenantFactory
) -> None:
    tenant, issued = make_tenant(rate_limit_minute=1, rate_limit_hour=1000)
    assert get_tenant(api_client, issued.plaintext).status_code == 200
    assert get_tenant(api_client, issued.plaintext).status_code == 429
    Tenant.objects.filter(pk=tenant.pk).update(rate_limit_minute=120)
    time.sleep(1.0)  # the spent request still counts; the new rate refills in 0.5 s
    response = get_tenant(api_client, issued.plaintext)
    assert response.status_code == 200
    assert response["X-RateLimit-Limit"] == "120"


def test_failed_authentication_never_spends_the_tenants_budget(
    api_client: APIClient, make_tenant: TenantFactory
) -> None:
    _tenant, issued = make_tenant(rate_limit_minute=5, rate_limit_hour=1000)
    forged = keys.format_key(issued.api_key.prefix, keys.generate_secret())
    for _ in range(20):
        assert get_tenant(api_client, forged).status_code == 401
    response = get_tenant(api_client, issued.plaintext)
    assert response.status_code == 200
    assert response["X-RateLimit-Remaining"] == "4"


def test_async_endpoints_are_limited_too(api_client: APIClient, make_tenant: TenantFactory) -> None:
    _tenant, issued = make_tenant(rate_limit_minute=2, rate_limit_hour=1000)
    body = {"text": ""}  # a cheap request: authenticated, then refused as empty
    codes = [
        api_client.post("/v1/synthesize", body, format="json", headers=bearer(issued.plaintext)).status_code
        for _ in range(3)
    ]
    assert codes == [400, 400, 429]


@pytest.fixture(scope="module")
def limited_tenant(django_db_blocker: Any, test_database_url: str) -> Iterator[tuple[Tenant, str]]:
    with committed_tenant(django_db_blocker, "limited", rate_limit_minute=60, rate_limit_hour=60) as (
        tenant,
        issued,
    ):
        yield tenant, issued.plaintext


@pytest.mark.slow
def test_two_processes_sharing_redis_let_exactly_the_limit_through(
    service_env: ServiceEnv, limited_tenant: tuple[Tenant, str]
) -> None:
    _tenant, key = limited_tenant
    env = service_env(REDIS_URL=settings.REDIS_URL, API_KEY_CACHE_SECONDS="5")
    with daphne_server(env) as first, daphne_server(env) as second:
        clients = [
            httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
            for base in (first, second)
        ]

        def request(index: int) -> httpx.Response:
            return clients[index % 2].get("/v1/voices")

        with ThreadPoolExecutor(max_workers=50) as pool:
            responses = list(pool.map(request, range(300)))
        for client in clients:
            client.close()
    statuses = [response.status_code for response in responses]
    assert statuses.count(200) == 60
    assert statuses.count(429) == 240
    for response in responses:
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "rate_limited"
            # The hour window (60 per hour) is the one exhausted: one request per 60 s.
            assert 1 <= int(response.headers["Retry-After"]) <= 60


@pytest.fixture(scope="module")
def one_stream_tenant(django_db_blocker: Any, test_database_url: str) -> Iterator[str]:
    limits = {"rate_limit_minute": 0, "rate_limit_hour": 0, "max_concurrent_streams": 1}
    with committed_tenant(django_db_blocker, "one-stream", **limits) as (_tenant, issued):
        yield issued.plaintext


LONG_TEXT = " ".join(f"Sentence {n} of a long answer that keeps the stream open." for n in range(60))


def stream_env(service_env: ServiceEnv) -> dict[str, str]:
    return service_env(REDIS_URL=settings.REDIS_URL, STREAM_LEASE_SECONDS="2")


def open_stream(base_url: str, key: str) -> tuple[httpx.Client, Any, Iterator[bytes]]:
    client = httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    context = client.stream("POST", "/v1/synthesize", json={"text": LONG_TEXT, "streaming": True})
    response = context.__enter__()
    assert response.status_code == 200
    body = response.iter_raw()
    next(body)
    return client, context, body


def try_stream(base_url: str, key: str) -> int:
    response = httpx.post(
        f"{base_url}/v1/synthesize",
        json={"text": "Short.", "streaming": True},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    return response.status_code


@pytest.mark.slow
def test_the_stream_cap_holds_across_processes_and_frees_on_close(
    service_env: ServiceEnv, one_stream_tenant: str
) -> None:
    key = one_stream_tenant
    env = stream_env(service_env)
    with daphne_server(env) as first, daphne_server(env) as second:
        client, context, _body = open_stream(first, key)
        refused = httpx.post(
            f"{second}/v1/synthesize",
            json={"text": "Short.", "streaming": True},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "stream_limit"
        # A whole-file request is not a stream.
        assert (
            httpx.post(
                f"{second}/v1/synthesize", json={"text": "Short."}, headers={"Authorization": f"Bearer {key}"}
            ).status_code
            == 200
        )
        context.__exit__(None, None, None)
        client.close()
        wait_until(lambda: try_stream(second, key) == 200, what="the closed stream's lease to be released")


@pytest.mark.slow
def test_a_killed_process_frees_its_streams_when_their_leases_expire(
    service_env: ServiceEnv, one_stream_tenant: str
) -> None:
    key = one_stream_tenant
    env = stream_env(service_env)
    with daphne_process(env) as (doomed, first), daphne_server(env) as second:
        client, _context, _body = open_stream(first, key)
        # From before the kill: a lease renewed at most a third of its 2 s before it expires
        # 1.33 s or more after it, however slowly the checks below run on a loaded machine.
        killed_at = time.monotonic()
        doomed.kill()  # SIGKILL: no cleanup runs
        doomed.wait()
        client.close()
        assert try_stream(second, key) == 429
        wait_until(lambda: try_stream(second, key) == 200, what="the dead process's lease to expire")
        assert time.monotonic() - killed_at >= 1.0  # freed by expiry, not by anyone closing it


# --- Quotas ------------------------------------------------------------------------


def test_synthesis_past_the_monthly_quota_is_refused(
    api_client: APIClient, make_tenant: TenantFactory
) -> None:
    from usage.models import QuotaUsage
    from usage.quotas import current_month
    from usage.recorder import usage_flush

    tenant, issued = make_tenant(quota_minutes=1, rate_limit_minute=0, rate_limit_hour=0)
    body = {"text": "Hello there, this counts toward the quota."}
    first = api_client.post("/v1/synthesize", body, format="json", headers=bearer(issued.plaintext))
    assert first.status_code == 200
    usage_flush()  # the usage writer keeps the counter, with the usage rows
    used = QuotaUsage.objects.get(tenant=tenant, month=current_month()).audio_seconds
    assert used == pytest.approx(float(first["X-Audio-Duration"]), abs=0.01)

    # Mid-month, the minute is nearly used up: one more request may still start...
    QuotaUsage.objects.filter(tenant=tenant).update(audio_seconds=59.0)
    assert (
        api_client.post("/v1/synthesize", body, format="json", headers=bearer(issued.plaintext)).status_code
        == 200
    )
    usage_flush()
    # ...and what it produced pushed the count past the quota, so the next is refused.
    assert QuotaUsage.objects.get(tenant=tenant).audio_seconds > 60
    refused = api_client.post("/v1/synthesize", body, format="json", headers=bearer(issued.plaintext))
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "quota_exceeded"
    assert int(refused["Retry-After"]) > 0
    url_refused = api_client.post("/v1/synthesize-url", body, format="json", headers=bearer(issued.plaintext))
    assert url_refused.json()["error"]["code"] == "quota_exceeded"


@pytest.mark.django_db(transaction=True)  # the async ORM calls run on another connection
def test_the_quota_check_reads_through_a_short_cache(settings: Any, make_tenant: TenantFactory) -> None:
    import asyncio

    from usage.models import QuotaUsage
    from usage.quotas import current_month, quota_check, quota_reserve, quota_used_seconds

    settings.QUOTA_CACHE_SECONDS = 0.5
    tenant, _issued = make_tenant(quota_minutes=1)

    async def scenario() -> None:
        assert await quota_used_seconds(tenant) == 0.0
        reservation = await quota_reserve(tenant, 5.0)
        assert reservation is not None
        reservation.settle(30.0)  # this process's own usage counts at once...
        # Another process's usage, as its usage writer stores it:
        await QuotaUsage.objects.acreate(tenant=tenant, month=current_month(), audio_seconds=60.0)
        await quota_check(tenant)  # another process's usage: not seen yet...
        await asyncio.sleep(0.6)
        with pytest.raises(ServiceError, match="used up"):  # ...but within the cache time
            await quota_check(tenant)

    asyncio.run(scenario())


def test_last_months_usage_does_not_count(make_tenant: TenantFactory, api_client: APIClient) -> None:
    from datetime import date

    from usage.models import QuotaUsage

    tenant, issued = make_tenant(quota_minutes=1, rate_limit_minute=0, rate_limit_hour=0)
    QuotaUsage.objects.create(tenant=tenant, month=date(2020, 1, 1), audio_seconds=10_000)
    response = api_client.post(
        "/v1/synthesize", {"text": "Hi."}, format="json", headers=bearer(issued.plaintext)
    )
    assert response.status_code == 200


# --- Redis outage ---------------------------------------------------------------------


@pytest.fixture
def own_redis(tmp_path: Any) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A Redis server of this test's own, so that stopping it harms nobody else."""
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + 10
    while (
        subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True).stdout.strip()
        != "PONG"
    ):
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    yield process, f"redis://127.0.0.1:{port}/0"
    process.kill()
    process.wait()


@pytest.fixture(scope="module")
def outage_tenant(django_db_blocker: Any, test_database_url: str) -> Iterator[tuple[Tenant, str]]:
    limits = {"rate_limit_minute": 1000, "rate_limit_hour": 10_000, "quota_minutes": 10}
    with committed_tenant(django_db_blocker, "outage", **limits) as (tenant, issued):
        yield tenant, issued.plaintext


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)  # the server must see the usage this test writes
def test_with_redis_stopped_the_service_still_answers_and_quotas_hold(
    service_env: ServiceEnv,
    own_redis: tuple[subprocess.Popen[bytes], str],
    outage_tenant: tuple[Tenant, str],
) -> None:
    from usage.models import QuotaUsage
    from usage.quotas import current_month

    redis_process, redis_url = own_redis
    tenant, key = outage_tenant
    # The test changes usage behind the server's back: no quota cache.
    env = service_env(REDIS_URL=redis_url, QUOTA_CACHE_SECONDS="0")
    headers = {"Authorization": f"Bearer {key}"}
    with (
        daphne_server(env) as base_url,
        httpx.Client(base_url=base_url, headers=headers, timeout=30) as client,
    ):
        before = client.post("/v1/synthesize", json={"text": "Before the outage.", "streaming": True})
        assert before.status_code == 200
        assert before.headers["X-RateLimit-Limit"] == "1000"

        redis_process.kill()
        redis_process.wait()
        statuses = [
            client.post("/v1/synthesize", json={"text": "During the outage.", "streaming": True}).status_code
            for _ in range(5)
        ] + [client.get("/v1/voices").status_code for _ in range(5)]
        assert statuses == [200] * 10
        during = client.get("/v1/tenant")
        assert during.status_code == 200
        assert "X-RateLimit-Remaining" in during.headers  # the in-process limiter answers
        health = client.get("/v1/health").json()["redis"]
        assert health["fallback_active"] is True
        assert health["failures"] >= 1

        QuotaUsage.objects.filter(tenant=tenant, month=current_month()).update(audio_seconds=10 * 60)
        refused = client.post("/v1/synthesize", json={"text": "Over quota."})
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "quota_exceeded"


@pytest.mark.slow
def test_a_stream_cut_short_counts_only_the_audio_it_produced(
    service_env: ServiceEnv, one_stream_tenant: str
) -> None:
    from usage.models import QuotaUsage

    key = one_stream_tenant
    prefix = keys.parse_key(key).prefix  # type: ignore[union-attr]
    with daphne_server(stream_env(service_env)) as base_url:
        client, context, _body = open_stream(base_url, key)
        context.__exit__(None, None, None)  # the caller hangs up after the first audio
        client.close()
        deadline = time.monotonic() + 5
        used = 0.0
        while used == 0.0 and time.monotonic() < deadline:
            time.sleep(0.1)
            used = sum(
                QuotaUsage.objects.filter(tenant__api_keys__prefix=prefix).values_list(
                    "audio_seconds", flat=True
                )
            )
    assert 0 < used < 30  # the whole text is about a minute of speech


@pytest.mark.django_db(transaction=True)  # the async ORM calls run on another connection
@pytest.mark.parametrize("holds_in", ["redis", "process"])
def test_quota_reservations_count_while_requests_run_and_settle_to_the_audio_sent(
    settings: Any, make_tenant: TenantFactory, holds_in: str
) -> None:
    import asyncio

    from usage.models import QuotaUsage
    from usage.quotas import current_month, quota_reserve, quota_rows_written

    settings.QUOTA_CACHE_SECONDS = 0.2
    if holds_in == "process":
        settings.REDIS_URL = ""  # no Redis: the same bookkeeping in this process
    tenant, _issued = make_tenant(quota_minutes=1)

    async def scenario() -> None:
        first = await quota_reserve(tenant, 40.0)
        assert first is not None
        assert first.in_redis == (holds_in == "redis")
        second = await quota_reserve(tenant, 40.0)  # 40 s held: still under the 60 s quota
        assert first is not None
        assert second is not None
        with pytest.raises(ServiceError, match="used up"):
            await quota_reserve(tenant, 1.0)  # 80 s held
        first.settle(10.0)  # it ended having sent 10 s
        second.settle(0.0)  # refused later, or sent nothing
        second.settle(50.0)  # settling twice changes nothing
        third = await quota_reserve(tenant, 50.0)  # 10 s held
        assert third is not None
        with pytest.raises(ServiceError, match="used up"):
            await quota_reserve(tenant, 1.0)  # 60 s held
        third.settle(0.0)
        # Once the usage writer has stored the first one's row, a new reading counts it and
        # the hold lets it go (no double count at the edge of the quota).
        await QuotaUsage.objects.acreate(tenant=tenant, month=current_month(), audio_seconds=10.0)
        quota_rows_written([(first.record_id, tenant.id, current_month())])
        await asyncio.sleep(settings.QUOTA_CACHE_SECONDS + 0.05)  # a reading after the write
        fourth = await quota_reserve(tenant, 45.0)  # 10 s used, nothing held
        fifth = await quota_reserve(tenant, 1.0)  # 55 s: counting the 10 s twice would refuse it
        assert fourth is not None
        assert fifth is not None
        fourth.settle(0.0)
        fifth.settle(0.0)

    asyncio.run(scenario())


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.django_db(transaction=True)  # the server must see the committed tenant
@pytest.mark.parametrize("fault", ["restart", "pause"])
def test_requests_across_a_redis_fault_never_pass_the_limit_in_the_window(
    service_env: ServiceEnv, django_db_blocker: Any, redis_server: RedisServer, fault: str
) -> None:
    """An hour limit of 20 (so the window refills by well under one request in the test):
    requests before, during and after an empty restart or a pause of Redis pass at most 20
    (plus what the window refilled meanwhile)."""
    limit = 20
    limits = {"rate_limit_minute": 0, "rate_limit_hour": limit, "max_concurrent_streams": 0}
    env = service_env(REDIS_URL=redis_server.url, QUOTA_CACHE_SECONDS="0")
    with (
        committed_tenant(django_db_blocker, f"rate-{fault}", **limits) as (_tenant, issued),
        daphne_server(env) as base_url,
        httpx.Client(base_url=base_url, headers=bearer(issued.plaintext), timeout=30) as client,
    ):
        started = time.monotonic()

        def spend(count: int) -> list[int]:
            return [client.get("/v1/voices").status_code for _ in range(count)]

        statuses = spend(8)  # in Redis
        process = redis_server.process
        assert process is not None
        if fault == "restart":
            redis_server.stop()
        else:
            process.send_signal(signal.SIGSTOP)
        try:
            statuses += spend(8)  # in the fallback
        finally:
            if fault == "restart":
                redis_server.start()  # empty
            else:
                process.send_signal(signal.SIGCONT)
        wait_until(
            lambda: client.get("/v1/health").json()["redis"]["fallback_active"] is False,
            what="the limiter back on Redis",
            timeout_s=60,
        )
        statuses += spend(30)  # in Redis again
        refilled = (time.monotonic() - started) * limit / 3600
    assert statuses[:16] == [200] * 16
    assert statuses.count(200) <= limit + 1 + int(refilled)
    assert statuses.count(429) >= len(statuses) - limit - 1 - int(refilled)
