"""Client tokens (POST /v1/tokens, tenants.tokens): minting, expiry, scope, dying with their
key, charging their tenant, and the browser Origin rule, over HTTP (Django's test client)
and WS /v1/stream (Channels' communicator against the real ASGI application, Piper, Redis
and Postgres). tests/e2e/test_browser.py uses them from a real browser."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.test import override_settings
from rest_framework.test import APIClient

from tenants import tokens
from tenants.models import Tenant
from tenants.services import IssuedKey, api_key_revoke
from tests.support.tenants import TenantFactory, bearer
from usage.models import UsageLog
from usage.recorder import usage_flush

# The consumer's ORM calls run in other threads: committed data, no test transaction.
pytestmark = pytest.mark.django_db(transaction=True)

UNLIMITED = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0, "max_concurrent_streams": 0}
APP_ORIGIN = "https://app.example.com"
LONG = " ".join(f"Part {n} of an answer that is still playing." for n in range(40))


def mint(client: APIClient, key: str, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/tokens", body, format="json", headers=bearer(key))
    assert response.status_code == 201, response.content
    assert response["Cache-Control"] == "no-store"
    return dict(response.json())


def code_of(response: Any) -> str:
    return str(response.json()["error"]["code"])


@pytest.fixture
def tenant_key(make_tenant: TenantFactory) -> tuple[Tenant, IssuedKey]:
    return make_tenant(allowed_origins=[APP_ORIGIN, "http://localhost:5173"], **UNLIMITED)


# --- Streams ---------------------------------------------------------------------------------


class Stream:
    def __init__(self, communicator: WebsocketCommunicator) -> None:
        self.communicator = communicator
        self.events: list[dict[str, Any]] = []
        self.audio_bytes = 0
        self.close_code: int | None = None

    async def send(self, **message: Any) -> None:
        await self.communicator.send_to(text_data=json.dumps(message))

    async def until(self, kind: str, wait_s: float = 30) -> dict[str, Any]:
        """The next event of this kind ("close" for the close); fails on an earlier close."""

        async def wait() -> dict[str, Any]:
            while True:
                message = await self.communicator.receive_output(wait_s)
                if message["type"] == "websocket.close":
                    self.close_code = message.get("code")
                    if kind == "close":
                        return {"code": self.close_code}
                    raise AssertionError(f"closed {self.close_code} waiting for {kind}: {self.events}")
                if message.get("bytes") is not None:
                    self.audio_bytes += len(message["bytes"])
                    continue
                event = json.loads(message["text"])
                self.events.append(event)
                if event.get("type") == kind:
                    return dict(event)

        return await asyncio.wait_for(wait(), wait_s)


def run_stream(scenario: Callable[[Stream], Awaitable[None]], *, origin: str | None = None) -> Stream:
    async def main() -> Stream:
        from callwaiting_tts.asgi import application

        headers = [(b"host", b"testserver")]
        if origin is not None:
            headers.append((b"origin", origin.encode()))
        communicator = WebsocketCommunicator(application, "/v1/stream", headers=headers)
        connected, _ = await communicator.connect()
        assert connected
        stream = Stream(communicator)
        try:
            await scenario(stream)
        finally:
            await communicator.disconnect()
        return stream

    return asyncio.run(main())


def refused_at_auth(token: str, *, origin: str | None = None) -> Stream:
    async def scenario(stream: Stream) -> None:
        await stream.send(type="auth", api_key=token)
        await stream.until("close")

    return run_stream(scenario, origin=origin)


def test_a_token_streams_in_the_first_auth_message_and_its_tenant_pays(
    api_client: APIClient, tenant_key: tuple[Tenant, IssuedKey]
) -> None:
    tenant, issued = tenant_key
    minted = mint(api_client, issued.plaintext, expires_in=120)
    assert minted["token"].startswith("cwtc_")
    assert issued.plaintext not in minted["token"]
    assert minted["routes"] == ["stream"]
    assert minted["expires_in"] == 120

    async def scenario(stream: Stream) -> None:
        await stream.send(type="auth", api_key=minted["token"])
        await stream.until("ready")
        await stream.send(type="synthesize", context_id="a", text="Hello from a browser.", format="pcm")
        end = await stream.until("audio_end")
        assert end["audio_bytes"] > 10_000

    stream = run_stream(scenario, origin=APP_ORIGIN)
    assert stream.audio_bytes > 10_000
    usage_flush()
    [row] = UsageLog.objects.filter(tenant=tenant)
    assert (row.endpoint, row.status_code, row.streaming) == ("stream", 200, True)


def test_a_token_counts_against_the_tenants_rate_limit(
    make_tenant: TenantFactory, api_client: APIClient
) -> None:
    # Two requests a minute: the mint is one, the first utterance the other.
    tenant, issued = make_tenant(
        rate_limit_minute=2, rate_limit_hour=0, quota_minutes=0, max_concurrent_streams=0
    )
    token = mint(api_client, issued.plaintext)["token"]

    async def scenario(stream: Stream) -> None:
        await stream.send(type="auth", api_key=token)
        await stream.until("ready")
        await stream.send(type="synthesize", context_id="a", text="One.")
        await stream.until("audio_end")
        await stream.send(type="synthesize", context_id="b", text="Two.")
        refused = await stream.until("error")
        assert (refused["code"], refused["context_id"]) == ("rate_limited", "b")

    run_stream(scenario)
    # ... and the key itself has nothing left either: one budget for both.
    response = api_client.get("/v1/tenant", headers=bearer(issued.plaintext))
    assert (response.status_code, code_of(response)) == (429, "rate_limited")
    usage_flush()
    rows = UsageLog.objects.filter(tenant=tenant).order_by("created_at")
    assert [(row.status_code, row.error_code) for row in rows] == [(200, None), (429, "rate_limited")]


def test_a_token_draws_on_its_tenants_monthly_quota(
    make_tenant: TenantFactory, api_client: APIClient
) -> None:
    from usage.models import QuotaUsage
    from usage.quotas import current_month

    tenant, issued = make_tenant(
        rate_limit_minute=0, rate_limit_hour=0, quota_minutes=1, max_concurrent_streams=0
    )
    QuotaUsage.objects.create(tenant=tenant, month=current_month(), audio_seconds=60.0)  # the minute is used
    token = mint(api_client, issued.plaintext)["token"]

    async def scenario(stream: Stream) -> None:
        await stream.send(type="auth", api_key=token)
        await stream.until("ready")
        await stream.send(type="synthesize", context_id="a", text="Over the quota.")
        refused = await stream.until("error")
        assert (refused["code"], refused["context_id"]) == ("quota_exceeded", "a")

    run_stream(scenario)
    usage_flush()
    [row] = UsageLog.objects.filter(tenant=tenant)
    assert (row.status_code, row.error_code) == (429, "quota_exceeded")


def test_revoking_the_key_closes_a_stream_opened_with_its_token_and_stops_the_token(
    api_client: APIClient, tenant_key: tuple[Tenant, IssuedKey]
) -> None:
    _tenant, issued = tenant_key
    token = mint(api_client, issued.plaintext, routes=["stream", "voice-list"])["token"]
    assert api_client.get("/v1/voices", headers=bearer(token)).status_code == 200

    async def scenario(stream: Stream) -> None:
        await stream.send(type="auth", api_key=token)
        await stream.until("ready")
        await stream.send(type="synthesize", context_id="busy", text=LONG)
        await stream.until("audio_start")
        await asyncio.to_thread(api_key_revoke, api_key=issued.api_key)
        await stream.until("close", wait_s=10)

    stream = run_stream(scenario)
    assert (stream.events[-1]["code"], stream.close_code) == ("revoked_api_key", 4003)
    response = api_client.get("/v1/voices", headers=bearer(token))
    assert (response.status_code, code_of(response)) == (401, "revoked_api_key")
    assert refused_at_auth(token).events[-1]["code"] == "revoked_api_key"


def test_an_expired_token_is_refused_on_http_and_the_websocket(tenant_key: tuple[Tenant, IssuedKey]) -> None:
    _tenant, issued = tenant_key
    wanted = tokens.TokenRequest(
        ttl_seconds=60, routes=frozenset({"stream", "voice-list"}), voices=None, origins=None
    )
    expired, _claims = tokens.mint(issued.api_key.prefix, wanted, now=time.time() - 61)
    response = APIClient().get("/v1/voices", headers=bearer(expired))
    assert (response.status_code, code_of(response)) == (401, "token_expired")
    assert 'error="invalid_token"' in response["WWW-Authenticate"]
    stream = refused_at_auth(expired)
    assert (stream.events[-1]["code"], stream.close_code) == ("token_expired", 4001)


def test_a_tampered_or_foreign_token_is_invalid(
    api_client: APIClient, tenant_key: tuple[Tenant, IssuedKey]
) -> None:
    _tenant, issued = tenant_key
    token = mint(api_client, issued.plaintext, routes=["voice-list"])["token"]
    payload, _, signature = token.rpartition(":")
    forged = f"{payload}:{signature[::-1]}"
    for bad in (forged, "cwtc_nonsense", token.replace("cwtc_", "cwtc_x")):
        response = api_client.get("/v1/voices", headers=bearer(bad))
        assert (response.status_code, code_of(response)) == (401, "invalid_token")


def test_a_route_outside_the_scope_is_refused_and_a_token_cannot_mint(
    api_client: APIClient, tenant_key: tuple[Tenant, IssuedKey]
) -> None:
    _tenant, issued = tenant_key
    token = mint(api_client, issued.plaintext, routes=["voice-list"])["token"]
    assert api_client.get("/v1/voices", headers=bearer(token)).status_code == 200
    for method, path in (("get", "/v1/tenant"), ("get", "/v1/usage"), ("post", "/v1/tokens")):
        response = getattr(api_client, method)(path, headers=bearer(token))
        assert (response.status_code, code_of(response)) == (403, "token_scope"), path
    stream = refused_at_auth(token)  # "stream" is not among its routes
    assert (stream.events[-1]["code"], stream.close_code) == ("token_scope", 4003)


def test_a_voice_outside_the_scope_is_refused(
    api_client: APIClient, tenant_key: tuple[Tenant, IssuedKey]
) -> None:
    tenant, issued = tenant_key
    token = mint(api_client, issued.plaintext, routes=["stream", "synthesize"], voices=["joe"])["token"]
    response = api_client.post(
        "/v1/synthesize", {"text": "Hi.", "voice_id": "someone-else"}, format="json", headers=bearer(token)
    )
    assert (response.status_code, code_of(response)) == (403, "token_scope")
    response = api_client.post("/v1/synthesize", {"text": "Hi."}, format="json", headers=bearer(token))
    assert (response.status_code, code_of(response)) == (403, "token_scope")  # must name its voice
    response = api_client.post(
        "/v1/synthesize",
        {"text": "Hi.", "voice_id": "joe", "format": "pcm"},
        format="json",
        headers=bearer(token),
    )
    assert response.status_code == 200
    assert len(response.content) > 1000

    async def scenario(stream: Stream) -> None:
        await stream.send(type="auth", api_key=token)
        await stream.until("ready")
        await stream.send(type="synthesize", context_id="a", text="Hello.", voice_id="someone-else")
        refused = await stream.until("error")
        assert (refused["code"], refused["context_id"]) == ("token_scope", "a")
        await stream.send(type="synthesize", context_id="b", text="Hello.", voice_id="joe")
        await stream.until("audio_end")

    run_stream(scenario)
    usage_flush()
    codes = sorted(str(row.error_code) for row in UsageLog.objects.filter(tenant=tenant))
    assert codes == ["None", "None", "token_scope", "token_scope", "token_scope"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"expires_in": 0}, "expires_in"),
        ({"expires_in": 10**6}, "expires_in"),
        ({"expires_in": "60"}, "expires_in"),
        ({"routes": []}, "routes"),
        ({"routes": ["tokens"]}, "routes"),
        ({"routes": ["usage"]}, "routes"),
        ({"routes": ["voice-detail"]}, "routes"),  # DELETE of a cloned voice
        ({"voices": "joe"}, "voices"),
        ({"origins": ["https://elsewhere.example"]}, "origins"),
        ({"origins": ["not an origin"]}, "origins"),
    ],
)
def test_a_mint_outside_what_may_be_granted_is_invalid(
    api_client: APIClient, tenant_key: tuple[Tenant, IssuedKey], body: dict[str, Any], fragment: str
) -> None:
    _tenant, issued = tenant_key
    response = api_client.post("/v1/tokens", body, format="json", headers=bearer(issued.plaintext))
    assert (response.status_code, code_of(response)) == (400, "invalid_request")
    assert fragment in response.json()["error"]["message"]


def test_minting_needs_the_key(api_client: APIClient, db: None) -> None:
    response = api_client.post("/v1/tokens", {}, format="json")
    assert (response.status_code, code_of(response)) == (401, "missing_api_key")


# --- Browser origins ---------------------------------------------------------------------------


@override_settings(PUBLIC_BASE_URL="https://tts.example.net")
def test_a_stream_from_an_origin_the_tenant_does_not_allow_is_refused_4003(
    api_client: APIClient, tenant_key: tuple[Tenant, IssuedKey]
) -> None:
    _tenant, issued = tenant_key
    token = mint(api_client, issued.plaintext)["token"]
    for credential in (token, issued.plaintext):
        stream = refused_at_auth(credential, origin="https://evil.example")
        assert (stream.events[-1]["code"], stream.close_code) == ("origin_not_allowed", 4003)
    stream = refused_at_auth(token, origin="null")  # a sandboxed frame or a file: page
    assert (stream.events[-1]["code"], stream.close_code) == ("origin_not_allowed", 4003)

    async def ready(stream: Stream) -> None:
        await stream.send(type="auth", api_key=token)
        await stream.until("ready")

    run_stream(ready, origin=APP_ORIGIN)  # allowed
    run_stream(ready, origin="https://tts.example.net")  # the service's own pages (PUBLIC_BASE_URL)
    # An Origin naming the request's Host is no proof of anything: whoever sends it chose both.
    stream = refused_at_auth(token, origin="http://testserver")
    assert (stream.events[-1]["code"], stream.close_code) == ("origin_not_allowed", 4003)
    run_stream(ready)  # no Origin: a server-side client


def test_a_token_scoped_to_origins_is_refused_from_the_tenants_other_origins(
    api_client: APIClient, tenant_key: tuple[Tenant, IssuedKey]
) -> None:
    _tenant, issued = tenant_key
    token = mint(api_client, issued.plaintext, origins=["HTTPS://App.Example.com:443/"])["token"]
    stream = refused_at_auth(token, origin="http://localhost:5173")
    assert (stream.events[-1]["code"], stream.close_code) == ("origin_not_allowed", 4003)
    response = api_client.post(
        "/v1/tokens", {}, format="json", headers={**bearer(token), "Origin": APP_ORIGIN}
    )
    assert (response.status_code, code_of(response)) == (403, "token_scope")


def test_http_from_a_disallowed_origin_is_refused(
    api_client: APIClient, tenant_key: tuple[Tenant, IssuedKey]
) -> None:
    _tenant, issued = tenant_key
    token = mint(api_client, issued.plaintext, routes=["voice-list"])["token"]
    for credential in (token, issued.plaintext):
        response = api_client.get(
            "/v1/voices", headers={**bearer(credential), "Origin": "https://evil.example"}
        )
        assert (response.status_code, code_of(response)) == (403, "origin_not_allowed")
        response = api_client.get("/v1/voices", headers={**bearer(credential), "Origin": APP_ORIGIN})
        assert response.status_code == 200
