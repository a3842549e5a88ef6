"""Usage metering through Daphne: a 1,000-request mixed load, and a database outage."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from tests.support.servers import ServiceEnv, daphne_server, manage, postgres_server
from tests.support.tenants import bearer, committed_tenant
from usage.models import UsageLog

PCM_RATE = 16000
SHORT = "Hi."
# Many short clauses: audio starts after the first, and the caller hangs up long before the last.
LONG = " ".join(f"Part {n} of a long answer." for n in range(30))


@dataclass
class Sent:
    """What the client saw of one request, to hold its usage row against."""

    kind: str
    status: int = 0
    received: int = 0
    error_code: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _kind(index: int) -> str:
    return {0: "batch", 1: "batch", 2: "batch", 3: "stream", 4: "stream", 5: "cancel", 6: "invalid",
            7: "invalid", 8: "url", 9: "batch"}[index % 10]  # fmt: skip


_INVALID_BODIES: list[Any] = [
    {"text": ""},
    {"text": "Hi.", "format": "aiff"},
    {"text": "Hi.", "voice_id": "nobody"},
    "{broken json",
]


async def _one(client: httpx.AsyncClient, key: str, index: int) -> tuple[str, Sent]:
    request_id = f"load-{index:04d}"
    headers = {**bearer(key), "X-Request-ID": request_id}
    kind = _kind(index)
    sent = Sent(kind)
    if kind in ("batch", "invalid", "url"):
        if kind == "batch":
            body: Any = {"text": SHORT, "format": ("pcm", "wav", "mp3")[index % 3], "sample_rate": PCM_RATE}
        elif kind == "url":
            body = {"text": f"A cached phrase, number {index % 3}."}
        else:
            body = _INVALID_BODIES[index % len(_INVALID_BODIES)]
        path = "/v1/synthesize-url" if kind == "url" else "/v1/synthesize"
        if isinstance(body, str):
            response = await client.post(
                path, content=body, headers={**headers, "Content-Type": "application/json"}
            )
        else:
            response = await client.post(path, json=body, headers=headers)
        sent.status = response.status_code
        sent.received = len(response.content)
        if response.status_code >= 400:
            sent.error_code = response.json()["error"]["code"]
        elif kind == "url":
            sent.extra = response.json()
        return request_id, sent

    text = LONG if kind == "cancel" else SHORT
    body = {"text": text, "format": "pcm", "sample_rate": PCM_RATE, "streaming": True}
    async with client.stream("POST", "/v1/synthesize", json=body, headers=headers) as response:
        sent.status = response.status_code
        async for chunk in response.aiter_raw():
            sent.received += len(chunk)
            if kind == "cancel":
                break  # hang up after the first audio: the caller barged in
    return request_id, sent


def _wait_for_rows(count_rows: Callable[[], int], expected: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := count_rows()) < expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{seen} usage rows after {timeout}s, expected {expected}")
        time.sleep(0.2)
    time.sleep(0.5)  # and no more than that arrive
    assert count_rows() == expected


@pytest.mark.slow
# Committed data (transaction=True): the server in its own process must see the tenant.
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(600)
def test_a_thousand_mixed_requests_leave_exactly_one_row_each(
    service_env: ServiceEnv, django_db_blocker: Any
) -> None:
    limits = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0, "max_concurrent_streams": 0}
    with (
        committed_tenant(django_db_blocker, "load", **limits) as (tenant, issued),
        daphne_server(service_env()) as base_url,
    ):

        async def load() -> dict[str, Sent]:
            gate = asyncio.Semaphore(16)
            async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
                # The full length of the long answer, to show the cancelled ones stopped early.
                full = await client.post(
                    "/v1/synthesize",
                    json={"text": LONG, "format": "pcm", "sample_rate": PCM_RATE},
                    headers={**bearer(issued.plaintext), "X-Request-ID": "load-full"},
                )

                async def gated(index: int) -> tuple[str, Sent]:
                    async with gate:
                        return await _one(client, issued.plaintext, index)

                results = dict(await asyncio.gather(*(gated(i) for i in range(1000))))
                results["load-full"] = Sent("batch", full.status_code, len(full.content))
                return results

        sent = asyncio.run(load())

        def rows() -> int:
            with django_db_blocker.unblock():
                return UsageLog.objects.filter(tenant=tenant).count()

        _wait_for_rows(rows, len(sent))
        with django_db_blocker.unblock():
            stored = {row.request_id: row for row in UsageLog.objects.filter(tenant=tenant)}

    assert set(stored) == set(sent)  # one row per request, none missing, none doubled
    assert Counter(s.kind for s in sent.values()) == {
        "batch": 401, "stream": 200, "cancel": 100, "invalid": 200, "url": 100,
    }  # fmt: skip
    full_length = sent["load-full"].received
    for request_id, client_side in sent.items():
        row = stored[request_id]
        assert row.status_code == client_side.status, request_id
        if client_side.kind == "invalid":
            assert (row.error_code, row.audio_bytes, row.latency_ms) == (client_side.error_code, 0, None)
        elif client_side.kind == "cancel":
            # The row counts what the server handed to the socket: at least what
            # the client read, less than the whole answer, and its seconds are
            # exactly the seconds in those bytes (16-bit mono PCM).
            assert row.error_code == "client_disconnected", request_id
            assert client_side.received <= row.audio_bytes < full_length, request_id
            assert row.audio_seconds == pytest.approx(row.audio_bytes / 2 / PCM_RATE, abs=1e-4)
            assert row.streaming
        elif client_side.kind == "url":
            assert row.error_code is None
            assert row.audio_bytes == client_side.extra["bytes"]
        else:
            assert row.error_code is None, request_id
            if client_side.kind == "stream":
                assert row.audio_bytes == client_side.received
                assert row.audio_seconds == pytest.approx(row.audio_bytes / 2 / PCM_RATE, abs=1e-4)
            assert row.latency_ms is not None
            assert row.latency_ms <= row.total_ms
    assert sum(row.cached for row in stored.values()) >= 97  # three phrases, made once each


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_with_postgres_stopped_requests_succeed_and_every_row_arrives_afterwards(
    service_env: ServiceEnv, tmp_path: Path
) -> None:
    with postgres_server() as postgres:
        env = service_env(
            DATABASE_URL=postgres.url,
            USAGE_SPOOL_DIR=str(tmp_path / "spool"),
            # Keys verified before the outage keep working through it; the
            # outage below lasts longer than this, so the fallback is exercised.
            API_KEY_CACHE_SECONDS="1",
            QUOTA_CACHE_SECONDS="1",
        )
        manage("migrate", "--noinput", env=env)
        created = manage("create_tenant", "outage", "--quota-minutes", "600", "--rate-limit-minute", "0",
                         "--rate-limit-hour", "0", env=env)  # fmt: skip
        key = re.search(r"cwt_\w+", created)
        assert key is not None

        def count_rows() -> int:
            with psycopg.connect(postgres.url) as connection:
                row = connection.execute("SELECT count(*) FROM usage_usagelog").fetchone()
                return int(row[0]) if row else 0

        sent: list[str] = []
        with daphne_server(env) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:

            def speak(index: int, *, streaming: bool) -> None:
                request_id = f"outage-{index:03d}"
                body = {"text": f"Still speaking, request {index}.", "format": "pcm", "streaming": streaming}
                headers = {**bearer(key.group()), "X-Request-ID": request_id}
                response = client.post("/v1/synthesize", json=body, headers=headers)
                assert response.status_code == 200, response.text
                assert len(response.content) > 1000
                sent.append(request_id)

            for index in range(5):
                speak(index, streaming=index % 2 == 0)
            _wait_for_rows(count_rows, 5)
            before = {**bearer(key.group()), "X-Request-ID": "before-outage-url"}
            stored_link = client.post("/v1/synthesize-url", json={"text": "Stored first."}, headers=before)
            assert stored_link.status_code == 200, stored_link.text
            sent.append("before-outage-url")

            postgres.stop()
            for index in range(5, 25):
                speak(index, streaming=index % 2 == 0)
                time.sleep(0.1)  # past the key and quota cache times: the fallbacks answer
            usage = client.get("/v1/health").json()["usage"]
            assert usage["database_unavailable"]
            assert usage["spooled_files"] >= 1, "records wait in the spool while the database is away"
            # A request that needs the database answers 503 with a stable code, and is metered too.
            url = client.post("/v1/synthesize-url", json={"text": "Needs the database."},
                              headers={**bearer(key.group()), "X-Request-ID": "outage-url"})  # fmt: skip
            assert url.status_code == 503
            assert url.json()["error"]["code"] == "database_unavailable"
            sent.append("outage-url")
            # The signed download looks its audio up in the database: 503 too, not a 500.
            download = client.get(urlsplit(stored_link.json()["url"])._replace(scheme="", netloc="").geturl())
            assert download.status_code == 503, download.text
            assert download.json()["error"]["code"] == "database_unavailable"

            postgres.start()
            _wait_for_rows(count_rows, len(sent))
            assert client.get("/v1/health").json()["usage"]["spooled_files"] == 0

        with psycopg.connect(postgres.url) as connection:
            stored = connection.execute(
                "SELECT request_id, status_code, audio_seconds FROM usage_usagelog"
            ).fetchall()
            quota = connection.execute("SELECT sum(audio_seconds) FROM tenants_quotausage").fetchone()
    # The log has the outage in it, and none of the text (only counts are logged).
    log = "".join(path.read_text() for path in Path(env["CWT_TEST_LOG_DIR"]).glob("daphne-*.log"))
    assert "database is unavailable" in log
    assert "Still speaking" not in log
    assert sorted(request_id for request_id, _status, _seconds in stored) == sorted(sent)
    assert {request_id: status for request_id, status, _ in stored}["outage-url"] == 503
    assert quota is not None
    assert quota[0] == pytest.approx(sum(seconds for _, _, seconds in stored), abs=1e-3)
