"""WS /v1/stream through Daphne with a real WebSocket client (the `websockets` package):
authentication, revocation from another process, backpressure, Twilio frames."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from django.conf import settings
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from synthesis.stream.protocol import MAX_FRAME_AUDIO_BYTES, parse_labelled_frame
from tests.support.servers import ServiceEnv, daphne_server
from tests.support.tenants import committed_tenant
from tests.support.waiting import wait_until
from usage.models import UsageLog

pytestmark = pytest.mark.slow

LONG = " ".join(f"Part {n} of a long answer that nobody is listening to yet." for n in range(40))
UNLIMITED = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0, "max_concurrent_streams": 0}


@pytest.fixture(scope="module")
def stream_server(service_env: ServiceEnv) -> Iterator[str]:
    # The tests' own channel layer (and this run's key prefix): servers and tests share it.
    with daphne_server(service_env(REDIS_URL=settings.REDIS_URL)) as base_url:
        yield base_url


def _ws_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://") + "/v1/stream"


async def _event(ws: ClientConnection, kind: str, wait_s: float = 30) -> dict[str, Any]:
    async def wait() -> dict[str, Any]:
        while True:
            message = await ws.recv()
            if isinstance(message, str):
                event: dict[str, Any] = json.loads(message)
                if event.get("type") == kind:
                    return event

    return await asyncio.wait_for(wait(), wait_s)


@pytest.mark.django_db(transaction=True)
def test_header_and_first_message_auth_through_daphne(stream_server: str, django_db_blocker: Any) -> None:
    with committed_tenant(django_db_blocker, "ws-auth", **UNLIMITED) as (_tenant, issued):

        async def main() -> None:
            headers = {"Authorization": f"Bearer {issued.plaintext}"}
            async with connect(_ws_url(stream_server), additional_headers=headers) as ws:
                await _event(ws, "ready")
                await ws.send(json.dumps({"type": "synthesize", "context_id": "h", "text": "By header."}))
                frame = await ws.recv()
                while isinstance(frame, str):  # audio_start first
                    frame = await ws.recv()
                assert parse_labelled_frame(frame)[0] == "h"
                await _event(ws, "audio_end")
            async with connect(_ws_url(stream_server)) as ws:
                await ws.send(json.dumps({"type": "auth", "api_key": issued.plaintext}))
                await _event(ws, "ready")
            async with connect(
                _ws_url(stream_server), additional_headers={"Authorization": "Bearer nope"}
            ) as ws:
                assert (await _event(ws, "error"))["code"] == "invalid_api_key"
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.recv()
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 4001

        asyncio.run(main())


@pytest.mark.django_db(transaction=True)
def test_revoking_the_key_in_another_process_closes_a_live_stream_within_5_s(
    stream_server: str, django_db_blocker: Any
) -> None:
    from tenants.services import api_key_revoke

    with committed_tenant(django_db_blocker, "ws-revoke", **UNLIMITED) as (_tenant, issued):

        async def main() -> None:
            headers = {"Authorization": f"Bearer {issued.plaintext}"}
            async with connect(_ws_url(stream_server), additional_headers=headers) as ws:
                await _event(ws, "ready")
                await ws.send(json.dumps({"type": "synthesize", "context_id": "live", "text": LONG}))
                await _event(ws, "audio_start")
                # This test process is the other process: the revocation reaches the
                # server only through the Redis channel layer.
                with django_db_blocker.unblock():
                    await asyncio.to_thread(api_key_revoke, api_key=issued.api_key)
                error = await _event(ws, "error")
                assert error["code"] == "revoked_api_key"

                async def drain() -> None:
                    while True:
                        await asyncio.wait_for(ws.recv(), 5)

                with pytest.raises(ConnectionClosed) as closed:
                    await drain()
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 4003

        asyncio.run(main())


@pytest.mark.django_db(transaction=True)
def test_a_slow_reader_pauses_generation_and_loses_nothing(
    stream_server: str, django_db_blocker: Any
) -> None:
    with committed_tenant(django_db_blocker, "ws-slow", **UNLIMITED) as (_tenant, issued):

        async def main() -> None:
            # A client that stops reading: no recv() calls, and the client library
            # stops reading the socket once one message waits (max_queue=1). The
            # kernel's buffers fill (a few MB), then the server must hold back.
            headers = {"Authorization": f"Bearer {issued.plaintext}"}
            async with connect(
                _ws_url(stream_server),
                additional_headers=headers,
                max_queue=1,
                max_size=None,
                ping_interval=None,  # a client that reads nothing would miss its own pongs
            ) as ws:
                await _event(ws, "ready")
                body = {
                    "type": "synthesize",
                    "context_id": "slow",
                    "text": LONG,
                    "format": "pcm",
                    "sample_rate": 48000,
                }
                await ws.send(json.dumps(body))
                async with httpx.AsyncClient(base_url=stream_server) as http:
                    deadline = time.monotonic() + 60
                    while (await http.get("/v1/health")).json()["streams"]["paused_for_slow_reader"] < 1:
                        assert time.monotonic() < deadline, "the server never paused for the slow reader"
                        await asyncio.sleep(0.25)
                    paused = (await http.get("/v1/health")).json()
                    assert paused["engine"]["active_jobs"] == 1  # waiting, not finished
                # Now read everything: all of it arrives, and the totals agree.
                received = 0
                while True:
                    message = await asyncio.wait_for(ws.recv(), 60)
                    if isinstance(message, bytes):
                        received += len(parse_labelled_frame(message)[1])
                    elif json.loads(message)["type"] == "audio_end":
                        assert json.loads(message)["audio_bytes"] == received
                        break
                assert received > 5_000_000  # more than the socket buffers could ever hold

        asyncio.run(main())


# What once killed an utterance or a connection silently and left the tenant's stream slot held.
NESTED_SSML = f"<speak>{'<p>' * 300}Deep inside.{'</p>' * 300}</speak>"
BAD_MESSAGES = [
    ("[" * 30_000, "nesting_too_deep"),
    (json.dumps({"type": "synthesize", "context_id": "ssml", "text": NESTED_SSML}), "invalid_ssml"),
]
# One clause, no commas: the engine makes it as one chunk, about 2 MB of 48 kHz PCM at half speed,
# more than Daphne sends in one message (1 MiB).
ONE_BIG_CHUNK = (
    "This one sentence runs on without a single pause so that the engine has to make all of it "
    "as one large chunk of audio and it keeps going a little longer still until the end"
)


async def _holds_full_cap(base_url: str, key: str, cap: int) -> bool:
    headers = {"Authorization": f"Bearer {key}"}
    sockets = [await connect(_ws_url(base_url), additional_headers=headers) for _ in range(cap)]
    try:
        firsts = [json.loads(await asyncio.wait_for(ws.recv(), 30)) for ws in sockets]
        return all(first["type"] == "ready" for first in firsts)
    finally:
        for ws in sockets:
            await ws.close()


@pytest.mark.django_db(transaction=True)
def test_bad_messages_and_oversized_chunks_end_cleanly_and_free_the_slot_on_every_process(
    stream_server: str, service_env: ServiceEnv, django_db_blocker: Any
) -> None:
    cap = 2
    limits = {**UNLIMITED, "max_concurrent_streams": cap}
    with (
        committed_tenant(django_db_blocker, "ws-leaks", **limits) as (tenant, issued),
        daphne_server(service_env(REDIS_URL=settings.REDIS_URL)) as other_server,
    ):
        headers = {"Authorization": f"Bearer {issued.plaintext}"}

        async def reproduce() -> tuple[int, list[int]]:
            for raw, code in BAD_MESSAGES:
                async with connect(_ws_url(stream_server), additional_headers=headers) as ws:
                    await _event(ws, "ready")
                    await ws.send(raw)
                    assert (await _event(ws, "error"))["code"] == code
            async with connect(_ws_url(stream_server), additional_headers=headers, max_size=None) as ws:
                await _event(ws, "ready")
                body = {"type": "synthesize", "context_id": "big", "text": ONE_BIG_CHUNK}
                await ws.send(json.dumps({**body, "format": "pcm", "sample_rate": 48000, "speed": 0.5}))
                frames: list[int] = []
                while True:
                    message = await asyncio.wait_for(ws.recv(), 60)
                    if isinstance(message, bytes):
                        frames.append(len(parse_labelled_frame(message)[1]))
                        continue
                    event = json.loads(message)
                    assert event["type"] != "error", event
                    if event["type"] == "audio_end":
                        return event["audio_bytes"], frames

        audio_bytes, frames = asyncio.run(reproduce())
        assert sum(frames) == audio_bytes > 1024 * 1024
        assert max(frames) <= MAX_FRAME_AUDIO_BYTES

        # Nothing is held: the counters are back and the tenant opens its whole cap at once,
        # on this process and on another (the leases live in the shared Redis).
        def idle(base_url: str) -> bool:
            streams = httpx.get(f"{base_url}/v1/health").json()["streams"]
            return bool(streams["connections"] == streams["utterances_active"] == 0)

        for base_url in (stream_server, other_server):
            # A server learns of a close just after the client does: once both servers have
            # run their disconnects (this checks the one before, too), every slot is free.
            wait_until(lambda: idle(stream_server) and idle(other_server), what="counters at 0")
            assert asyncio.run(_holds_full_cap(base_url, issued.plaintext, cap)), base_url

        def rows() -> dict[str, tuple[int, str | None, int]]:
            with django_db_blocker.unblock():
                found = UsageLog.objects.filter(tenant=tenant)
                return {row.request_id: (row.status_code, row.error_code, row.audio_bytes) for row in found}

        wait_until(lambda: len(rows()) == 2, what="one usage row per utterance")
        assert sorted(rows().values()) == [(200, None, audio_bytes), (400, "invalid_ssml", 0)]
