"""Every socket ends cleanly, however its client leaves (issue 26): a client that sends a
burst of messages that each draw an error event, reads the first and closes leaves the
server to send the next error on a closed socket. That send must end the connection's work
and never its cleanup: the stream lease, the counters, the utterances' slots and rows go
back, on every dialect (native, Twilio, ElevenLabs, Cartesia), through Daphne."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from django.conf import settings
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from core.redis import sync_redis
from synthesis.stream.protocol import CLOSE_STREAM_LIMIT
from tenants.models import Tenant
from tests.support.servers import ServiceEnv, daphne_server
from tests.support.tenants import committed_tenant
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

CAP = 2  # each dialect's tenant: max_concurrent_streams
CAPPED = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0, "max_concurrent_streams": CAP}
BURSTS_PER_DIALECT = 50
MESSAGES_PER_BURST = 12
# A refused (4029) connection is retried: a lease is given back just after its socket closes,
# so the next client may come a moment too soon. A lease that leaked never comes back.
RETRY_FOR_S = 30.0


@pytest.fixture(scope="module")
def server(service_env: ServiceEnv) -> Iterator[str]:
    # A server of its own: its connection count is this module's alone.
    with daphne_server(service_env(REDIS_URL=settings.REDIS_URL)) as base_url:
        yield base_url


@dataclass(frozen=True)
class Dialect:
    name: str
    path: str
    headers: Callable[[str], dict[str, str]]
    ready: bool  # whether the server greets an authenticated socket (native: `ready`)
    bad_message: Callable[[int], dict[str, Any]]  # message n of a burst: each draws an error


_VOICE = {"mode": "id", "id": "joe"}
DIALECTS = (
    Dialect(
        "native",
        "/v1/stream",
        lambda key: {"Authorization": f"Bearer {key}"},
        True,
        lambda n: {"type": "no-such-type", "context_id": f"c{n}"},
    ),
    Dialect(
        "twilio",
        "/v1/stream",
        lambda key: {"Authorization": f"Bearer {key}"},
        True,
        # Twilio framing without the call's stream_sid: each is a refused utterance (with its row).
        lambda n: {"type": "start", "context_id": f"c{n}", "format": "twilio"},
    ),
    Dialect(
        "elevenlabs",
        "/v1/text-to-speech/joe/multi-stream-input?output_format=pcm_16000",
        lambda key: {"xi-api-key": key},
        False,
        lambda n: {"text": " ", "context_id": f"c{n}", "voice_settings": {"stability": "very"}},
    ),
    Dialect(
        "cartesia",
        "/tts/websocket",
        lambda key: {"X-API-Key": key},
        False,
        # What the Cartesia SDK sends with an output format this service does not offer.
        lambda n: {
            "context_id": f"c{n}",
            "transcript": "Hello there. ",
            "continue": False,
            "voice": _VOICE,
            "output_format": {"container": "raw", "encoding": "pcm_f32le", "sample_rate": 16000},
        },
    ),
)


def _url(base_url: str, path: str) -> str:
    return base_url.replace("http://", "ws://") + path


def _refused_for_limit(body: dict[str, Any]) -> bool:
    return "stream_limit" in (body.get("code"), body.get("error"))


async def _first(ws: ClientConnection) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.recv(), 30)
    assert isinstance(message, str)
    body: dict[str, Any] = json.loads(message)
    return body


async def _burst(base_url: str, dialect: Dialect, key: str) -> None:
    """Open (retrying while the cap is briefly full), send the burst, read one error, close."""
    deadline = asyncio.get_running_loop().time() + RETRY_FOR_S
    while not await _burst_once(base_url, dialect, key):
        assert asyncio.get_running_loop().time() < deadline, f"{dialect.name}: a stream lease leaked"
        await asyncio.sleep(0.05)


async def _burst_once(base_url: str, dialect: Dialect, key: str) -> bool:
    """One burst; False if the connection was refused for the tenant's cap."""
    async with connect(_url(base_url, dialect.path), additional_headers=dialect.headers(key)) as ws:
        try:
            if dialect.ready:
                greeting = await _first(ws)
                if _refused_for_limit(greeting):
                    return False
                assert greeting["type"] == "ready", greeting
            for n in range(MESSAGES_PER_BURST):
                await ws.send(json.dumps(dialect.bad_message(n)))
            body = await _first(ws)
        except ConnectionClosed:
            if ws.close_code == CLOSE_STREAM_LIMIT:
                return False
            raise
        if _refused_for_limit(body):
            return False
        assert body.get("type") == "error" or "error" in body, body
        return True  # leaving the block closes the socket, mid-burst


async def _bursts(base_url: str, dialect: Dialect, key: str) -> None:
    async def worker(count: int) -> None:
        for _ in range(count):
            await _burst(base_url, dialect, key)

    # As many clients at once as the cap allows.
    await asyncio.gather(*(worker(BURSTS_PER_DIALECT // CAP) for _ in range(CAP)))


async def _open_full_cap(base_url: str, dialect: Dialect, key: str) -> None:
    """CAP sockets open at once and work; one more is refused with 4029."""
    url = _url(base_url, dialect.path)
    sockets = [await connect(url, additional_headers=dialect.headers(key)) for _ in range(CAP)]
    try:
        for ws in sockets:
            if dialect.ready:
                assert (await _first(ws))["type"] == "ready"
            # Each answers a message: it is authenticated and holds its lease.
            await ws.send(json.dumps(dialect.bad_message(0)))
            body = await _first(ws)
            assert not _refused_for_limit(body), f"{dialect.name}: the cap is not whole: {body}"
        async with connect(_url(base_url, dialect.path), additional_headers=dialect.headers(key)) as extra:
            assert _refused_for_limit(await _first(extra))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(extra.recv(), 30)
            assert extra.close_code == CLOSE_STREAM_LIMIT
    finally:
        for ws in sockets:
            await ws.close()


def _connections(base_url: str) -> int:
    return int(httpx.get(f"{base_url}/v1/health", timeout=30).json()["streams"]["connections"])


def _leases(tenant: Tenant) -> int:
    return int(sync_redis().zcard(f"{settings.REDIS_KEY_PREFIX}:streams:{tenant.id}"))


@pytest.mark.django_db(transaction=True)
def test_sockets_closed_mid_burst_of_errors_give_back_every_lease_on_every_dialect(
    server: str, django_db_blocker: Any
) -> None:
    with (
        committed_tenant(django_db_blocker, "burst-native", **CAPPED) as (native, native_key),
        committed_tenant(django_db_blocker, "burst-twilio", **CAPPED) as (twilio, twilio_key),
        committed_tenant(django_db_blocker, "burst-el", **CAPPED) as (eleven, eleven_key),
        committed_tenant(django_db_blocker, "burst-cartesia", **CAPPED) as (cartesia, cartesia_key),
    ):
        tenants = (native, twilio, eleven, cartesia)
        keys = (native_key.plaintext, twilio_key.plaintext, eleven_key.plaintext, cartesia_key.plaintext)

        async def bursts() -> None:
            # Every dialect at once: 4 x 50 bursts, 8 clients at a time.
            await asyncio.gather(
                *(_bursts(server, dialect, key) for dialect, key in zip(DIALECTS, keys, strict=True))
            )

        asyncio.run(bursts())
        wait_until(lambda: _connections(server) == 0, what="no connection counted")
        wait_until(
            lambda: all(_leases(tenant) == 0 for tenant in tenants), what="no stream lease held in Redis"
        )

        async def full_caps() -> None:
            for dialect, key in zip(DIALECTS, keys, strict=True):
                await _open_full_cap(server, dialect, key)

        asyncio.run(full_caps())
        wait_until(lambda: _connections(server) == 0, what="no connection counted")
