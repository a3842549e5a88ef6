"""In a real browser: headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)
against Daphne. The playground page streams an utterance over WS /v1/stream with a client
token and plays it with Web Audio, shows its first-audio time and usage, and cancels; pages
on other origins (a second local server) call the API cross-origin, allowed or refused by
the tenant's origins, over HTTP (CORS) and WebSocket (Origin, 4003).

`make test` installs chromium when it is missing (scripts/ensure_chromium.sh, as root);
these tests skip, saying so, only where it cannot be installed.
"""

from __future__ import annotations

import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from axes.models import AccessAttempt, AccessLog
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission

from tenants.services import IssuedKey
from tests.support.servers import ServiceEnv, daphne_server, free_port, manage
from tests.support.tenants import committed_tenant

pytestmark = [pytest.mark.slow, pytest.mark.django_db]

CHROMIUM = "/usr/bin/chromium"
# As the machine's notes prescribe: no sandbox as root, and no background connections
# (this network is closed; Chromium would retry them).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path("/work/helper-notes/playground.png")
UNLIMITED = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0, "max_concurrent_streams": 0}
LONG_TEXT = " ".join(f"Sentence {n} of a long answer the caller is about to interrupt." for n in range(30))


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>another site</title><p>A page on another origin.</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def site_port() -> Iterator[int]:
    """Another web site: http://127.0.0.1:<port> is allowed by the tenant,
    http://localhost:<port> (the same server, another origin) is not."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def tenant_key(django_db_blocker: Any, test_database_url: str, site_port: int) -> Iterator[IssuedKey]:
    origins = [f"http://127.0.0.1:{site_port}"]
    with committed_tenant(django_db_blocker, "browser", allowed_origins=origins, **UNLIMITED) as (_t, issued):
        yield issued


STAFF_PASSWORD = "a-long-staff-password-4-tests"


@pytest.fixture(scope="module")
def staff(django_db_blocker: Any, test_database_url: str) -> Iterator[str]:
    username = f"staff-{uuid.uuid4().hex[:8]}"
    with django_db_blocker.unblock():
        user = get_user_model().objects.create_user(username, password=STAFF_PASSWORD, is_staff=True)
        user.user_permissions.set(  # what minting on the playground needs
            Permission.objects.filter(
                content_type__app_label="tenants", codename__in=["mint_client_token", "view_tenant"]
            )
        )
    try:
        yield username
    finally:
        with django_db_blocker.unblock():
            AccessAttempt.objects.filter(username=username).delete()
            AccessLog.objects.filter(username=username).delete()
            get_user_model().objects.filter(username=username).delete()


@pytest.fixture(scope="module")
def base_url(
    service_env: ServiceEnv, tenant_key: IssuedKey, staff: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    env = service_env(
        STATIC_ROOT=str(tmp_path_factory.mktemp("static")), CORS_ORIGINS_CACHE_SECONDS="0", DEBUG="0"
    )
    manage("collectstatic", "--noinput", "--verbosity", "0", env=env)
    with daphne_server(env) as url:
        yield url


@pytest.fixture
def page(base_url: str) -> Iterator[Any]:
    """A fresh browser per test, started after everything that touches the database: Playwright
    runs an event loop in this thread while it is open, and Django refuses database calls then."""
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} is not installed and could not be (make services installs it as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_context().new_page()
        finally:
            browser.close()


def mint(base_url: str, key: IssuedKey, **body: Any) -> str:
    """What a tenant's backend does: mint a token with its key, hand it to its page."""
    response = httpx.post(
        f"{base_url}/v1/tokens", json=body, headers={"Authorization": f"Bearer {key.plaintext}"}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def playground_state(page: Any) -> dict[str, Any]:
    return dict(page.evaluate("() => window.playground"))


def open_playground(page: Any, base_url: str, requests: list[str]) -> None:
    page.on("request", lambda request: requests.append(f"{request.method} {request.url}"))
    page.on("websocket", lambda socket: requests.append(f"WEBSOCKET {socket.url}"))
    page.goto(f"{base_url}/playground")
    assert page.title() == "Playground · CallWaiting TTS"


def test_the_playground_streams_plays_and_shows_first_audio_and_usage(
    page: Any, base_url: str, tenant_key: IssuedKey
) -> None:
    requests: list[str] = []
    open_playground(page, base_url, requests)
    token = mint(base_url, tenant_key, expires_in=120)
    # Every control has a label (what assistive technology reads and get_by_label finds).
    page.get_by_label("Client token").fill(token)
    page.get_by_label("Format").select_option("pcm")
    page.get_by_label("Sample rate (Hz)").select_option("24000")
    page.get_by_label("Speed").fill("1.1")
    page.get_by_label("Text or SSML").fill(
        # One sentence: the stream speaks text clause by clause, and splits SSML there too.
        '<speak>Thanks for calling <break time="200ms"/> your table is booked for seven thirty</speak>'
    )
    page.get_by_role("button", name="Speak").click()
    page.wait_for_function(
        "() => window.playground.end !== null || window.playground.error !== null", timeout=60_000
    )

    state = playground_state(page)
    assert state["error"] is None
    assert state["end"]["cancelled"] is False
    assert state["audioFrames"] > 0
    assert state["audioBytes"] == state["end"]["audio_bytes"] > 10_000
    # Web Audio got every sample (16-bit PCM), and the AudioContext ran while it played.
    assert state["framesScheduled"] == state["audioBytes"] // 2
    assert state["contextState"] == "running"
    assert state["contextTime"] > 0
    assert re.fullmatch(r"\d+ ms", page.locator("#first-audio").inner_text())
    assert state["firstAudioMs"] >= 0
    usage = page.locator("#usage").inner_text()
    assert f"{state['end']['audio_bytes']} bytes" in usage
    assert " s of audio" in usage
    assert page.locator("#status").inner_text() == "Done."
    # The page minted nothing itself: no token request from it, only the page, its assets, the stream.
    assert not [request for request in requests if "/v1/tokens" in request or request.startswith("POST")]
    assert [request for request in requests if request.startswith("WEBSOCKET")] == [
        f"WEBSOCKET {base_url.replace('http://', 'ws://')}/v1/stream"
    ]
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_the_playground_cancels_mid_utterance_from_the_keyboard(
    page: Any, base_url: str, tenant_key: IssuedKey
) -> None:
    open_playground(page, base_url, [])
    page.get_by_label("Client token").fill(mint(base_url, tenant_key))
    page.get_by_label("Text or SSML").fill(LONG_TEXT)
    page.get_by_label("Text or SSML").focus()
    page.keyboard.press("Tab")  # to Speak
    page.keyboard.press("Enter")
    page.wait_for_function("() => window.playground.audioFrames > 0", timeout=60_000)
    page.keyboard.press("Escape")  # the page's shortcut for Cancel
    page.wait_for_function("() => window.playground.end !== null", timeout=30_000)
    state = playground_state(page)
    assert state["end"]["cancelled"] is True
    assert page.locator("#status").inner_text() == "Cancelled."
    # Far less than the whole text's audio: it stopped (30 sentences are over a minute).
    assert state["end"]["audio_seconds"] < 60
    assert page.get_by_role("button", name="Speak").is_enabled()


def test_staff_sign_in_and_have_a_token_minted_for_a_tenant(
    page: Any, base_url: str, tenant_key: IssuedKey, staff: str
) -> None:
    page.goto(f"{base_url}/playground")
    page.get_by_role("link", name="Sign in as staff").click()
    page.get_by_label("Username").fill(staff)
    page.get_by_label("Password").fill(STAFF_PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{base_url}/playground")
    tenant_name = page.locator("#tenant option", has_text="browser-").first.inner_text()
    page.get_by_label("Tenant").select_option(label=tenant_name)
    page.get_by_role("button", name="Mint a streaming token").click()
    assert "Token minted" in page.locator("form.staff").inner_text()
    assert page.get_by_label("Client token").input_value().startswith("cwtc_")
    page.get_by_label("Text or SSML").fill("Minted for staff.")
    page.get_by_role("button", name="Speak").click()
    page.wait_for_function(
        "() => window.playground.end !== null || window.playground.error !== null", timeout=60_000
    )
    state = playground_state(page)
    assert state["error"] is None
    assert state["audioFrames"] > 0


def test_the_playground_reports_a_refused_token(page: Any, base_url: str, tenant_key: IssuedKey) -> None:
    open_playground(page, base_url, [])
    page.get_by_label("Client token").fill(mint(base_url, tenant_key, routes=["voice-list"]))
    page.get_by_role("button", name="Speak").click()
    page.wait_for_function("() => window.playground.error !== null", timeout=30_000)
    assert playground_state(page)["error"] == "token_scope"
    assert "token_scope" in page.locator("#status").inner_text()


_FETCH = """async ([url, token]) => {
  try {
    const response = await fetch(url, { headers: { Authorization: `Bearer ${token}` } });
    const requestId = response.headers.get("X-Request-ID");
    return { status: response.status, requestId, body: await response.json() };
  } catch (error) {
    return { failed: String(error) };
  }
}"""

_WEBSOCKET = """([url, token]) => new Promise((resolve) => {
  const socket = new WebSocket(url);
  const events = [];
  socket.onopen = () => socket.send(JSON.stringify({ type: "auth", api_key: token }));
  socket.onmessage = (message) => {
    const event = JSON.parse(message.data);
    events.push(event.type === "error" ? event.code : event.type);
    if (event.type === "ready") socket.close(1000);
  };
  socket.onclose = (event) => resolve({ code: event.code, events });
})"""


def test_a_cross_origin_fetch_succeeds_from_an_allowed_origin_and_fails_from_another(
    page: Any, base_url: str, tenant_key: IssuedKey, site_port: int
) -> None:
    token = mint(base_url, tenant_key, routes=["voice-list"])
    page.goto(f"http://127.0.0.1:{site_port}/")
    allowed = page.evaluate(_FETCH, [f"{base_url}/v1/voices", token])
    assert allowed["status"] == 200, allowed
    assert allowed["requestId"]  # an exposed header the page's script may read
    assert allowed["body"]["voices"]

    page.goto(f"http://localhost:{site_port}/")
    refused = page.evaluate(_FETCH, [f"{base_url}/v1/voices", token])
    assert "failed" in refused, refused  # the browser hides the answer from this origin


def test_a_websocket_from_a_disallowed_origin_is_closed_4003(
    page: Any, base_url: str, tenant_key: IssuedKey, site_port: int
) -> None:
    token = mint(base_url, tenant_key)
    stream_url = base_url.replace("http://", "ws://") + "/v1/stream"
    page.goto(f"http://127.0.0.1:{site_port}/")
    assert page.evaluate(_WEBSOCKET, [stream_url, token]) == {"code": 1000, "events": ["ready"]}
    page.goto(f"http://localhost:{site_port}/")
    assert page.evaluate(_WEBSOCKET, [stream_url, token]) == {"code": 4003, "events": ["origin_not_allowed"]}
