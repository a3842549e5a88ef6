"""The examples run against a real local service: the Twilio webhook and the n8n workflow."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode
from wsgiref.util import request_uri, setup_testing_defaults
from xml.etree import ElementTree

import httpx
import pytest
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import VoiceResponse

from examples.twilio_webhook import app as webhook
from synthesis.audio import OutputSpec
from tests.support.audio import decode
from tests.support.servers import ROOT, ServiceEnv, daphne_server

pytestmark = [pytest.mark.slow, pytest.mark.django_db]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def service(service_env: ServiceEnv) -> Iterator[str]:
    with daphne_server(service_env()) as base_url:
        yield base_url


AUTH_TOKEN = "test-account-auth-token"
CALL = {
    "CallSid": "CA0123456789abcdef",
    "AccountSid": "AC01",
    "From": "+15551230000",
    "To": "+15559870000",
    "CallStatus": "ringing",
}


def simulated_twilio_call(signature: str | None = "valid", token: str = AUTH_TOKEN) -> dict[str, Any]:
    """The WSGI environ of Twilio's POST for an incoming call, signed as Twilio signs it
    (the twilio package's own RequestValidator, with `token`), or with `signature` as given."""
    form = urlencode(CALL).encode()
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ.update(
        REQUEST_METHOD="POST",
        CONTENT_TYPE="application/x-www-form-urlencoded",
        CONTENT_LENGTH=str(len(form)),
    )
    environ["wsgi.input"] = io.BytesIO(form)
    if signature == "valid":
        signature = RequestValidator(token).compute_signature(request_uri(environ), CALL)
    if signature is not None:
        environ["HTTP_X_TWILIO_SIGNATURE"] = signature
    return environ


@pytest.fixture(autouse=True)
def twilio_auth_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhook, "TWILIO_AUTH_TOKEN", AUTH_TOKEN)


@pytest.mark.parametrize(
    "environ",
    [
        pytest.param(simulated_twilio_call(signature=None), id="unsigned"),
        pytest.param(simulated_twilio_call(signature="bm90IGEgc2lnbmF0dXJl"), id="forged"),
        pytest.param(simulated_twilio_call(token="another-account"), id="another-account"),
    ],
)
def test_the_twilio_webhook_refuses_requests_twilio_did_not_sign(environ: dict[str, Any]) -> None:
    statuses: list[str] = []
    body = b"".join(webhook.application(environ, lambda status, headers: statuses.append(status)))
    assert statuses == ["403 Forbidden"]
    assert b"<Response>" not in body


def test_the_twilio_webhook_refuses_everything_without_an_auth_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhook, "TWILIO_AUTH_TOKEN", "")
    statuses: list[str] = []
    list(webhook.application(simulated_twilio_call(), lambda status, headers: statuses.append(status)))
    assert statuses == ["403 Forbidden"]


def test_the_twilio_webhook_answers_a_call_with_twiml_that_plays(
    service: str, module_tenant: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tenant, issued = module_tenant
    monkeypatch.setattr(webhook, "TTS_BASE_URL", service)
    monkeypatch.setattr(webhook, "TTS_API_KEY", issued.plaintext)
    statuses: list[str] = []
    body = b"".join(
        webhook.application(simulated_twilio_call(), lambda status, headers: statuses.append(status))
    )
    assert statuses == ["200 OK"]
    root = ElementTree.fromstring(body)  # noqa: S314  (our own example's answer)
    assert root.tag == "Response"
    (play,) = list(root)
    assert play.tag == "Play"
    audio = httpx.get(play.text or "")
    assert audio.headers["Content-Type"] == "audio/mpeg"
    assert len(decode(audio.content, OutputSpec.parse("mp3", None))) > 24000

    # The same document as the twilio library builds it.
    expected = VoiceResponse()
    expected.play(play.text)
    assert body.decode() == str(expected)


def test_the_twilio_webhook_falls_back_to_say_when_the_service_is_down() -> None:
    twiml = webhook.greeting_twiml("Hello", base_url="http://127.0.0.1:9", api_key="cwt_x")
    assert "<Say>" in twiml
    assert "<Play>" not in twiml


def test_the_n8n_workflow_is_valid_and_calls_only_documented_endpoints(service: str) -> None:
    workflow = json.loads((EXAMPLES / "n8n" / "whatsapp_voice_note.json").read_text())
    names = {node["name"] for node in workflow["nodes"]}
    for source, outputs in workflow["connections"].items():
        assert source in names
        for branch in outputs["main"]:
            assert all(link["node"] in names for link in branch)
    documented = set(httpx.get(f"{service}/v1/openapi.json").json()["paths"])
    our_calls = [
        re.sub(r"^=\{\{ \$env\.CALLWAITING_TTS_URL \}\}", "", node["parameters"]["url"])
        for node in workflow["nodes"]
        if "CALLWAITING_TTS_URL" in node["parameters"].get("url", "")
    ]
    assert our_calls == ["/v1/synthesize-url"]
    assert set(our_calls) <= documented
