"""WS /v1/stream: text in as an LLM writes it, audio out as the engine makes it.

The native dialect over the streaming core (connection.StreamConnection, which owns
authentication, the stream lease, access re-checks, the idle watchdog and the utterances'
admission, limits, usage rows and cancellation): this module parses its messages (open,
feed, end and cancel utterances) and draws its events and labelled binary audio frames.
The rest of the package: protocol.py (messages, frames, close codes), utterance.py (the
engine -> encoder -> socket loop), twilio.py, flow.py (a slow reader pauses generation),
access.py (the live key re-check), stats.py; elevenlabs.py and cartesia.py are the other
dialects. docs/streaming.md is the client's description.

A connection holds one of its tenant's stream slots while open; every utterance is a
request for rate limits, quotas and usage rows (synthesis.admission).
"""

from __future__ import annotations

import json
from typing import Any

from core.errors import ServiceError
from engines.alignment import CharTimings
from engines.text import is_speakable
from synthesis.admission import utterance_request
from synthesis.stream.connection import StreamConnection
from synthesis.stream.protocol import (
    CLOSE_UNAUTHORIZED,
    ProtocolError,
    context_id_of,
    frame_pieces,
    header,
    labelled_frame,
    text_of,
)
from synthesis.stream.twilio import TWILIO, TwilioFramer
from synthesis.stream.utterance import Utterance
from tenants.authentication import (
    ApiKeyError,
    bearer_token,
    conflicting_credentials,
    credential_in_query_string,
    credential_value,
)
from usage.recorder import STREAM


class StreamConsumer(StreamConnection):
    usage_endpoint = STREAM

    async def connected(self) -> None:
        if credential_in_query_string(self.scope.get("query_string", b"")):
            await self.refuse(
                CLOSE_UNAUTHORIZED,
                "api_key_in_url",
                "Never put the API key in the URL (URLs end up in logs): send it in the Authorization "
                "header or as the first message.",
            )
            return
        authorization = header(self.scope, b"authorization")
        if authorization is None:
            self.start_auth_deadline('{"type": "auth", "api_key": ...}')
            return
        try:
            key = bearer_token(authorization)
        except ApiKeyError as exc:
            await self.refuse(CLOSE_UNAUTHORIZED, exc.code, exc.message)
            return
        await self.authenticate(key)

    async def authenticated(self) -> None:
        await self.send_event("ready", None, connection_id=self.connection_id)

    async def handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if self.principal is None:
            if kind != "auth":
                raise ProtocolError("auth_required", 'Authenticate first: {"type": "auth", "api_key": ...}.')
            await self._on_auth(message)
            return
        if kind == "auth":
            await self._on_auth_again(message)
            return
        handler = self._handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            raise ProtocolError(
                "unknown_type",
                f"Unknown message type {kind!r}; one of: {', '.join(sorted(self._handlers))}.",
            )
        await handler(self, message)

    async def _on_auth(self, message: dict[str, Any]) -> None:
        key = message.get("api_key")
        if not isinstance(key, str) or not key:
            raise ProtocolError("missing_api_key", "`api_key` must be your API key.")
        await self.authenticate(key)

    async def _on_auth_again(self, message: dict[str, Any]) -> None:
        """A second `auth` on an authenticated socket: another credential is refused (which
        would bill is nobody's guess), the same one is only pointless."""
        key = message.get("api_key")
        if isinstance(key, str) and key and credential_value(key) != self.key_used:
            error = conflicting_credentials()
            await self.refuse(CLOSE_UNAUTHORIZED, error.code, error.message, status=error.status_code)
            return
        raise ProtocolError("already_authenticated", "This socket is authenticated already.")

    def _utterance(self, message: dict[str, Any]) -> Utterance:
        context_id = context_id_of(message)
        utterance = self.utterances.get(context_id)
        if utterance is None:
            raise ProtocolError(
                "unknown_context", f"No open context {context_id!r}; send `start` first.", context_id
            )
        return utterance

    async def _on_start(self, message: dict[str, Any]) -> Utterance:
        context_id = context_id_of(message)
        twilio = message.get("format") == TWILIO

        def framer() -> TwilioFramer:
            stream_sid = message.get("stream_sid")
            if not isinstance(stream_sid, str) or not stream_sid:
                raise ServiceError(
                    400, "missing_stream_sid", 'format "twilio" needs the call\'s `stream_sid`.'
                )
            return TwilioFramer(stream_sid)

        return await self.open_utterance(
            context_id,
            lambda: utterance_request(message, twilio=twilio),
            twilio=framer if twilio else None,
            format_label=TWILIO if twilio else None,
        )

    async def _on_text(self, message: dict[str, Any]) -> None:
        utterance = self._utterance(message)
        self._open(utterance).add_text(text_of(message, utterance.context_id))

    async def _on_flush(self, message: dict[str, Any]) -> None:
        utterance = self._utterance(message)
        self._open(utterance).add_text("", final=True)

    async def _on_end(self, message: dict[str, Any]) -> None:
        self._open(self._utterance(message)).end()

    async def _on_cancel(self, message: dict[str, Any]) -> None:
        await self.cancel_utterance(self._utterance(message))

    async def _on_synthesize(self, message: dict[str, Any]) -> None:
        context_id = context_id_of(message)
        text = text_of(message, context_id)
        if not is_speakable(text):
            raise ProtocolError(
                "empty_text", "`text` has nothing to say: it needs at least one letter or digit.", context_id
            )
        utterance = await self._on_start(message)
        utterance.add_text(text)
        utterance.end()

    @staticmethod
    def _open(utterance: Utterance) -> Utterance:
        if utterance.ended:
            raise ProtocolError(
                "context_ended",
                f"Context {utterance.context_id!r} has ended; start a new one.",
                utterance.context_id,
            )
        return utterance

    _handlers: dict[str, Any] = {
        "start": _on_start,
        "text": _on_text,
        "flush": _on_flush,
        "end": _on_end,
        "cancel": _on_cancel,
        "synthesize": _on_synthesize,
    }

    # --- what the client receives ---

    async def send_audio(
        self, utterance: Utterance, data: bytes, timings: CharTimings | None, *, final: bool
    ) -> None:
        twilio = utterance.twilio
        if not utterance.started_audio and data:
            utterance.started_audio = True
            await self.send_event(
                "audio_start",
                utterance.context_id,
                request_id=utterance.request_id,
                format=TWILIO if twilio else utterance.setup.spec.format.value,
                sample_rate=utterance.setup.spec.sample_rate,
            )
        # An engine chunk can be larger than the server sends in one message: cut it.
        pieces = list(frame_pieces(data)) or [b""]
        for index, piece in enumerate(pieces):
            if twilio is not None:
                message = twilio.media(piece, final=final and index == len(pieces) - 1)
                if message is not None:
                    await self.send(text_data=message)
            elif piece:
                await self.send(bytes_data=labelled_frame(utterance.context_id, piece))

    async def send_end(self, utterance: Utterance, *, cancelled: bool) -> None:
        if utterance.twilio is not None:
            # A cancelled call's buffered audio is dropped (barge-in); a finished one is marked.
            await self.send(
                text_data=utterance.twilio.clear()
                if cancelled
                else utterance.twilio.mark(utterance.context_id)
            )
        meter = utterance.meter
        await self.send_event(
            "audio_end",
            utterance.context_id,
            request_id=utterance.request_id,
            cancelled=cancelled,
            audio_bytes=meter.audio_bytes,
            audio_seconds=round(meter.audio_seconds, 4),
        )

    async def send_error(
        self,
        context_id: str | None,
        code: str,
        message: str,
        *,
        request_id: str | None = None,
        status: int = 400,
    ) -> None:
        fields: dict[str, Any] = {"code": code, "message": message}
        if request_id is not None:
            fields = {"request_id": request_id, **fields}
        await self.send_event("error", context_id, **fields)

    async def send_event(self, kind: str, context_id: str | None, **fields: Any) -> None:
        await self.send(text_data=json.dumps({"type": kind, "context_id": context_id, **fields}))
