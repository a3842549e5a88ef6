"""Usage rows that hold under abuse and faults, through Daphne: a value the database
refuses, a process killed with streams in flight, a shutdown that cuts streams."""

from __future__ import annotations

import json
import os
import signal
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.conf import settings

from tests.support.servers import ServiceEnv, daphne_process, daphne_server
from tests.support.tenants import bearer, committed_tenant
from tests.support.waiting import wait_until
from usage.models import UsageLog
from usage.recorder import INTERRUPTED, UsageMeter

UNLIMITED = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0}
# Minutes of speech: still streaming whatever the machine's speed when the process goes.
LONG = " ".join(f"Sentence number {n} of an answer that keeps going for a long while." for n in range(60))
JSON = {"Content-Type": "application/json"}


def _rows(django_db_blocker: Any, tenant_id: uuid.UUID) -> list[UsageLog]:
    with django_db_blocker.unblock():
        return list(UsageLog.objects.filter(tenant_id=tenant_id))


# The class of input: a control character (NUL, ESC, DEL), or a lone surrogate, in any
# identifier or enum field, through each door.
_REFUSED_BODIES = [
    ("/v1/synthesize", {"text": "Hi.", "voice_id": "a\u0000b"}, "voice_id"),
    ("/v1/synthesize", {"text": "Hi.", "format": "wav\u0000"}, "format"),
    ("/v1/synthesize", {"text": "Hi.", "language": "en\u001b[31m"}, "language"),
    ("/v1/synthesize", {"text": "Hi.", "voice_id": "\ud800"}, "voice_id"),
    ("/v1/synthesize-url", {"text": "Hi.", "voice_id": "joe\u007f"}, "voice_id"),
    ("/v1/audio/speech", {"model": "tts-1", "input": "Hi.", "voice": "a\u0000b"}, None),
]


@pytest.mark.timeout(300)
@pytest.mark.django_db(transaction=True)
def test_control_characters_are_refused_and_a_refused_record_never_blocks_the_rest(
    service_env: ServiceEnv, django_db_blocker: Any, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    with committed_tenant(django_db_blocker, "poison", **UNLIMITED) as (tenant, issued):
        # What the old code journaled for `"voice_id": "a\u0000b"`, left by an earlier process:
        # Postgres cannot store it, however often it is tried.
        poisoned = UsageMeter(endpoint="synthesize", request_id="poisoned", tenant_id=tenant.id).record(503)
        poisoned["voice_id"] = "a\u0000b"
        (spool / "earlier-000001.jsonl").write_text(json.dumps(poisoned) + "\n")
        env = service_env(USAGE_SPOOL_DIR=str(spool))
        headers = {**bearer(issued.plaintext), **JSON}
        with daphne_server(env) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
            for path, body, field in _REFUSED_BODIES:
                response = client.post(path, content=json.dumps(body), headers=headers)
                assert response.status_code == 400, (body, response.text)
                assert response.headers["X-Request-ID"]
                error = response.json()["error"]
                assert error["code"] == "invalid_request"
                if field is not None:
                    assert field in error["details"], error
            assert client.post("/v1/synthesize", json={"text": "Hi."}, headers=headers).status_code == 200
            expected = len(_REFUSED_BODIES) + 1
            wait_until(
                lambda: len(_rows(django_db_blocker, tenant.id)) == expected, what="every row", timeout_s=60
            )
            assert client.get("/v1/health").json()["usage"]["dead_letters"] == 1
        # The next process, on the same spool: rows keep coming.
        with daphne_server(env) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
            assert client.post("/v1/synthesize", json={"text": "Hi."}, headers=headers).status_code == 200
            wait_until(
                lambda: len(_rows(django_db_blocker, tenant.id)) == expected + 1, what="the row", timeout_s=60
            )
        rows = _rows(django_db_blocker, tenant.id)
        assert sorted(row.status_code for row in rows) == [200, 200] + [400] * len(_REFUSED_BODIES)
        assert all("\x00" not in row.voice_id for row in rows)
        dead = (spool / "dead" / "letters.jsonl").read_text().splitlines()
        assert [json.loads(line)["record"]["request_id"] for line in dead] == ["poisoned"]


class _Listener(threading.Thread):
    """One caller holding a long stream open, counting what it hears."""

    def __init__(self, base_url: str, key: str, request_id: str) -> None:
        super().__init__(daemon=True)
        self.base_url, self.key, self.request_id = base_url, key, request_id
        self.received = 0
        self.status = 0

    def run(self) -> None:
        body = {"text": LONG, "format": "pcm", "streaming": True}
        headers = {**bearer(self.key), "X-Request-ID": self.request_id}
        try:
            with (
                httpx.Client(base_url=self.base_url, timeout=120) as client,
                client.stream("POST", "/v1/synthesize", json=body, headers=headers) as response,
            ):
                self.status = response.status_code
                for chunk in response.iter_raw():
                    self.received += len(chunk)
        except httpx.HTTPError:
            pass  # the server went away: what the test is about


def _listeners(base_url: str, key: str, label: str, count: int) -> list[_Listener]:
    listeners = [_Listener(base_url, key, f"{label}-{n}") for n in range(count)]
    for listener in listeners:
        listener.start()
    wait_until(lambda: all(listener.received > 0 for listener in listeners), what="audio", timeout_s=120)
    assert [listener.status for listener in listeners] == [200] * count
    return listeners


@pytest.mark.timeout(300)
@pytest.mark.django_db(transaction=True)
def test_streams_in_flight_at_kill_9_are_written_as_interrupted_by_the_next_process(
    service_env: ServiceEnv, django_db_blocker: Any, tmp_path: Path
) -> None:
    fields = {**UNLIMITED, "max_concurrent_streams": 5}
    with committed_tenant(django_db_blocker, "killed", **fields) as (tenant, issued):
        env = service_env(
            USAGE_SPOOL_DIR=str(tmp_path / "spool"), REDIS_URL=settings.REDIS_URL, STREAM_LEASE_SECONDS="3"
        )
        with daphne_process(env) as (process, base_url):
            listeners = _listeners(base_url, issued.plaintext, "killed", 5)
            # Past a few snapshot intervals, so that the snapshot has counted some audio.
            start = [listener.received for listener in listeners]
            wait_until(
                lambda: all(lst.received > seen + 64_000 for lst, seen in zip(listeners, start, strict=True)),
                what="more audio",
                timeout_s=120,
            )
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
            for listener in listeners:
                listener.join(timeout=30)
        assert _rows(django_db_blocker, tenant.id) == []

        with daphne_server(env) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
            # Written at start-up: no request here has finished yet.
            wait_until(lambda: len(_rows(django_db_blocker, tenant.id)) == 5, what="5 rows", timeout_s=60)
            # The dead process's 5 stream slots free within the lease time.
            body = {"text": "Hi.", "format": "pcm", "streaming": True}

            def five_at_once() -> bool:
                results: list[int] = []

                def one() -> None:
                    with client.stream(
                        "POST", "/v1/synthesize", json=body, headers=bearer(issued.plaintext)
                    ) as r:
                        results.append(r.status_code)
                        r.read()

                threads = [threading.Thread(target=one) for _ in range(5)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(timeout=60)
                return results == [200] * 5

            wait_until(five_at_once, what="the slots to free", timeout_s=60, interval=0.5)
        rows = {
            row.request_id: row
            for row in _rows(django_db_blocker, tenant.id)
            if row.request_id.startswith("killed")
        }
        assert sorted(rows) == [f"killed-{n}" for n in range(5)]  # each once, none doubled
        for listener in listeners:
            row = rows[listener.request_id]
            assert (row.status_code, row.error_code, row.streaming) == (200, INTERRUPTED, True)
            # As far as the last snapshot knew.
            assert row.audio_bytes > 0
            assert row.audio_seconds > 0


@pytest.mark.timeout(300)
@pytest.mark.django_db(transaction=True)
def test_streams_cut_by_a_shutdown_past_its_grace_leave_interrupted_rows(
    service_env: ServiceEnv, django_db_blocker: Any, tmp_path: Path
) -> None:
    with committed_tenant(django_db_blocker, "cut", **UNLIMITED) as (tenant, issued):
        env = service_env(USAGE_SPOOL_DIR=str(tmp_path / "spool"), SHUTDOWN_GRACE_SECONDS="1")
        with daphne_process(env) as (process, base_url):
            listeners = _listeners(base_url, issued.plaintext, "cut", 3)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
            for listener in listeners:
                listener.join(timeout=30)
        # Written before the process exited: no other process runs.
        rows = _rows(django_db_blocker, tenant.id)
        assert sorted(row.request_id for row in rows) == ["cut-0", "cut-1", "cut-2"]
        assert {(row.status_code, row.error_code) for row in rows} == {(200, INTERRUPTED)}
        assert all(row.audio_bytes > 0 for row in rows)
