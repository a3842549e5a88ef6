"""Twilio Media Streams framing: what an agent forwards to Twilio as it is."""

from __future__ import annotations

import base64
import json

# Twilio plays 8 kHz mu-law in 20 ms frames: 160 bytes.
TWILIO_FRAME_BYTES = 160
MULAW_SILENCE = b"\xff"
TWILIO = "twilio"  # the `format` that asks for this framing


class TwilioFramer:
    """Cuts a mu-law byte stream into Twilio Media Streams `media` messages of
    whole 20 ms frames; the tail of an utterance is padded with silence."""

    def __init__(self, stream_sid: str) -> None:
        self.stream_sid = stream_sid
        self._pending = b""

    def media(self, audio: bytes, *, final: bool = False) -> str | None:
        data = self._pending + audio
        if final and len(data) % TWILIO_FRAME_BYTES:
            data += MULAW_SILENCE * (TWILIO_FRAME_BYTES - len(data) % TWILIO_FRAME_BYTES)
        whole = len(data) - len(data) % TWILIO_FRAME_BYTES
        self._pending = data[whole:]
        if not whole:
            return None
        payload = base64.b64encode(data[:whole]).decode("ascii")
        return json.dumps({"event": "media", "streamSid": self.stream_sid, "media": {"payload": payload}})

    def mark(self, name: str) -> str:
        return json.dumps({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})

    def clear(self) -> str:
        self._pending = b""
        return json.dumps({"event": "clear", "streamSid": self.stream_sid})
