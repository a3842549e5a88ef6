"""A minimal Twilio voice webhook that answers a call with speech from CallWaiting TTS.

Twilio POSTs here when a call comes in; we ask the TTS service for a signed
audio URL (POST /v1/synthesize-url, cached after the first call) and answer
with TwiML <Play>. Standard library WSGI server plus the `twilio` helper
library; see README.md beside this file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import make_server

import httpx
from twilio.twiml.voice_response import VoiceResponse

TTS_BASE_URL = os.environ.get("CALLWAITING_TTS_URL", "http://127.0.0.1:8000").rstrip("/")
TTS_API_KEY = os.environ.get("CALLWAITING_TTS_API_KEY", "")
GREETING = os.environ.get("GREETING", "Thanks for calling. Please hold while we connect you.")
VOICE_ID = os.environ.get("VOICE_ID", "")


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


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["REQUEST_METHOD"] != "POST":
        start_response("405 Method Not Allowed", [("Allow", "POST")])
        return [b""]
    size = int(environ.get("CONTENT_LENGTH") or 0)
    form = parse_qs(environ["wsgi.input"].read(size).decode())
    caller = form.get("From", ["caller"])[0]
    print(f"call {form.get('CallSid', ['?'])[0]} from {caller}")
    document = greeting_twiml(GREETING).encode()
    start_response("200 OK", [("Content-Type", "text/xml"), ("Content-Length", str(len(document)))])
    return [document]


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "5050"))
    print(f"Twilio webhook on http://0.0.0.0:{port}/ (TTS at {TTS_BASE_URL})")
    make_server("0.0.0.0", port, application).serve_forever()  # noqa: S104  (Twilio must reach it)
