"""A WebSocket utterance is held to its tenant's limits as it speaks, through Daphne: each
piece of its text reserves its audio against the monthly quota before it is made (on every
process, through Redis), and past the quota the utterance ends with quota_exceeded and a
usage row for what it sent, the socket staying open; the engine's fair share counts every
stream a tenant holds, WebSocket utterances as HTTP streams.

Nothing here depends on the machine's speed: the engine's queue waits as long as it must,
and admission is set so that the outcome follows from counts alone."""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from django.conf import settings
from websockets.asyncio.client import ClientConnection, connect
from websockets.sync.client import connect as sync_connect

from core.redis import sync_redis
from engines.text import Segment
from synthesis.services import text_segments
from tests.support.servers import ServiceEnv, daphne_server
from tests.support.tenants import bearer, committed_tenant
from tests.support.waiting import wait_until
from usage.models import UsageLog
from usage.quotas import quota_estimate

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

UNLIMITED = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0, "max_concurrent_streams": 0}
# One message of text, as an LLM would write it: three pieces (clauses) of a few seconds each.
SENTENCE = "This answer takes a few seconds to say, which is the point of it, and then it ends. "
# Fed to one utterance it is about three minutes of speech: three times a one-minute quota.
MESSAGES = 40
# The engine never refuses here for want of speed: a queued utterance waits its turn.
PATIENT = {"ENGINE_QUEUE_SECONDS": "300", "ENGINE_QUEUE_MAX": "64"}


def _largest_piece_estimate() -> float:
    """The most audio one piece of SENTENCE reserves: the overshoot allowed."""
    pieces = [piece for piece in SENTENCE.replace(", ", ",|").split("|") if piece.strip()]
    segments: list[list[Segment]] = [text_segments(piece, opening=True) for piece in pieces]
    return max(quota_estimate(piece, 1.0) for piece in segments)


def _ws_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://") + "/v1/stream"


def _ended(event: dict[str, Any]) -> bool:
    """An utterance's last event: its end, or the refusal of its start (an error with no
    request id: no utterance began, and the text sent after it finds no open context)."""
    return event["type"] == "audio_end" or (event["type"] == "error" and "request_id" not in event)


async def _events_until_ended(ws: ClientConnection, contexts: set[str]) -> dict[str, list[dict[str, Any]]]:
    """Every JSON event of each context, until its last (`_ended`)."""
    events: dict[str, list[dict[str, Any]]] = {context: [] for context in contexts}
    open_contexts = set(contexts)

    async def read() -> None:
        while open_contexts:
            message = await ws.recv()
            if isinstance(message, bytes):
                continue
            event = json.loads(message)
            if event.get("context_id") in open_contexts:
                events[event["context_id"]].append(event)
                if _ended(event):
                    open_contexts.discard(event["context_id"])

    await asyncio.wait_for(read(), 240)
    return events


async def _speak_past_the_quota(ws: ClientConnection, contexts: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Open each context, feed each MESSAGES sentences and end it; read what comes back."""
    for context in contexts:
        await ws.send(json.dumps({"type": "start", "context_id": context, "format": "pcm"}))
    for _ in range(MESSAGES):
        for context in contexts:
            await ws.send(json.dumps({"type": "text", "context_id": context, "text": SENTENCE}))
    for context in contexts:
        await ws.send(json.dumps({"type": "end", "context_id": context}))
    return await _events_until_ended(ws, set(contexts))


def _rows(django_db_blocker: Any, tenant_id: Any) -> list[UsageLog]:
    with django_db_blocker.unblock():
        return list(UsageLog.objects.filter(tenant_id=tenant_id))


@pytest.mark.timeout(400)
def test_an_utterance_fed_past_the_quota_ends_there_with_quota_exceeded_and_the_socket_stays_open(
    service_env: ServiceEnv, django_db_blocker: Any
) -> None:
    limits = {**UNLIMITED, "quota_minutes": 1}
    with (
        committed_tenant(django_db_blocker, "ws-quota", **limits) as (tenant, issued),
        daphne_server(service_env(**PATIENT)) as base_url,
    ):

        async def main() -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
            async with connect(_ws_url(base_url), additional_headers=bearer(issued.plaintext)) as ws:
                events = await _speak_past_the_quota(ws, ["a"])
                # The socket is still open: the next utterance is answered (spoken or refused).
                await ws.send(json.dumps({"type": "synthesize", "context_id": "b", "text": "Still here."}))
                while True:
                    after = json.loads(message) if isinstance(message := await ws.recv(), str) else {}
                    if after.get("context_id") == "b" and after["type"] in ("audio_end", "error"):
                        return events, after

        events, after = asyncio.run(main())
        kinds = [event["type"] for event in events["a"]]
        errors = [event for event in events["a"] if event["type"] == "error"]
        assert [error["code"] for error in errors] == ["quota_exceeded"], kinds
        assert kinds[-2:] == ["error", "audio_end"]  # its error, then its end
        end = events["a"][-1]
        assert not end["cancelled"]
        # Before: the whole text spoke (about 180 s) and billed against a 60 s quota.
        assert 0 < end["audio_seconds"] <= 60 + _largest_piece_estimate()
        assert after["type"] in ("audio_end", "error")
        if after["type"] == "error":
            assert after["code"] == "quota_exceeded"

        def rows_written() -> bool:
            return len(_rows(django_db_blocker, tenant.id)) == 2

        wait_until(rows_written, what="both utterances' usage rows")
        row = next(
            row for row in _rows(django_db_blocker, tenant.id) if row.request_id == errors[0]["request_id"]
        )
        assert (row.status_code, row.error_code) == (429, "quota_exceeded")
        assert row.audio_seconds == pytest.approx(end["audio_seconds"], abs=0.01)  # what it sent


@pytest.mark.timeout(500)
def test_utterances_on_several_sockets_and_processes_overshoot_the_quota_by_at_most_one_piece(
    service_env: ServiceEnv, django_db_blocker: Any
) -> None:
    limits = {**UNLIMITED, "quota_minutes": 1}
    env = service_env(REDIS_URL=settings.REDIS_URL, **PATIENT)  # the holds are shared through Redis
    with (
        committed_tenant(django_db_blocker, "ws-quota-fleet", **limits) as (tenant, issued),
        daphne_server(env) as first,
        daphne_server(env) as second,
    ):
        contexts = [f"u{n}" for n in range(4)]

        async def one_socket(base_url: str) -> dict[str, list[dict[str, Any]]]:
            async with connect(_ws_url(base_url), additional_headers=bearer(issued.plaintext)) as ws:
                return await _speak_past_the_quota(ws, contexts)

        async def main() -> list[dict[str, list[dict[str, Any]]]]:
            return await asyncio.gather(*(one_socket(url) for url in (first, second, first, second)))

        sockets = asyncio.run(main())
        utterances = [events for socket in sockets for events in socket.values()]
        codes = [[event["code"] for event in events if event["type"] == "error"] for events in utterances]
        # Every one of the 16 was stopped by the quota: as it spoke, or at its start.
        assert codes == [["quota_exceeded"]] * len(utterances)
        spoken = sum(events[-1].get("audio_seconds", 0.0) for events in utterances)
        # Before: each utterance spoke its whole text (about 16 x 180 s against 60 s).
        assert 0 < spoken <= 60 + _largest_piece_estimate()

        def rows_written() -> bool:
            return len(_rows(django_db_blocker, tenant.id)) == len(utterances)

        wait_until(rows_written, what="every utterance's usage row")
        billed = sum(row.audio_seconds for row in _rows(django_db_blocker, tenant.id))
        assert billed == pytest.approx(spoken, abs=0.01 * len(utterances))


def _engine(base_url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{base_url}/v1/health", timeout=30).json()["engine"])


def _first_audio_at(row: UsageLog) -> datetime:
    assert row.latency_ms is not None, f"{row.request_id} sent no audio"
    return row.created_at + timedelta(milliseconds=row.latency_ms)


@pytest.mark.timeout(300)
def test_a_tenant_holding_the_engine_with_utterances_cannot_have_another_tenants_request_refused(
    service_env: ServiceEnv, django_db_blocker: Any
) -> None:
    # Decided by counts alone: the engine holds two streams (its measured speed never binds),
    # the busy tenant may hold or await four, the queue holds two and waits as long as needed,
    # and an utterance waiting for more text keeps its slot.
    env = service_env(
        ENGINE_MAX_ACTIVE_JOBS="2",
        ENGINE_MAX_JOBS_PER_TENANT="4",
        ENGINE_QUEUE_MAX="2",
        ENGINE_QUEUE_SECONDS="300",
        WS_UTTERANCE_IDLE_SLOT_SECONDS="300",
    )
    with (
        committed_tenant(django_db_blocker, "busy", **UNLIMITED) as (busy, busy_key),
        committed_tenant(django_db_blocker, "other", **UNLIMITED) as (other, other_key),
        daphne_server(env) as base_url,
        sync_connect(_ws_url(base_url), additional_headers=bearer(busy_key.plaintext)) as ws,
    ):
        events: list[dict[str, Any]] = []

        def until(context: str, kind: str) -> dict[str, Any]:
            for event in events:
                if (event.get("context_id"), event["type"]) == (context, kind):
                    return event
            for _ in range(100_000):
                message = ws.recv(timeout=120)
                if isinstance(message, str):
                    event = dict(json.loads(message))
                    events.append(event)
                    if (event.get("context_id"), event["type"]) == (context, kind):
                        return event
            raise AssertionError(f"no {kind} for {context}")

        # The busy tenant holds the whole engine: two utterances speaking and waiting for more...
        for context in ("a1", "a2"):
            ws.send(json.dumps({"type": "start", "context_id": context, "format": "pcm"}))
            ws.send(
                json.dumps({"type": "text", "context_id": context, "text": "The first part of a reply. "})
            )
            until(context, "audio_start")
        wait_until(lambda: _engine(base_url)["active_jobs"] == 2, what="both utterances to hold a slot")
        # ...and two more waiting for the engine fill its queue.
        for context in ("a3", "a4"):
            ws.send(json.dumps({"type": "synthesize", "context_id": context, "text": "Then the rest of it."}))
        wait_until(lambda: _engine(base_url)["queued_jobs"] == 2, what="the extra utterances to queue")

        answer: dict[str, httpx.Response] = {}

        def other_request() -> None:
            answer["response"] = httpx.post(
                f"{base_url}/v1/synthesize",
                json={"text": "The other tenant asks a question of its own.", "format": "pcm"},
                headers=bearer(other_key.plaintext),
                timeout=240,
            )

        asker = threading.Thread(target=other_request)
        asker.start()
        # The other tenant's request takes the place of the busy tenant's last in the queue.
        refused = until("a4", "error")
        assert refused["code"] == "engine_overloaded"
        until("a4", "audio_end")
        assert _engine(base_url)["queued_jobs"] == 2  # a3 and the other tenant's request
        # A slot comes free: the other tenant holds none, the busy one still holds one.
        ws.send(json.dumps({"type": "cancel", "context_id": "a1"}))
        asker.join(timeout=240)
        assert answer["response"].status_code == 200, answer["response"].text
        assert not until("a3", "audio_end")["cancelled"]  # then the busy tenant's next
        ws.send(json.dumps({"type": "cancel", "context_id": "a2"}))
        until("a2", "audio_end")

        def rows() -> list[UsageLog]:
            with django_db_blocker.unblock():
                return list(UsageLog.objects.filter(tenant__in=[busy, other]))

        wait_until(lambda: len(rows()) == 5, what="every request's usage row")
        by_id = {row.request_id: row for row in rows()}
        theirs = next(row for row in rows() if row.tenant_id == other.id)
        a3 = by_id[until("a3", "audio_end")["request_id"]]
        assert (theirs.status_code, a3.status_code) == (200, 200)
        # Granted before the busy tenant's utterance that had queued before it.
        assert _first_audio_at(theirs) < _first_audio_at(a3)


@pytest.mark.timeout(300)
def test_a_tenant_holding_its_fleet_share_on_one_process_cannot_take_another_processs_engine(
    service_env: ServiceEnv, django_db_blocker: Any
) -> None:
    # Decided by counts alone. Each process's engine holds two streams, and a tenant may hold
    # two on each engine but two in the whole fleet. Counted per process only, the busy
    # tenant's utterances would fill the second engine too, and the other tenant's request
    # would wait in its queue behind them.
    env = service_env(
        REDIS_URL=settings.REDIS_URL,
        ENGINE_MAX_ACTIVE_JOBS="2",
        ENGINE_MAX_JOBS_PER_TENANT="2",
        ENGINE_FLEET_JOBS_PER_TENANT="2",
        ENGINE_QUEUE_SECONDS="300",
        WS_UTTERANCE_IDLE_SLOT_SECONDS="300",
    )
    with (
        committed_tenant(django_db_blocker, "busy", **UNLIMITED) as (busy, busy_key),
        committed_tenant(django_db_blocker, "other", **UNLIMITED) as (_other, other_key),
        daphne_server(env) as first,
        daphne_server(env) as second,
        sync_connect(_ws_url(first), additional_headers=bearer(busy_key.plaintext)) as on_first,
        sync_connect(_ws_url(second), additional_headers=bearer(busy_key.plaintext)) as on_second,
    ):

        def until(ws: Any, context: str, kinds: set[str]) -> dict[str, Any]:
            for _ in range(100_000):
                message = ws.recv(timeout=120)
                if isinstance(message, str):
                    event = dict(json.loads(message))
                    if event.get("context_id") == context and event["type"] in kinds:
                        return event
            raise AssertionError(f"no {kinds} for {context}")

        # Two utterances speaking and waiting for more text hold the first engine.
        for context in ("a1", "a2"):
            on_first.send(json.dumps({"type": "start", "context_id": context, "format": "pcm"}))
            on_first.send(
                json.dumps({"type": "text", "context_id": context, "text": "The first part of a reply. "})
            )
            until(on_first, context, {"audio_start"})
        share_key = f"{settings.REDIS_KEY_PREFIX}:engine_share:{busy.id.hex}"

        def published() -> int:
            fields: dict[bytes, bytes] = sync_redis().hgetall(share_key)  # type: ignore[assignment]
            return sum(int(value.split(b";")[0]) for value in fields.values())

        wait_until(lambda: published() == 2, what="the first process to publish the busy tenant's two slots")
        # On the second process the same tenant is at its fleet share already.
        for context in ("b1", "b2"):
            on_second.send(
                json.dumps({"type": "synthesize", "context_id": context, "text": "More, elsewhere."})
            )
            refused = until(on_second, context, {"error", "audio_start"})
            assert (refused["type"], refused.get("code")) == ("error", "engine_share_exceeded"), refused
        engine = _engine(second)
        assert (engine["active_jobs"], engine["fleet_jobs_per_tenant"]) == (0, 2)
        answer = httpx.post(
            f"{second}/v1/synthesize",
            json={"text": "The other tenant asks a question of its own.", "format": "pcm"},
            headers=bearer(other_key.plaintext),
            timeout=240,
        )
        assert answer.status_code == 200, answer.text
        assert _engine(second)["jobs_queued"] == 0  # granted at once: never behind the busy tenant
        for context in ("a1", "a2"):
            on_first.send(json.dumps({"type": "cancel", "context_id": context}))
            until(on_first, context, {"audio_end"})
        # Given back: the fleet forgets the slots, and the second process grants the tenant again.
        wait_until(lambda: published() == 0, what="the first process to publish its slots given back")
        on_second.send(json.dumps({"type": "synthesize", "context_id": "b3", "text": "Now it fits."}))
        assert not until(on_second, "b3", {"audio_end"})["cancelled"]
