"""The pieces of the WebSocket stream protocol that are not about the socket itself:
where incremental text is ready to speak, how audio frames are labelled, Twilio
framing, and flow control from Daphne's socket buffer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

# A clause is ready once its closing punctuation is followed by whitespace (the
# LLM has moved on: "3.5" or "e.g." mid-token is not an end), or at a newline.
_CLAUSE_END = re.compile(r"""[.!?;:\u2026\u3002\uff01\uff1f]["')\]]*\s+|\n+""")
# Text without any punctuation is still spoken once it is this long (cut at a
# space), so a run-on LLM reply does not wait for its end.
RUN_ON_CHARS = 200

CONTEXT_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")

# The most audio one WebSocket message carries. Daphne refuses to send a message over
# 1 MiB; a quarter of that is about 2.7 s of 24 kHz PCM, and keeps one slow message
# from holding up the others on the socket. A multiple of 4: 16-bit samples stay whole.
MAX_FRAME_AUDIO_BYTES = 256 * 1024

# Twilio plays 8 kHz mu-law in 20 ms frames: 160 bytes.
TWILIO_FRAME_BYTES = 160
MULAW_SILENCE = b"\xff"


def ready_text(buffer: str, *, final: bool = False) -> tuple[str, str]:
    """Split buffered text into (ready to speak, still waiting for more).

    With `final` (flush or end) everything is ready.
    """
    if final:
        return buffer, ""
    last_end = 0
    for match in _CLAUSE_END.finditer(buffer):
        last_end = match.end()
    if last_end:
        return buffer[:last_end], buffer[last_end:]
    if len(buffer) >= RUN_ON_CHARS:
        cut = buffer.rfind(" ", 0, RUN_ON_CHARS)
        if cut > 0:
            return buffer[: cut + 1], buffer[cut + 1 :]
    return "", buffer


def labelled_frame(context_id: str, audio: bytes) -> bytes:
    """A binary audio frame: one byte giving the context id's length, the id (ASCII), the audio."""
    label = context_id.encode("ascii")
    return bytes((len(label),)) + label + audio


def frame_pieces(audio: bytes, limit: int = MAX_FRAME_AUDIO_BYTES) -> Iterator[bytes]:
    """Audio cut into pieces of at most `limit` bytes, one per message."""
    for start in range(0, len(audio), limit):
        yield audio[start : start + limit]


def parse_labelled_frame(frame: bytes) -> tuple[str, bytes]:
    """The inverse of labelled_frame (for clients and tests)."""
    length = frame[0]
    return frame[1 : 1 + length].decode("ascii"), frame[1 + length :]


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


@dataclass
class StreamStats:
    """This process's WebSocket streams, for /v1/health (and metrics)."""

    connections: int = 0
    http_streams: int = 0  # streamed /v1/synthesize responses in progress
    utterances_active: int = 0
    paused_for_slow_reader: int = 0
    pauses_total: int = 0


stream_stats = StreamStats()


class TransportFlow:
    """Backpressure from the socket: Daphne writes through Twisted, which asks a
    registered push producer to pause when the connection's write buffer is full
    and to resume when it drains. Senders wait for `writable` before each frame,
    so a client that reads slowly pauses generation instead of growing memory.

    Under servers other than Daphne (or in tests with WebsocketCommunicator)
    there is no transport to register with and sending never waits.
    """

    def __init__(self) -> None:
        self._writable = asyncio.Event()
        self._writable.set()
        self._protocol: Any = None

    def attach(self, send: Any) -> bool:
        # Daphne gives each connection `partial(server.handle_reply, protocol)`;
        # its protocol is an Autobahn WebSocket protocol, which takes producers.
        protocol: Any = send.args[0] if isinstance(send, partial) and send.args else None
        transport = getattr(protocol, "transport", None)
        if transport is None or not hasattr(protocol, "registerProducer"):
            return False
        # Twisted's HTTP channel registered itself when the connection opened and
        # stays registered after the upgrade to WebSocket; as producer it would
        # stop *reading* when output backs up (and so miss a `cancel`). Take its place.
        if getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        protocol.registerProducer(self, True)
        self._protocol = protocol
        return True

    def detach(self) -> None:
        if self._protocol is not None:
            protocol, self._protocol = self._protocol, None
            if getattr(protocol, "transport", None) is not None and protocol.transport.producer is self:
                protocol.unregisterProducer()
        self._writable.set()

    async def writable(self) -> None:
        if self._writable.is_set():
            return
        stream_stats.paused_for_slow_reader += 1
        stream_stats.pauses_total += 1
        try:
            await self._writable.wait()
        finally:
            stream_stats.paused_for_slow_reader -= 1

    # IPushProducer, called by Twisted on the event loop's thread.
    def pauseProducing(self) -> None:
        self._writable.clear()

    def resumeProducing(self) -> None:
        self._writable.set()

    def stopProducing(self) -> None:
        self._writable.set()  # the connection is gone: let senders run into the closed socket
