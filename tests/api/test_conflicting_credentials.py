"""Two credentials in one request that are not the same one are refused on every door
(`400 conflicting_credentials`; a socket: the dialect's error, then close 4001), instead of
one of them silently billing; a key in the query beside a header one is refused, not ignored."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.test import Client

from tests.support.tenants import TenantFactory

pytestmark = pytest.mark.django_db(transaction=True)

HTTP_DOORS = [
    ("get", "/v1/tenant"),
    ("get", "/v1/voices"),
    ("post", "/v1/synthesize"),
    ("post", "/v1/audio/speech"),
    ("post", "/v1/text-to-speech/joe"),
    ("post", "/v1/text-to-speech/joe/stream"),
]
BODY = {"text": "Hello.", "input": "Hello.", "voice": "joe", "model": "tts-1"}


@pytest.fixture
def two_keys(make_tenant: TenantFactory) -> tuple[str, str]:
    _a, key_a = make_tenant("conflict-a")
    _b, key_b = make_tenant("conflict-b")
    return key_a.plaintext, key_b.plaintext


def _http(method: str, path: str, headers: dict[str, str], query: str = "") -> Any:
    client = Client()
    url = f"{path}?{query}" if query else path
    if method == "get":
        return client.get(url, headers=headers)
    return client.post(url, data=json.dumps(BODY), content_type="application/json", headers=headers)


@pytest.mark.parametrize(("method", "path"), HTTP_DOORS)
def test_two_different_credentials_on_an_http_route_are_400_conflicting_credentials(
    two_keys: tuple[str, str], method: str, path: str
) -> None:
    a, b = two_keys
    for headers, query in (
        ({"Authorization": f"Bearer {a}", "xi-api-key": b}, ""),
        ({"Authorization": f"Bearer {b}", "xi-api-key": a}, ""),
        ({"Authorization": f"Bearer {a}", "X-API-Key": b}, ""),
        ({"xi-api-key": a, "X-API-Key": b}, ""),
        ({"Authorization": f"Bearer {a}"}, f"token={b}"),
        ({"xi-api-key": a}, f"api_key={b}"),
    ):
        response = _http(method, path, headers, query)
        assert response.status_code == 400, (headers, query, response.content)
        assert response.json()["error"]["code"] == "conflicting_credentials"
        assert response["X-Request-ID"]


@pytest.mark.parametrize(("method", "path"), HTTP_DOORS[:3])
def test_a_key_in_the_query_beside_the_same_key_in_a_header_is_refused_not_ignored(
    two_keys: tuple[str, str], method: str, path: str
) -> None:
    a, _b = two_keys
    response = _http(method, path, {"Authorization": f"Bearer {a}"}, f"token={a}")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "api_key_in_url"


@pytest.mark.parametrize(
    "query",
    [
        "api_key={a}",  # alone, no header beside it
        "auth={a}",
        "xi-api-key={a}",
        "session_token={a}",
        "k={a}",  # any name: the value is one of ours
        "voice=x&foo=prefix%20{a}",
    ],
)
def test_a_credential_anywhere_in_the_query_is_400_api_key_in_url(
    two_keys: tuple[str, str], query: str
) -> None:
    a, _b = two_keys
    for method, path in HTTP_DOORS:
        response = _http(method, path, {}, query.format(a=a))
        assert response.status_code == 400, (path, query, response.content)
        assert response.json()["error"]["code"] == "api_key_in_url"
    for path in ("/v1/stream", "/v1/text-to-speech/joe/stream-input", "/tts/websocket"):
        text, close_code = _socket(f"{path}?{query.format(a=a)}", {}, [])
        assert "api_key_in_url" in text, (path, query, text)
        assert close_code in (4001, 4400), (path, close_code)


def test_the_same_credential_twice_on_a_socket_is_no_conflict(two_keys: tuple[str, str]) -> None:
    a, _b = two_keys

    async def main() -> list[str]:
        from callwaiting_tts.asgi import application

        communicator = WebsocketCommunicator(
            application, "/v1/stream", headers=[(b"authorization", f"Bearer {a}".encode())]
        )
        connected, _ = await communicator.connect(timeout=30)
        assert connected
        try:
            await communicator.send_to(text_data=json.dumps({"type": "auth", "api_key": f" {a} "}))
            codes: list[str] = []
            while "already_authenticated" not in codes and len(codes) < 10:
                event = json.loads(await communicator.receive_from(30))
                codes.append(event.get("code") or event["type"])
            return codes
        finally:
            await communicator.disconnect()

    codes = asyncio.run(main())
    assert codes == ["ready", "already_authenticated"], codes


def test_the_same_key_in_two_headers_is_one_credential(two_keys: tuple[str, str]) -> None:
    a, _b = two_keys
    assert _http("get", "/v1/tenant", {"Authorization": f"Bearer {a}", "xi-api-key": a}).status_code == 200


def _socket(path: str, headers: dict[str, str], messages: list[dict[str, Any]]) -> tuple[str, int | None]:
    """The text of everything the socket sent, and its close code."""

    async def main() -> tuple[str, int | None]:
        from callwaiting_tts.asgi import application

        raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
        communicator = WebsocketCommunicator(application, path, headers=raw)
        connected, _ = await communicator.connect(timeout=30)
        assert connected
        texts: list[str] = []
        try:
            for message in messages:
                await communicator.send_to(text_data=json.dumps(message))
            while True:
                output = await communicator.receive_output(30)
                if output["type"] == "websocket.close":
                    return "\n".join(texts), output.get("code")
                if output.get("text"):
                    texts.append(output["text"])
        finally:
            await communicator.disconnect()

    return asyncio.run(main())


def test_two_different_credentials_on_a_socket_are_refused_at_the_handshake_on_every_dialect(
    two_keys: tuple[str, str],
) -> None:
    a, b = two_keys
    for path, headers, messages in (
        ("/v1/stream", {"Authorization": f"Bearer {a}", "X-API-Key": b}, []),
        ("/v1/stream", {"xi-api-key": b}, [{"type": "auth", "api_key": a}]),
        ("/v1/text-to-speech/joe/stream-input", {"xi-api-key": a, "Authorization": f"Bearer {b}"}, []),
        ("/v1/text-to-speech/joe/stream-input", {"xi-api-key": a}, [{"text": " ", "xi_api_key": b}]),
        # A second credential after the socket authenticated: refused too, not ignored.
        ("/v1/stream", {"Authorization": f"Bearer {a}"}, [{"type": "auth", "api_key": b}]),
        (
            "/v1/text-to-speech/joe/stream-input",
            {},
            [{"text": " ", "xi_api_key": a}, {"text": "Hi ", "xi-api-key": b}],
        ),
        ("/v1/text-to-speech/joe/multi-stream-input", {"Authorization": f"Bearer {a}", "xi-api-key": b}, []),
        ("/tts/websocket", {"X-API-Key": a, "Authorization": f"Bearer {b}"}, []),
        ("/v1/tts/websocket", {"X-API-Key": b, "xi-api-key": a}, []),
    ):
        text, close_code = _socket(path, headers, messages)
        assert "conflicting_credentials" in text, (path, headers, text)
        assert close_code == 4001, (path, close_code)
