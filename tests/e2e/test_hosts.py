"""ALLOWED_HOSTS holds on every route of a real Daphne, the API and its sockets included, and
the service's own origin comes from PUBLIC_BASE_URL, never from the request's Host (whoever
sends a request chooses both its Host and its Origin: a page on a rebinding domain does)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tenants.services import IssuedKey
from tests.support.servers import ServiceEnv, daphne_server
from tests.support.tenants import bearer, committed_tenant

pytestmark = [pytest.mark.slow, pytest.mark.django_db]

UNLIMITED = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0, "max_concurrent_streams": 0}
EVIL = "evil.example"
HTTP_ROUTES = [
    ("GET", "/v1/health"),
    ("GET", "/v1/tenant"),
    ("POST", "/v1/synthesize"),
    ("POST", "/v1/audio/speech"),
    ("POST", "/v1/text-to-speech/joe"),
    ("GET", "/v1/openapi.json"),
    ("GET", "/playground"),
    ("GET", "/admin/login/"),
    ("GET", "/metrics"),
]
WS_ROUTES = ["/v1/stream", "/v1/text-to-speech/joe/stream-input", "/tts/websocket", "/v1/tts/websocket"]


@pytest.fixture(scope="module")
def issued(django_db_blocker: Any, test_database_url: str) -> Iterator[IssuedKey]:
    # No allowed origins: no browser page may use this tenant's key.
    with committed_tenant(django_db_blocker, "hosts", **UNLIMITED) as (_tenant, key):
        yield key


@pytest.fixture(scope="module")
def base_url(service_env: ServiceEnv, issued: IssuedKey) -> Iterator[str]:
    with daphne_server(service_env()) as url:
        yield url


def _request(base_url: str, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    body = {"text": "Hello.", "input": "Hello.", "voice": "joe", "format": "pcm"}
    return httpx.request(
        method, f"{base_url}{path}", headers=headers, json=body if method == "POST" else None, timeout=60
    )


def _assert_invalid_host(response: httpx.Response) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_host"
    assert response.headers["X-Request-ID"] == error["request_id"]


@pytest.mark.parametrize(("method", "path"), HTTP_ROUTES)
def test_a_request_for_a_host_not_in_allowed_hosts_is_400_invalid_host_on_every_route(
    base_url: str, issued: IssuedKey, method: str, path: str
) -> None:
    for host in (EVIL, f"{EVIL}:{urlsplit(base_url).port}", "127.0.0.1.evil.example"):
        _assert_invalid_host(_request(base_url, method, path, {"Host": host, **bearer(issued.plaintext)}))


def test_an_allowed_host_on_any_port_is_served(base_url: str, issued: IssuedKey) -> None:
    for host in ("localhost:1", "127.0.0.1"):
        assert (
            _request(base_url, "GET", "/v1/tenant", {"Host": host, **bearer(issued.plaintext)}).status_code
            == 200
        )


def test_an_origin_naming_the_requests_own_host_is_no_exemption(base_url: str, issued: IssuedKey) -> None:
    port = urlsplit(base_url).port
    key = bearer(issued.plaintext)
    # A rebinding page: its Host and its Origin both name evil.example.
    _assert_invalid_host(
        _request(base_url, "POST", "/v1/synthesize", {"Host": EVIL, "Origin": f"http://{EVIL}", **key})
    )
    # An allowed Host, and an Origin that names it: still not the service's configured origin.
    response = _request(
        base_url,
        "POST",
        "/v1/synthesize",
        {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}", **key},
    )
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "origin_not_allowed"
    assert (
        _request(base_url, "POST", "/v1/synthesize", {"Origin": f"http://{EVIL}", **key}).status_code == 403
    )
    # The service's own pages (PUBLIC_BASE_URL) are allowed: the playground.
    assert _request(base_url, "POST", "/v1/synthesize", {"Origin": base_url, **key}).status_code == 200


def _raw_handshake(base_url: str, path: str, host: str, extra: dict[str, str]) -> int:
    """The status a WebSocket handshake gets, sent by hand (a client library sets Host itself)."""
    parts = urlsplit(base_url)
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in extra.items()),
    ]
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize("path", WS_ROUTES)
def test_a_websocket_handshake_for_a_host_not_in_allowed_hosts_is_refused(
    base_url: str, issued: IssuedKey, path: str
) -> None:
    credential = {"Authorization": f"Bearer {issued.plaintext}", "X-API-Key": issued.plaintext}
    assert _raw_handshake(base_url, path, f"127.0.0.1:{urlsplit(base_url).port}", credential) == 101
    for host in (EVIL, f"{EVIL}:{urlsplit(base_url).port}"):
        assert _raw_handshake(base_url, path, host, {**credential, "Origin": f"http://{host}"}) == 403


def test_a_socket_from_an_origin_that_names_its_own_host_is_refused_4003(
    base_url: str, issued: IssuedKey
) -> None:
    port = urlsplit(base_url).port

    async def refused() -> tuple[dict[str, Any], int | None]:
        async with connect(
            f"ws://localhost:{port}/v1/stream",
            origin=f"http://localhost:{port}",  # type: ignore[arg-type]
            additional_headers=bearer(issued.plaintext),
            open_timeout=30,
        ) as ws:
            event = json.loads(await asyncio.wait_for(ws.recv(), 30))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 30)
            return event, ws.close_code

    event, close_code = asyncio.run(refused())
    assert (event["code"], close_code) == ("origin_not_allowed", 4003)
