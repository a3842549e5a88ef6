"""The stream protocol apart from the socket: close codes, protocol errors, message
parsing, when incremental text is ready to speak, and how audio frames are labelled.
docs/streaming.md is the client's description."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from django.conf import settings

from core.bounded_json import bounded_json_loads
from core.errors import ServiceError
from engines.text import SSML_START

# Close codes (documented in docs/streaming.md). Daphne's WebSocket layer (Autobahn) lets a
# server close only with 1000 or 3000-4999, and raises on any other code: the close is never
# sent, and the exception escapes the consumer before its disconnect cleanup. So our reasons
# are 4xxx (4000 + the HTTP status where there is one), and 1011 is never used.
CLOSE_NORMAL = 1000
CLOSE_UNAUTHORIZED = 4001  # no key, a bad one, or none in time
CLOSE_ACCESS_REVOKED = 4003  # the key was revoked or expired, or the tenant deactivated, while open
CLOSE_IDLE = 4008  # nothing sent for WS_IDLE_SECONDS with nothing playing
CLOSE_STREAM_LIMIT = 4029  # the tenant's concurrent streams are all in use
CLOSE_SERVER_ERROR = 4500  # the server failed, or could not verify the key (database unavailable)


def sendable_close_code(code: int) -> bool:
    """Whether Daphne can send `code` (Autobahn's rule for a server's close)."""
    return code == CLOSE_NORMAL or 3000 <= code <= 4999


class SocketClosed(Exception):
    """A send found the socket closed (the client has gone, or its close is under way):
    the connection's work ends; its cleanup still runs."""


# A clause is ready once its closing punctuation is followed by whitespace (the
# LLM has moved on: "3.5" or "e.g." mid-token is not an end), or at a newline.
_CLAUSE_END = re.compile(r"""[.!?;:\u2026\u3002\uff01\uff1f]["')\]]*\s+|\n+""")
# Text without any punctuation is still spoken once it is this long (cut at a
# space), so a run-on LLM reply does not wait for its end.
RUN_ON_CHARS = 200
# An SSML document is spoken whole: its sentences are not cut apart (a part of a document
# is not a document), however its text arrives. A document starts at engines.text's SSML_START.
_SSML_END = re.compile(r"</speak\s*>", re.IGNORECASE)

CONTEXT_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")

# The most audio one WebSocket message carries. Daphne refuses to send a message over
# 1 MiB; a quarter of that is about 2.7 s of 24 kHz PCM, and keeps one slow message
# from holding up the others on the socket. A multiple of 4: 16-bit samples stay whole.
MAX_FRAME_AUDIO_BYTES = 256 * 1024


def ready_pieces(buffer: str, *, final: bool = False, eager: bool = False) -> tuple[list[str], str]:
    """Split buffered text into (pieces ready to speak, text still waiting for more).

    Plain text is ready up to its last clause end (or, run on past RUN_ON_CHARS, its last
    space); an SSML document once it is closed (`</speak>`), as a piece of its own, and the
    plain text before one as soon as the document starts. With `final` (flush or end)
    everything is ready, still in those pieces; with `eager` (a message ended a sentence, in
    a dialect that speaks sentences at once) all plain text is, but never half a document.
    """
    pieces: list[str] = []
    while True:
        ready, buffer = _ready_once(buffer, final=final, eager=eager)
        if not ready:
            return pieces, buffer
        pieces.append(ready)


def _ready_once(buffer: str, *, final: bool, eager: bool) -> tuple[str, str]:
    if (document := SSML_START.search(buffer)) is not None:
        if buffer[: document.start()].strip():
            return buffer[: document.start()], buffer[document.start() :]
        if (closed := _SSML_END.search(buffer, document.start())) is not None:
            return buffer[: closed.end()], buffer[closed.end() :]
        return (buffer, "") if final else ("", buffer)
    if final or eager:
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


class ProtocolError(Exception):
    """A message the protocol does not allow: an `error` event; the connection stays.

    `abort`: the error ends that context (e.g. its text grew too long). `status`: the HTTP
    status the same refusal has on the HTTP routes (dialects that report one show it).
    """

    def __init__(
        self,
        code: str,
        message: str,
        context_id: str | None = None,
        *,
        abort: bool = False,
        status: int = 400,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.context_id = context_id
        self.abort = abort
        self.status = status


def parse_message(text: str) -> dict[str, Any]:
    """A client's text frame as a message, or the ProtocolError that says what is wrong."""
    if len(text.encode()) > settings.WS_MAX_MESSAGE_BYTES:
        raise ProtocolError(
            "message_too_large",
            f"A message is at most {settings.WS_MAX_MESSAGE_BYTES} bytes; it was ignored.",
        )
    try:
        message = bounded_json_loads(text, max_depth=settings.JSON_MAX_DEPTH)
    except ValueError:
        raise ProtocolError("malformed_json", "The message is not valid JSON.") from None
    except ServiceError as exc:  # nested too deep
        raise ProtocolError(exc.code, exc.message) from None
    if not isinstance(message, dict):
        raise ProtocolError("malformed_message", "A message is a JSON object with a `type`.")
    return message


def context_id_of(message: dict[str, Any]) -> str:
    context_id = message.get("context_id")
    if not isinstance(context_id, str) or not CONTEXT_ID.match(context_id):
        raise ProtocolError(
            "invalid_context_id", "`context_id` is 1 to 64 letters, digits or ._:- characters."
        )
    return context_id


def text_of(message: dict[str, Any], context_id: str) -> str:
    text = message.get("text")
    if not isinstance(text, str):
        raise ProtocolError("invalid_message", "`text` must be a string.", context_id)
    return text


def header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None
