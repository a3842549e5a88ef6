"""Slow clients through a real Daphne: nobody holds a connection before authentication.

Each cut is asserted to happen (and be counted), with a generous bounded wait; how
soon after its bound it happens is the machine's business (bench/slowloris.py).
"""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import websockets.sync.client
from websockets.exceptions import ConnectionClosed

from tests.support.servers import ServiceEnv, daphne_server

pytestmark = [pytest.mark.slow, pytest.mark.django_db]

METRICS_TOKEN = "scrape-token-for-slow-clients"
PER_CLIENT = 12
# A cut due after a few seconds must have happened within this (a loaded machine).
CUT_WITHIN = 40.0


@pytest.fixture(scope="module")
def base_url(service_env: ServiceEnv) -> Iterator[str]:
    env = service_env(
        # Short enough to see each cut, long enough that a starved server (a loaded machine)
        # never cuts a client that keeps to them: the reactor may run late by seconds.
        HTTP_HEADER_TIMEOUT_SECONDS="3",
        HTTP_BODY_GRACE_SECONDS="5",
        HTTP_BODY_MIN_BYTES_PER_SECOND="1000",
        WS_AUTH_SECONDS="5",
        CONNECTIONS_PER_CLIENT_MAX=str(PER_CLIENT),
        METRICS_TOKEN=METRICS_TOKEN,
    )
    with daphne_server(env) as url:
        yield url


def address(base_url: str) -> tuple[str, int]:
    host, port = base_url.removeprefix("http://").split(":")
    return host, int(port)


def cuts(base_url: str) -> dict[str, float]:
    response = httpx.get(
        f"{base_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10
    )
    assert response.status_code == 200
    found = re.findall(r'^cwt_connections_cut_total\{reason="(\w+)"\} (\S+)$', response.text, re.M)
    return {reason: float(value) for reason, value in found}


def trickle_until_cut(sock: socket.socket, pieces: Iterator[bytes], every: float = 0.2) -> bytes:
    """Send a piece at a time until the server closes; what the server answered."""
    sock.settimeout(every)
    answer = b""
    deadline = time.monotonic() + CUT_WITHIN
    while time.monotonic() < deadline:
        try:
            sock.sendall(next(pieces))
        except (BrokenPipeError, ConnectionResetError):
            return answer
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return answer
        if not data:
            return answer
        answer += data
    raise AssertionError(f"still open after {CUT_WITHIN} s; answered {answer[:200]!r}")


def header_lines(first: bytes) -> Iterator[bytes]:
    yield first
    number = 0
    while True:
        number += 1
        yield f"X-Slow-{number}: a\r\n".encode()


def ws_handshake_lines() -> Iterator[bytes]:
    key = base64.b64encode(b"0123456789abcdef").decode()
    yield b"GET /v1/stream HTTP/1.1\r\n"
    for line in ("Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}"):
        yield f"{line}\r\n".encode()
    yield from header_lines(b"Sec-WebSocket-Version: 13\r\n")


def assert_timed_out(answer: bytes) -> None:
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code": "request_timeout"' in answer


@pytest.mark.parametrize(
    ("opening", "what"),
    [
        (lambda: header_lines(b"GET /v1/health HTTP/1.1\r\n"), "HTTP request"),
        (ws_handshake_lines, "WebSocket handshake"),
    ],
)
def test_headers_trickled_a_line_at_a_time_are_cut_at_the_header_deadline(
    base_url: str, opening: object, what: str
) -> None:
    before = cuts(base_url).get("header_timeout", 0)
    with socket.create_connection(address(base_url)) as sock:
        assert callable(opening)
        answer = trickle_until_cut(sock, opening())
    assert_timed_out(answer)
    assert cuts(base_url)["header_timeout"] > before, what


def test_a_connection_that_sends_nothing_is_cut_at_the_header_deadline(base_url: str) -> None:
    with socket.create_connection(address(base_url)) as sock:
        sock.settimeout(CUT_WITHIN)
        answer = b""
        while data := sock.recv(65536):
            answer += data
    assert_timed_out(answer)


def test_a_body_slower_than_the_minimum_rate_is_cut(base_url: str) -> None:
    before = cuts(base_url).get("body_too_slow", 0)
    head = (
        b"POST /v1/synthesize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n"
    )

    def body() -> Iterator[bytes]:
        yield head
        while True:
            yield b" " * 10  # 50 bytes/s against 1,000

    with socket.create_connection(address(base_url)) as sock:
        answer = trickle_until_cut(sock, body())
    assert_timed_out(answer)
    assert cuts(base_url)["body_too_slow"] > before


def test_a_body_sent_in_pieces_above_the_minimum_rate_is_read_whole(base_url: str) -> None:
    # Each 16 KB piece earns 16 s more at 1,000 bytes/s: a pause of 0.3 s is far inside it.
    body = b'{"text": "' + b"a" * (64 * 1024) + b'"}'

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(body), 16 * 1024):
            time.sleep(0.3)
            yield body[start : start + 16 * 1024]

    response = httpx.post(
        f"{base_url}/v1/synthesize",
        content=pieces(),
        headers={"Content-Type": "application/json", "Content-Length": str(len(body))},
        timeout=30,
    )
    assert response.status_code == 401  # read whole, and answered: no key
    assert response.json()["error"]["code"] != "request_timeout"


def test_a_websocket_that_never_authenticates_is_closed_within_ws_auth_seconds(base_url: str) -> None:
    before = cuts(base_url).get("ws_auth_timeout", 0)
    ws_url = base_url.replace("http://", "ws://") + "/v1/stream"
    with websockets.sync.client.connect(ws_url, open_timeout=CUT_WITHIN) as ws:
        event = ws.recv(timeout=CUT_WITHIN)
        assert "auth_timeout" in str(event)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=CUT_WITHIN)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4001
    assert cuts(base_url)["ws_auth_timeout"] > before


def test_connections_from_one_address_over_the_cap_are_closed_and_the_cap_frees_as_they_end(
    base_url: str,
) -> None:
    before = cuts(base_url).get("client_connection_cap", 0)
    held = [socket.create_connection(address(base_url)) for _ in range(PER_CLIENT)]
    try:
        # Accepted by the kernel, then closed by the server without a word.
        with socket.create_connection(address(base_url)) as extra:
            extra.settimeout(CUT_WITHIN)
            with contextlib.suppress(ConnectionResetError):
                assert extra.recv(65536) == b""
    finally:
        for sock in held:
            sock.close()
    # The closed ones free their places: the next client is served.
    deadline = time.monotonic() + CUT_WITHIN
    while True:
        try:
            if httpx.get(f"{base_url}/v1/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the address's connections were never freed"
        time.sleep(0.1)
    assert cuts(base_url)["client_connection_cap"] > before
