"""Admission by real-time capacity through Daphne (engines/capacity.py): past what the
engine can keep real-time a stream waits in the queue and starts when a stream ends; past
the queue it gets 503 engine_overloaded with a Retry-After, a usage row and its request
id; a WebSocket utterance holds one slot across its pieces; the queue is on /metrics.

The headroom is set so small that the engine holds one stream at a time whatever the
machine's speed (an idle engine always takes one): nothing here depends on timing."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.support.servers import ServiceEnv, daphne_server
from tests.support.tenants import bearer, committed_tenant
from tests.support.waiting import wait_until
from usage.models import UsageLog

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

UNLIMITED = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0, "max_concurrent_streams": 0}
METRICS_TOKEN = "admission-scrape-token"
LONG = " ".join(f"Sentence number {n} of an answer that keeps going for a long while." for n in range(40))
ONE_AT_A_TIME = {
    "ENGINE_ADMISSION": "realtime",
    "ENGINE_REALTIME_HEADROOM": "0",  # an idle engine still takes one
    "ENGINE_QUEUE_MAX": "1",
    "ENGINE_QUEUE_SECONDS": "120",
    "METRICS_TOKEN": METRICS_TOKEN,
}


def gauge(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics", headers=bearer(METRICS_TOKEN), timeout=30).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} is not on /metrics"
    return float(match.group(1))


def engine_jobs(base_url: str) -> int:
    """The streams the server's engine holds now (its demand)."""
    return int(httpx.get(f"{base_url}/v1/health", timeout=30).json()["engine"]["active_jobs"])


def next_event(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """The next JSON event of `kind` on the socket (audio frames and other events skipped)."""
    for _ in range(10_000):
        message = ws.recv(timeout=60)
        if isinstance(message, str) and json.loads(message)["type"] == kind:
            return dict(json.loads(message))
    raise AssertionError(f"no {kind} event")


@contextmanager
def open_stream(base_url: str, key: str, text: str = LONG) -> Iterator[httpx.Response]:
    with (
        httpx.Client(base_url=base_url, timeout=120) as client,
        client.stream(
            "POST", "/v1/synthesize", json={"text": text, "streaming": True}, headers=bearer(key)
        ) as response,
    ):
        yield response


@pytest.mark.timeout(300)
def test_past_real_time_capacity_a_stream_queues_then_starts_and_past_the_queue_it_is_refused(
    service_env: ServiceEnv, django_db_blocker: Any
) -> None:
    with (
        committed_tenant(django_db_blocker, "queue", **UNLIMITED) as (tenant, issued),
        daphne_server(service_env(**ONE_AT_A_TIME)) as base_url,
    ):
        queued_result: dict[str, Any] = {}

        def queued_stream() -> None:
            with open_stream(base_url, issued.plaintext, "The one who waited gets to speak now.") as answer:
                queued_result["status"] = answer.status_code
                queued_result["bytes"] = len(answer.read())

        with open_stream(base_url, issued.plaintext) as first:
            assert first.status_code == 200
            waiter = threading.Thread(target=queued_stream)
            waiter.start()
            wait_until(lambda: gauge(base_url, "cwt_engine_queue_depth") == 1, what="the second to queue")
            assert "status" not in queued_result  # it waits: no answer before the first ends

            refused = httpx.post(
                f"{base_url}/v1/synthesize", json={"text": "Hello there."}, headers=bearer(issued.plaintext)
            )
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "engine_overloaded"
            assert int(refused.headers["Retry-After"]) >= 1
            assert refused.headers["X-Request-ID"]
            refused_id = refused.headers["X-Request-ID"]
        # The first stream is closed by its client: the queued one gets its slot and speaks.
        waiter.join(timeout=120)
        assert queued_result["status"] == 200
        assert queued_result["bytes"] > 0

        wait_until(
            lambda: engine_jobs(base_url) == 0,
            what="every slot to be given back",
        )
        health = httpx.get(f"{base_url}/v1/health", timeout=30).json()["engine"]
        assert health["queued_jobs"] == 0
        assert health["jobs_queued"] == 1
        assert health["jobs_refused"] == 1
        assert gauge(base_url, "cwt_engine_refused_total") == 1
        assert gauge(base_url, "cwt_engine_capacity_audio_seconds_per_second") > 0

        def refused_row() -> UsageLog | None:
            with django_db_blocker.unblock():
                return UsageLog.objects.filter(tenant=tenant, request_id=refused_id).first()

        wait_until(refused_row, what="the refused request's usage row")
        row = refused_row()
        assert row is not None
        assert (row.status_code, row.error_code) == (503, "engine_overloaded")


@pytest.mark.timeout(300)
def test_a_websocket_utterance_holds_one_slot_across_its_pieces_and_gives_it_back(
    service_env: ServiceEnv, django_db_blocker: Any
) -> None:
    with (
        committed_tenant(django_db_blocker, "pieces", **UNLIMITED) as (_tenant, issued),
        daphne_server(
            service_env(**{**ONE_AT_A_TIME, "ENGINE_QUEUE_MAX": "0", "WS_UTTERANCE_IDLE_SLOT_SECONDS": "120"})
        ) as base_url,
        connect(
            f"{base_url.replace('http', 'ws')}/v1/stream", additional_headers=bearer(issued.plaintext)
        ) as ws,
    ):
        ws.send(json.dumps({"type": "start", "context_id": "a", "format": "pcm"}))
        ws.send(json.dumps({"type": "text", "context_id": "a", "text": "The first piece of a reply. "}))
        next_event(ws, "audio_start")
        # Between pieces the utterance keeps its slot: another request finds the engine full.
        refused = httpx.post(
            f"{base_url}/v1/synthesize", json={"text": "Hello there."}, headers=bearer(issued.plaintext)
        )
        assert refused.json()["error"]["code"] == "engine_overloaded"
        ws.send(json.dumps({"type": "text", "context_id": "a", "text": "And the second piece of it."}))
        ws.send(json.dumps({"type": "end", "context_id": "a"}))
        done = next_event(ws, "audio_end")
        assert done["context_id"] == "a"
        assert not done["cancelled"]
        assert done["audio_bytes"] > 0
        wait_until(
            lambda: engine_jobs(base_url) == 0,
            what="the utterance's slot to be given back",
        )
        answer = httpx.post(
            f"{base_url}/v1/synthesize", json={"text": "Hello there."}, headers=bearer(issued.plaintext)
        )
        assert answer.status_code == 200


@pytest.mark.timeout(300)
def test_an_utterance_waiting_long_for_more_text_gives_its_slot_back_and_takes_one_again(
    service_env: ServiceEnv, django_db_blocker: Any
) -> None:
    env = {**ONE_AT_A_TIME, "ENGINE_QUEUE_MAX": "0", "WS_UTTERANCE_IDLE_SLOT_SECONDS": "0.5"}
    with (
        committed_tenant(django_db_blocker, "quiet", **UNLIMITED) as (_tenant, issued),
        daphne_server(service_env(**env)) as base_url,
        connect(
            f"{base_url.replace('http', 'ws')}/v1/stream", additional_headers=bearer(issued.plaintext)
        ) as ws,
    ):
        ws.send(json.dumps({"type": "start", "context_id": "a", "format": "pcm"}))
        ws.send(json.dumps({"type": "text", "context_id": "a", "text": "The model said this much. "}))
        next_event(ws, "audio_start")
        # The LLM went quiet: the utterance stays open, its engine slot goes back.
        wait_until(lambda: engine_jobs(base_url) == 0, what="the quiet utterance's slot to be given back")
        answer = httpx.post(
            f"{base_url}/v1/synthesize", json={"text": "Hello there."}, headers=bearer(issued.plaintext)
        )
        assert answer.status_code == 200
        ws.send(json.dumps({"type": "text", "context_id": "a", "text": "Then it went on."}))
        ws.send(json.dumps({"type": "end", "context_id": "a"}))
        done = next_event(ws, "audio_end")
        assert not done["cancelled"]
        assert done["audio_bytes"] > 0
        wait_until(lambda: engine_jobs(base_url) == 0, what="the slot to be given back at the end")
