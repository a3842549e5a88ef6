"""A usage journal that cannot be written, through Daphne, on real failing filesystems
(tests/support/filesystems.py): synthesis is refused on every door before audio is made
(503 usage_unavailable, an error event on the sockets), readiness and health say so, the
held rows reach the database, and service resumes when the journal is writable again."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.support.filesystems import fill, remount, tmpfs
from tests.support.servers import ServiceEnv, daphne_server
from tests.support.tenants import bearer, committed_tenant
from tests.support.waiting import wait_until
from usage.models import UsageLog

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

UNLIMITED = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0, "max_concurrent_streams": 0}
METRICS_TOKEN = "journal-scrape-token"


def _rows(django_db_blocker: Any, tenant_id: uuid.UUID) -> list[tuple[str, int, str]]:
    with django_db_blocker.unblock():
        return sorted(
            (row.endpoint, row.status_code, row.error_code or "")
            for row in UsageLog.objects.filter(tenant_id=tenant_id)
        )


def _journal_failing(client: httpx.Client) -> bool:
    ready = client.get("/v1/ready")
    return ready.status_code == 503 and "usage_journal" in ready.json()["failed"]


def _metric(client: httpx.Client, name: str) -> float:
    text = client.get("/metrics", headers=bearer(METRICS_TOKEN)).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} is not on /metrics"
    return float(match.group(1))


def _event(ws: ClientConnection, kind: str) -> dict[str, Any]:
    for _ in range(10_000):
        message = ws.recv(timeout=60)
        if isinstance(message, str) and (body := json.loads(message)).get("type") == kind:
            return dict(body)
    raise AssertionError(f"no {kind} event")


def _json(ws: ClientConnection) -> dict[str, Any]:
    message = ws.recv(timeout=60)
    assert isinstance(message, str)
    return dict(json.loads(message))


def _refused_on_every_socket(base_url: str, key: str) -> None:
    ws_url = base_url.replace("http://", "ws://")
    with connect(f"{ws_url}/v1/stream", additional_headers=bearer(key)) as ws:
        ws.send(json.dumps({"type": "start", "context_id": "a", "format": "pcm"}))
        error = _event(ws, "error")
        assert (error["code"], error["context_id"]) == ("usage_unavailable", "a")
    elevenlabs = f"{ws_url}/v1/text-to-speech/joe"
    with connect(
        f"{elevenlabs}/stream-input?output_format=pcm_16000", additional_headers={"xi-api-key": key}
    ) as ws:
        ws.send(json.dumps({"text": "Hello there. ", "flush": True}))
        assert _json(ws)["error"] == "usage_unavailable"
    with connect(
        f"{elevenlabs}/multi-stream-input?output_format=pcm_16000", additional_headers={"xi-api-key": key}
    ) as ws:
        ws.send(json.dumps({"text": "Hello there. ", "context_id": "a", "flush": True}))
        body = _json(ws)
        assert (body["error"], body.get("contextId")) == ("usage_unavailable", "a")
    headers = {"X-API-Key": key, "Cartesia-Version": "2025-04-16"}
    with connect(f"{ws_url}/tts/websocket", additional_headers=headers) as ws:
        ws.send(
            json.dumps(
                {
                    "context_id": "c",
                    "transcript": "Hello there.",
                    "continue": False,
                    "model_id": "sonic-2",
                    "voice": {"mode": "id", "id": "joe"},
                    "output_format": {"container": "raw", "encoding": "pcm_s16le", "sample_rate": 16000},
                }
            )
        )
        body = _json(ws)
        assert (body["type"], body["code"], body["status_code"]) == ("error", "usage_unavailable", 503)


@pytest.mark.timeout(300)
def test_a_read_only_journal_refuses_synthesis_on_every_door_until_it_is_writable(
    service_env: ServiceEnv, django_db_blocker: Any, tmp_path: Path
) -> None:
    with (
        tmpfs(tmp_path / "spool", read_only=True) as spool,
        committed_tenant(django_db_blocker, "journal-ro", **UNLIMITED) as (tenant, issued),
        daphne_server(service_env(USAGE_SPOOL_DIR=str(spool), METRICS_TOKEN=METRICS_TOKEN)) as base_url,
        httpx.Client(base_url=base_url, timeout=60) as client,
    ):
        key = issued.plaintext
        # Found at start-up by the flusher's probe, before any request.
        wait_until(lambda: _journal_failing(client), what="readiness to name the usage journal")
        assert "Read-only file system" in client.get("/v1/ready").json()["checks"]["usage_journal"]["error"]
        usage = client.get("/v1/health").json()["usage"]
        assert usage["journal_writable"] is False
        assert "Read-only file system" in usage["journal_error"]

        doors = [
            ("/v1/synthesize", {"text": "Hello there.", "format": "pcm"}),
            ("/v1/synthesize", {"text": "Hello there.", "format": "pcm", "streaming": True}),
            ("/v1/synthesize-url", {"text": "Hello there."}),
            ("/v1/audio/speech", {"model": "tts-1", "input": "Hello there.", "voice": "alloy"}),
        ]
        for number, (path, body) in enumerate(doors):
            refused = client.post(path, json=body, headers={**bearer(key), "X-Request-ID": f"ro-{number}"})
            assert refused.status_code == 503, (path, refused.text)
            assert refused.json()["error"]["code"] == "usage_unavailable"
            assert refused.headers["X-Request-ID"] == f"ro-{number}"
            assert int(refused.headers["Retry-After"]) > 0
            assert not refused.headers["Content-Type"].startswith("audio/")
        _refused_on_every_socket(base_url, key)
        assert _metric(client, "cwt_usage_unavailable_refusals_total") == len(doors) + 4
        assert _metric(client, "cwt_usage_journal_writable") == 0
        # The refusals' rows, held in memory, reach the database while the disk stays read-only.
        wait_until(lambda: len(_rows(django_db_blocker, tenant.id)) == len(doors) + 4, what="the held rows")
        assert {row[1:] for row in _rows(django_db_blocker, tenant.id)} == {(503, "usage_unavailable")}

        remount(spool, read_only=False)
        wait_until(
            lambda: client.get("/v1/ready").json()["checks"]["usage_journal"]["ok"], what="the journal"
        )
        served = client.post("/v1/synthesize", json={"text": "Hello there."}, headers=bearer(key))
        assert served.status_code == 200
        wait_until(lambda: len(_rows(django_db_blocker, tenant.id)) == len(doors) + 5, what="the served row")
        assert client.get("/v1/health").json()["usage"]["journal_writable"] is True


@pytest.mark.timeout(300)
def test_a_full_journal_keeps_the_row_of_an_utterance_in_flight_and_serves_again_when_space_returns(
    service_env: ServiceEnv, django_db_blocker: Any, tmp_path: Path
) -> None:
    with (
        tmpfs(tmp_path / "disk", size_kb=512) as disk,
        committed_tenant(django_db_blocker, "journal-full", **UNLIMITED) as (tenant, issued),
        daphne_server(
            service_env(USAGE_SPOOL_DIR=str(disk / "spool"), METRICS_TOKEN=METRICS_TOKEN)
        ) as base_url,
        httpx.Client(base_url=base_url, timeout=60) as client,
    ):
        key = issued.plaintext
        ws_url = base_url.replace("http://", "ws://")
        with connect(f"{ws_url}/v1/stream", additional_headers=bearer(key)) as ws:
            ws.send(json.dumps({"type": "start", "context_id": "a", "format": "pcm"}))
            ws.send(json.dumps({"type": "text", "context_id": "a", "text": "The first piece of a reply. "}))
            _event(ws, "audio_start")
            filler = fill(disk)  # the disk fills while the utterance is speaking
            wait_until(lambda: _journal_failing(client), what="readiness to see the full journal")
            assert "No space left on device" in client.get("/v1/health").json()["usage"]["journal_error"]
            # The admitted utterance finishes; its row cannot be journaled, and is kept.
            ws.send(json.dumps({"type": "text", "context_id": "a", "text": "And the rest of it."}))
            ws.send(json.dumps({"type": "end", "context_id": "a"}))
            assert _event(ws, "audio_end")["audio_bytes"] > 0
            # A new utterance cannot start, nor a request.
            ws.send(json.dumps({"type": "start", "context_id": "b", "format": "pcm"}))
            assert _event(ws, "error")["code"] == "usage_unavailable"
        refused = client.post("/v1/synthesize", json={"text": "Hello there."}, headers=bearer(key))
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "usage_unavailable"
        assert _metric(client, "cwt_usage_journal_failures_total") >= 3

        filler.unlink()  # space returns
        wait_until(lambda: not _journal_failing(client), what="readiness once space returns")
        assert (
            client.post("/v1/synthesize", json={"text": "Hello there."}, headers=bearer(key)).status_code
            == 200
        )
        expected = [
            ("stream", 200, ""),
            ("stream", 503, "usage_unavailable"),
            ("synthesize", 200, ""),
            ("synthesize", 503, "usage_unavailable"),
        ]
        wait_until(lambda: _rows(django_db_blocker, tenant.id) == expected, what="every row", timeout_s=60)
        usage = client.get("/v1/health").json()["usage"]
        assert (usage["journal_writable"], usage["held_records"], usage["lost_records"]) == (True, 0, 0)
