"""No secret from a URL reaches the logs: signed audio links and keys sent in query strings,
in Daphne's access lines and in every line through the root handlers, plain or JSON."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.support.servers import ServiceEnv, daphne_server
from tests.support.tenants import bearer, committed_tenant

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# Values a client put where they do not belong; each must not appear in any log.
QUERY_SECRETS = {
    "key": "qkey-0a1b2c",
    "api_key": "qapikey-3d4e5f",
    "xi-api-key": "qxi-6a7b8c",
    "token": "qtoken-9d0e1f",
    "access_token": "qaccess-2a3b4c",
    "sig": "qsig-5d6e7f",
}


@pytest.mark.parametrize("log_format", ["plain", "json"])
def test_no_signature_or_key_from_a_url_is_logged(
    service_env: ServiceEnv, django_db_blocker: Any, log_format: str
) -> None:
    env = service_env(LOG_FORMAT=log_format, LOG_LEVEL="DEBUG")
    query = "&".join(f"{name}={value}" for name, value in QUERY_SECRETS.items())
    limits = {"rate_limit_minute": 0, "rate_limit_hour": 0}
    with (
        committed_tenant(django_db_blocker, "log-secrets", **limits) as (_tenant, issued),
        daphne_server(env) as base_url,
        httpx.Client(base_url=base_url, timeout=60) as client,
    ):
        made = client.post(
            "/v1/synthesize-url", json={"text": "A link to share."}, headers=bearer(issued.plaintext)
        )
        assert made.status_code == 200, made.text
        link = urlsplit(made.json()["url"])
        signature = parse_qs(link.query)["signature"][0]
        assert client.get(f"{link.path}?{link.query}").status_code == 200
        # A link whose signature is wrong (403), and keys in query strings: on a public
        # route, on one that needs a key, and on a WebSocket handshake.
        forged = f"{link.path}?expires=1&signature=forged-{signature[::-1]}"
        assert client.get(forged).status_code == 403
        assert client.get(f"/v1/health?{query}").status_code == 200
        # Several differing keys in the query: refused as conflicting before anything else.
        assert client.post(f"/v1/synthesize?{query}", json={"text": "Hi."}).status_code == 400

        async def handshake() -> None:
            ws_url = base_url.replace("http://", "ws://") + f"/v1/stream?{query}"
            async with connect(ws_url, additional_headers=bearer(issued.plaintext)) as ws:
                await ws.recv()  # ready

        asyncio.run(handshake())
        # Our own key and token by value: under names that say nothing, and in paths.
        token = client.post("/v1/tokens", json={}, headers=bearer(issued.plaintext)).json()["token"]
        for where in (
            f"/v1/health?k={issued.plaintext}&foo={token}",
            f"/v1/voices/{issued.plaintext}",
            f"/v1/audio/{token}",
        ):
            assert client.get(where).status_code in {200, 401, 403, 404}
        log = "".join(path.read_text() for path in Path(env["CWT_TEST_LOG_DIR"]).glob("daphne-*.log"))

    assert link.path in log  # the requests were logged, by path
    assert signature not in log
    assert signature[::-1] not in log
    assert issued.plaintext not in log
    assert issued.plaintext.rsplit("_", 1)[1] not in log  # the secret, however it is cut
    assert token not in log
    assert token.split(":")[-1] not in log  # the token's signature
    assert f"cwt_{issued.api_key.prefix}_REDACTED" in log  # the public prefix still names the key
    for value in QUERY_SECRETS.values():
        assert value not in log
    if log_format == "plain":
        assert f"GET {link.path}?expires=" in log
        assert "signature=REDACTED" in log
        assert "GET /v1/health?key=REDACTED&api_key=REDACTED" in log
    else:
        entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        assert any(entry["logger"] == "callwaiting.requests" for entry in entries)
