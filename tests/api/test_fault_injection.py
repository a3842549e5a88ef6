"""Fault injection on the HTTP synthesis entry points: a plain exception (a bug, not a
refusal) raised at each stage of a request. Whatever the stage, the request ends with its
error (a JSON error, or a body cut short once audio has gone out), exactly one usage row,
its stream lease released and the counters back at zero. The WebSocket's own matrix is in
tests/api/test_stream.py.

Requests run in-process (Django's AsyncClient against the real views, Piper, Postgres,
Redis), so that the stages can be patched; the same views serve Daphne.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from typing import Any

import pytest
from django.db import OperationalError
from django.test import AsyncClient

from engines import loaded_engine
from synthesis.stream.stats import stream_stats
from tenants.models import Tenant
from tests.support.tenants import TenantFactory
from tests.support.waiting import async_wait_until
from usage.models import UsageLog
from usage.recorder import usage_flush

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

TEXT = "The first sentence, with a clause. The second sentence goes on a while. And a third."

# (route, body): every HTTP door to the engine.
ENTRY_POINTS: dict[str, tuple[str, dict[str, Any]]] = {
    "synthesize streamed": ("/v1/synthesize", {"text": TEXT, "format": "pcm", "streaming": True}),
    "synthesize whole": ("/v1/synthesize", {"text": TEXT, "format": "wav"}),
    "synthesize-url": ("/v1/synthesize-url", {"text": TEXT, "format": "mp3"}),
    "twiml/play": ("/v1/twiml/play", {"text": TEXT, "format": "mulaw"}),
    "audio/speech": ("/v1/audio/speech", {"model": "tts-1", "input": TEXT, "voice": "alloy"}),
}


class Injected(RuntimeError):
    pass


def _raise_on_call(owner: Any, name: str, after: int) -> Callable[..., Any]:
    original = getattr(owner, name)
    calls = {"n": 0}

    def patched(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > after:
            raise Injected(f"injected into {owner.__name__}.{name}")
        return original(*args, **kwargs)

    return patched


def _engine_failing_after_first_chunk(owner: Any) -> Callable[..., Any]:
    original = owner.stream

    async def stream(self: Any, job: Any) -> AsyncIterator[Any]:
        inner = original(self, job)
        try:
            yield await anext(inner)
            raise Injected("injected into the engine mid-stream")
        finally:
            await inner.aclose()

    return stream


def _patch(monkeypatch: pytest.MonkeyPatch, stage: str) -> None:
    piper = importlib.import_module("engines.piper").PiperEngine
    audio = importlib.import_module("synthesis.audio").AudioEncoder
    services = importlib.import_module("synthesis.services").SynthesisSetup
    if stage == "parse":
        # Both imported before either is patched: openai_api binds views' function at import.
        modules = [importlib.import_module(name) for name in ("synthesis.views", "synthesis.openai_api")]
        for module in modules:
            monkeypatch.setattr(module, "json_object_body", _raise_on_call_function)
    elif stage == "plan":
        monkeypatch.setattr(services, "plan_segments", _raise_on_call(services, "plan_segments", 0))
    elif stage == "database":
        monkeypatch.setattr(services, "plan_segments", _raise_database_error)
    elif stage == "engine before the first chunk":
        monkeypatch.setattr(piper, "stream", _raise_on_call(piper, "stream", 0))
    elif stage == "engine mid-stream":
        monkeypatch.setattr(piper, "stream", _engine_failing_after_first_chunk(piper))
    elif stage == "encoder":
        monkeypatch.setattr(audio, "push", _raise_on_call(audio, "push", 1))
    elif stage == "encoder at the end":
        monkeypatch.setattr(audio, "finish", _raise_on_call(audio, "finish", 0))
    else:
        raise AssertionError(stage)


def _raise_on_call_function(*args: Any, **kwargs: Any) -> Any:
    raise Injected("injected into parsing")


def _raise_database_error(*args: Any, **kwargs: Any) -> Any:
    raise OperationalError("injected: the database went away")


STAGES = [
    "parse",
    "plan",
    "database",
    "engine before the first chunk",
    "engine mid-stream",
    "encoder",
    "encoder at the end",
]


async def _answer(client: AsyncClient, route: str, body: dict[str, Any], key: str) -> tuple[int, bytes, Any]:
    """Status, the body as far as it came, and the response; a body cut short by an error
    ends early (the server closes it), which a client sees as a truncated body."""
    response = await client.post(
        route, data=body, content_type="application/json", headers={"Authorization": f"Bearer {key}"}
    )
    if not getattr(response, "streaming", False):
        return response.status_code, response.content, response
    received = b""
    try:
        async for chunk in response.streaming_content:  # type: ignore[attr-defined]
            received += chunk
    except Injected:
        pass  # the server's error ended the body mid-stream
    return response.status_code, received, response


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
def test_an_exception_at_any_stage_ends_the_request_with_its_error_one_row_and_nothing_held(
    make_tenant: TenantFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    entry_point: str,
    stage: str,
) -> None:
    tenant, issued = make_tenant(
        rate_limit_minute=0, rate_limit_hour=0, quota_minutes=0, max_concurrent_streams=1
    )
    route, body = ENTRY_POINTS[entry_point]
    client = AsyncClient(raise_request_exception=False)  # a bug answers 500, as in production

    async def main() -> None:
        _patch(monkeypatch, stage)
        status, content, response = await _answer(client, route, body, issued.plaintext)
        monkeypatch.undo()
        request_id = response["X-Request-ID"]
        assert request_id
        if status != 200:
            error = response.json()["error"]
            if stage == "database":  # an outage is a 503 to retry, not a bug
                assert (status, error["code"]) == (503, "database_unavailable"), error
            else:
                assert status >= 500, (status, content)
                assert error["code"] in {"internal_error", "engine_error"}, error
            if route == "/v1/audio/speech":  # OpenAI's error shape, whatever failed
                assert set(error) == {"message", "type", "param", "code"}, error
        else:  # the headers went out with the first audio; the error cut the body short
            assert stage in {"engine mid-stream", "encoder", "encoder at the end"}, stage
            assert response["Content-Type"].startswith(("audio/", "text/event-stream"))
        # Nothing is held: no stream counted, no engine job, and the tenant's only stream
        # slot admits the next streamed request at once.
        assert stream_stats.http_streams == 0
        engine = loaded_engine()
        assert engine is None or engine.info()["active_jobs"] == 0
        again, _content, _response = await _answer(
            client, "/v1/synthesize", {"text": "Next.", "streaming": True}, issued.plaintext
        )
        assert again == 200

    caplog.set_level(logging.ERROR)
    asyncio.run(main())
    # A fault leaves a trace with its traceback, whichever door it came through; an outage
    # is a 503 to retry, not a fault.
    faults = [
        record for record in caplog.records if record.exc_info and "injected" in str(record.exc_info[1])
    ]
    assert faults if stage != "database" else not faults, [r.getMessage() for r in caplog.records]
    usage_flush()
    first = list(UsageLog.objects.filter(tenant=tenant).exclude(input_chars=len("Next.")))
    assert len(first) == 1, first
    assert first[0].status_code >= 500 or first[0].error_code is not None, first[0].__dict__
    assert Tenant.objects.filter(pk=tenant.pk).exists()


@pytest.mark.parametrize("entry_point", ["synthesize streamed", "audio/speech"])
def test_a_client_gone_mid_body_ends_the_request_with_one_row_and_nothing_held(
    make_tenant: TenantFactory, entry_point: str
) -> None:
    """The send stage: the client stops reading after the first audio and goes away."""
    tenant, issued = make_tenant(
        rate_limit_minute=0, rate_limit_hour=0, quota_minutes=0, max_concurrent_streams=1
    )
    route, body = ENTRY_POINTS[entry_point]
    client = AsyncClient(raise_request_exception=False)

    async def main() -> None:
        response = await client.post(
            route,
            data={**body, "input": TEXT * 10} if "input" in body else {**body, "text": TEXT * 10},
            content_type="application/json",
            headers={"Authorization": f"Bearer {issued.plaintext}"},
        )
        assert response.status_code == 200
        first_audio = asyncio.Event()

        async def read() -> None:
            async for _chunk in response.streaming_content:  # type: ignore[attr-defined]
                first_audio.set()

        # What the ASGI handler does when the client disconnects: cancel the task sending the body.
        reader = asyncio.create_task(read())
        await asyncio.wait_for(first_audio.wait(), 30)
        reader.cancel()
        with suppress(asyncio.CancelledError):
            await reader
        assert stream_stats.http_streams == 0
        engine = loaded_engine()
        await async_wait_until(
            lambda: engine is None or engine.info()["active_jobs"] == 0, what="the engine job to stop"
        )
        again, _content, _response = await _answer(
            client, "/v1/synthesize", {"text": "Next.", "streaming": True}, issued.plaintext
        )
        assert again == 200

    asyncio.run(main())
    usage_flush()
    [row] = UsageLog.objects.filter(tenant=tenant).exclude(input_chars=len("Next."))
    assert row.error_code == "client_disconnected"
    assert row.audio_bytes > 0
