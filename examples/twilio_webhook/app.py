"""A minimal Twilio voice webhook that answers a call with speech from CallWaiting TTS.

Twilio POSTs here when a call comes in; we ask the TTS service for a signed
audio URL (POST /v1/synthesize-url, cached after the first call) and answer
with TwiML <Play>. Standard library WSGI server plus the `twilio` helper
library; see README.md beside this file.

Only Twilio may call it: every request must carry a valid `X-Twilio-Signature`
(an HMAC of the webhook's URL and form parameters with the account's auth token),
checked with the `twilio` package's validator; anything else is 403. Without
the check anyone who finds the URL could spend the tenant's TTS quota.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import make_server
from wsgiref.util import request_uri

import httpx
from twilio.request_validator import RequestValidator
from twilio.twiml.voice_response import VoiceResponse

TTS_BASE_URL = os.environ.get("CALLWAITING_TTS_URL", "http://127.0.0.1:8000").rstrip("/")
TTS_API_KEY = os.environ.get("CALLWAITING_TTS_API_KEY", "")
GREETING = os.environ.get("GREETING", "Thanks for calling. Please hold while we connect you.")
VOICE_ID = os.environ.get("VOICE_ID", "")
# The account's auth token (Twilio console): the key Twilio signs its requests with.
TWILIO_AUTH_TOKEN = os.environ.get("TWILIO_AUTH_TOKEN", "")
# The URL exactly as configured in Twilio's console (Twilio signs that URL). Behind a proxy or
# a tunnel it differs from what this server sees; unset, it is rebuilt from the request.
WEBHOOK_URL = os.environ.get("WEBHOOK_URL", "")


def greeting_twiml(text: str, *, base_url: str | None = None, api_key: str | None = None) -> str:
    """TwiML that plays `text`, or says a fallback with Twilio's own voice if the service fails."""
    base_url = base_url or TTS_BASE_URL
    api_key = api_key or TTS_API_KEY
    response = VoiceResponse()
    body: dict[str, Any] = {"text": text, "format": "mp3"}
    if VOICE_ID:
        body["voice_id"] = VOICE_ID
    try:
        answer = httpx.post(
            f"{base_url}/v1/synthesize-url",
            json=body,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=10,
        )
        answer.raise_for_status()
        response.play(answer.json()["url"])
    except (httpx.HTTPError, KeyError, ValueError):
        response.say("Sorry, we are having trouble right now. Please call again later.")
    return str(response)


def _request_url(environ: dict[str, Any]) -> str:
    return WEBHOOK_URL or request_uri(environ, include_query=True)


def signed_by_twilio(environ: dict[str, Any], params: dict[str, str]) -> bool:
    """Whether the request carries Twilio's signature of this URL and these parameters."""
    signature = environ.get("HTTP_X_TWILIO_SIGNATURE", "")
    if not TWILIO_AUTH_TOKEN or not signature:
        return False
    return bool(RequestValidator(TWILIO_AUTH_TOKEN).validate(_request_url(environ), params, signature))


def _plain(
    start_response: Callable[..., Any], status: str, text: str, *headers: tuple[str, str]
) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body))), *headers])
    return [body]


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["REQUEST_METHOD"] != "POST":
        return _plain(start_response, "405 Method Not Allowed", "Use POST.", ("Allow", "POST"))
    size = min(int(environ.get("CONTENT_LENGTH") or 0), 64 * 1024)  # Twilio's forms are small
    form = {name: values[0] for name, values in parse_qs(environ["wsgi.input"].read(size).decode()).items()}
    if not signed_by_twilio(environ, form):
        return _plain(start_response, "403 Forbidden", "Not signed by Twilio.")
    print(f"call {form.get('CallSid', '?')} from {form.get('From', 'caller')}")
    document = greeting_twiml(GREETING).encode()
    start_response("200 OK", [("Content-Type", "text/xml"), ("Content-Length", str(len(document)))])
    return [document]


if __name__ == "__main__":
    if not TWILIO_AUTH_TOKEN:
        raise SystemExit("error: set TWILIO_AUTH_TOKEN (Twilio console) so that requests can be verified.")
    # Loopback unless told otherwise: put a TLS proxy or a tunnel in front (see README.md).
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "5050"))
    print(f"Twilio webhook on http://{host}:{port}/ (TTS at {TTS_BASE_URL})")
    make_server(host, port, application).serve_forever()
