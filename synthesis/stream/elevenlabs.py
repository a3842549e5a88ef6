"""ElevenLabs' text-in streaming WebSockets, over the streaming core (connection.py):

    WS /v1/text-to-speech/{voice_id}/stream-input          one context per connection
    WS /v1/text-to-speech/{voice_id}/multi-stream-input    contexts named by `context_id`

Query: `output_format` (pcm_8000 ... pcm_48000, ulaw_8000, mp3_*; mp3_44100_128 by default),
`language_code`, `model_id` (accepted whatever it names), `inactivity_timeout` (seconds, at
most 180; 20 by default), `auto_mode` (a message that ends a sentence is spoken at once),
`sync_alignment` (below).

Key: the `xi-api-key` header (or `Authorization: Bearer`), or `xi-api-key` / `xi_api_key` /
`authorization` in the first message; never in the URL.

Client messages: `{"text": " ", "voice_settings"?, ...}` opens a context; `{"text": "..."}`
adds text, spoken clause by clause (`flush: true` speaks what is buffered now); on
stream-input `{"text": ""}` ends the context, on multi-stream-input it only keeps the
context alive; `{"context_id", "close_context": true}` ends a context: one that was flushed
speaks what it was given and then sends `isFinal` (a framework's end of turn: flush, then
close), one that was not stops at once and sends `isFinal` (a framework's interruption);
`{"close_socket": true}` stops everything and closes.

Server messages: `{"audio": "<base64>", "alignment": {"chars", "charStartTimesMs",
"charDurationsMs"}, "normalizedAlignment": {...}}`, then `{"isFinal": true}`; on
multi-stream-input each carries `contextId`. Alignment always comes in the message of the
audio it describes. Its times are relative to that message's audio (what ElevenLabs' SDK
types say, and what Pipecat, which never asks for `sync_alignment`, adds up), or with
`sync_alignment=true` relative to the start of the context's audio (what LiveKit's plugin,
which always asks for it, reads them as).
Errors: `{"message", "error": "<stable code>"}`; a refused connection
(bad key, unknown voice, bad query) gets its error, then closes (4001 for the key, 4400 for
the voice or query; ElevenLabs' 1008 is not a code Daphne can send).
"""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import parse_qs

from core.errors import ServiceError
from engines.alignment import CharTimings
from synthesis.admission import SynthesisRequest, identifier_problems, invalid_request
from synthesis.elevenlabs_wire import (
    API_KEY_HEADER,
    alignment_ms,
    output_format,
    speed_of,
    voice_settings_checked,
)
from synthesis.services import synthesis_setup
from synthesis.stream.connection import StreamConnection
from synthesis.stream.protocol import (
    CLOSE_NORMAL,
    CLOSE_UNAUTHORIZED,
    CONTEXT_ID,
    ProtocolError,
    frame_pieces,
    header,
)
from synthesis.stream.utterance import Utterance
from tenants.authentication import (
    ApiKeyError,
    bearer_token,
    conflicting_credentials,
    credential_in_query_string,
    credential_value,
)
from usage.recorder import ELEVENLABS_MULTI_STREAM, ELEVENLABS_STREAM

# ElevenLabs closes a refused connection with 1008 (policy violation); Daphne's WebSocket
# layer (Autobahn) lets a server close only with 1000 or 3000-4999, so refusals close with
# our codes (protocol.CLOSE_*): 4001 a bad or missing key, 4003 access revoked, 4008 idle,
# 4029 the tenant's streams all in use, 4500 a server failure, and 4400 a connection whose
# query or voice is refused.
CLOSE_REFUSED = 4400
DEFAULT_INACTIVITY_SECONDS = 20.0
MAX_INACTIVITY_SECONDS = 180.0
SINGLE_CONTEXT = "default"  # stream-input's one context, and multi-stream-input's when none is named
# The most audio one message carries: base64 makes it 4/3 larger, within Daphne's 1 MiB.
MAX_MESSAGE_AUDIO_BYTES = 256 * 1024


class ElevenLabsStreamConsumer(StreamConnection):
    """WS /v1/text-to-speech/{voice_id}/stream-input: one context, no `context_id`s."""

    usage_endpoint = ELEVENLABS_STREAM
    char_timings = True
    multi = False

    async def connected(self) -> None:
        self.voice_id = str(self.scope["url_route"]["kwargs"]["voice_id"])
        self.voice_settings: dict[str, Any] = {}
        self.flushed: set[str] = set()  # open contexts that have been flushed
        self.inactivity_s = DEFAULT_INACTIVITY_SECONDS
        try:
            self._parse_query()
        except ServiceError as exc:
            await self.refuse(CLOSE_REFUSED, exc.code, exc.message, status=exc.status_code)
            return
        authorization = header(self.scope, API_KEY_HEADER.encode()) or self._bearer(
            header(self.scope, b"authorization")
        )
        if authorization:
            await self.authenticate(authorization)
        else:
            self.start_auth_deadline('send the key in the "xi-api-key" header or the first message')

    @staticmethod
    def _bearer(authorization: str | None) -> str | None:
        if authorization is None:
            return None
        try:
            return bearer_token(authorization)
        except ApiKeyError:
            return authorization.strip()  # not Bearer: authentication refuses it as a bad key

    def _parse_query(self) -> None:
        raw = self.scope.get("query_string", b"")
        if credential_in_query_string(raw):
            raise ServiceError(
                401,
                "api_key_in_url",
                "Never put the API key in the URL (URLs end up in logs): send `xi-api-key` as a header "
                "or in the first message.",
            )
        query = {name: values[-1] for name, values in parse_qs(raw.decode("latin-1")).items()}
        self.audio_format, self.sample_rate = output_format(query.get("output_format"))
        self.language = query.get("language_code") or None
        self.eager_text = query.get("auto_mode", "false").lower() == "true"
        self.sync_alignment = query.get("sync_alignment", "false").lower() == "true"
        if "inactivity_timeout" in query:
            try:
                seconds = float(query["inactivity_timeout"])
            except ValueError:
                seconds = -1.0
            if not 1 <= seconds <= MAX_INACTIVITY_SECONDS:
                raise ServiceError(
                    400,
                    "invalid_inactivity_timeout",
                    f"inactivity_timeout is 1 to {MAX_INACTIVITY_SECONDS:g} seconds.",
                )
            self.inactivity_s = seconds

    @property
    def idle_seconds(self) -> float:
        return getattr(self, "inactivity_s", DEFAULT_INACTIVITY_SECONDS)

    async def authenticated(self) -> None:
        # The voice and output are the connection's: checked once, now (an unknown voice or
        # a language the engine does not speak refuses the connection, as ElevenLabs does).
        assert self.principal is not None
        try:
            wanted = self._request()
            if problems := identifier_problems(wanted):
                raise invalid_request(problems)
            await synthesis_setup(
                tenant=self.principal.tenant,
                voice_id=wanted.voice_id,
                language=wanted.language,
                audio_format=wanted.audio_format,
                sample_rate=wanted.sample_rate,
            )
        except ServiceError as exc:
            await self.refuse(CLOSE_REFUSED, exc.code, exc.message, status=exc.status_code)

    def _request(self) -> SynthesisRequest:
        return SynthesisRequest(
            text=None,
            voice_id=self.voice_id,
            language=self.language,
            audio_format=self.audio_format,
            sample_rate=self.sample_rate,
            speed=speed_of(self.voice_settings),
            streaming=True,
        )

    # --- client messages ---

    async def handle(self, message: dict[str, Any]) -> None:
        if self.principal is None:
            key = (
                message.get("xi-api-key")
                or message.get("xi_api_key")
                or self._bearer(message.get("authorization"))
            )
            if not isinstance(key, str) or not key:
                raise ProtocolError(
                    "auth_required",
                    'Send the key first: the "xi-api-key" header or field of the first message.',
                )
            await self.authenticate(key)
            if self.principal is None or self._closing:
                return
        elif (
            isinstance(again := message.get("xi-api-key") or message.get("xi_api_key"), str)
            and again.strip()
            and credential_value(again) != self.key_used
        ):
            # A second credential on an authenticated socket: refused, never ignored.
            error = conflicting_credentials()
            await self.refuse(CLOSE_UNAUTHORIZED, error.code, error.message, status=error.status_code)
            return
        if message.get("close_socket") is True:
            await self.close_all()
            return
        context_id = self._context_id_of(message)
        if message.get("keep_alive") is True:
            return  # `{"context_id", "keep_alive": true}`: only resets the inactivity clock
        text = message.get("text")
        if text is not None and not isinstance(text, str):
            raise ProtocolError("invalid_message", "`text` must be a string.", context_id)
        if message.get("close_context") is True:
            if (utterance := self.utterances.get(context_id)) is not None and not utterance.ended:
                if context_id in self.flushed:
                    utterance.buffer = ""  # what was flushed is still spoken; nothing after it
                    await self._end_input(utterance)
                else:
                    await self.cancel_utterance(utterance)  # never flushed: stop at once (barge-in)
            return
        # Checked wherever they come (a bad value is the client's mistake, said at once);
        # used by the context they open.
        try:
            settings_given = voice_settings_checked(message.get("voice_settings"))
        except ServiceError as exc:
            raise ProtocolError(exc.code, exc.message, context_id, status=exc.status_code) from exc
        utterance = self.utterances.get(context_id)
        if text == "" and not message.get("flush"):
            if not self.multi and utterance is not None and not utterance.ended:
                await self._end_input(utterance)  # stream-input's end of input
            return  # multi-stream-input: a keep-alive
        if utterance is None or utterance.ended:
            if utterance is not None:
                raise ProtocolError("context_ended", f"Context {context_id!r} is closing.", context_id)
            if settings_given:
                self.voice_settings = settings_given
            utterance = await self.open_utterance(context_id, self._request)
        if text:
            utterance.add_text(text)
        if message.get("flush") is True:
            utterance.add_text("", final=True)
            self.flushed.add(context_id)

    async def _end_input(self, utterance: Utterance) -> None:
        """No more text: speak what is queued, then `isFinal`; a context that was given nothing
        to say (opened, then closed: an interruption before any text) just ends, cancelled."""
        if utterance.queued or utterance.buffer.strip():
            utterance.end()
        else:
            await self.cancel_utterance(utterance)

    def _context_id_of(self, message: dict[str, Any]) -> str:
        if not self.multi:
            return SINGLE_CONTEXT
        context_id = message.get("context_id", SINGLE_CONTEXT)
        if not isinstance(context_id, str) or not CONTEXT_ID.match(context_id):
            raise ProtocolError(
                "invalid_context_id", "`context_id` is 1 to 64 letters, digits or ._:- characters."
            )
        return context_id

    # --- server messages ---

    def _with_context(self, context_id: str | None, body: dict[str, Any]) -> str:
        if self.multi and context_id is not None:
            body["contextId"] = context_id
        return json.dumps(body)

    async def send_audio(
        self, utterance: Utterance, data: bytes, timings: CharTimings | None, *, final: bool
    ) -> None:
        start_s, end_s = utterance.chunk_start_s, utterance.sent_until_s
        pieces = list(frame_pieces(data, MAX_MESSAGE_AUDIO_BYTES)) or [b""]
        offset = 0
        for piece in pieces:
            if not piece and not timings:
                continue
            # A piece's share of the chunk's time, and the characters that start within it.
            piece_start_ms = round((start_s + (end_s - start_s) * offset / max(len(data), 1)) * 1000)
            offset += len(piece)
            piece_end_ms = round((start_s + (end_s - start_s) * offset / max(len(data), 1)) * 1000)
            mine = CharTimings()
            if timings:
                last = piece is pieces[-1]
                for char, start, duration in zip(
                    timings.chars, timings.starts_ms, timings.durations_ms, strict=True
                ):
                    if piece_start_ms <= start < piece_end_ms or (last and start >= piece_end_ms):
                        mine.chars.append(char)
                        mine.starts_ms.append(start)
                        mine.durations_ms.append(duration)
            alignment = alignment_ms(mine, 0 if self.sync_alignment else piece_start_ms) if mine else None
            body = {
                "audio": base64.b64encode(piece).decode("ascii"),
                "alignment": alignment,
                "normalizedAlignment": alignment,
            }
            await self.send(text_data=self._with_context(utterance.context_id, body))

    async def send_end(self, utterance: Utterance, *, cancelled: bool) -> None:
        self.flushed.discard(utterance.context_id)
        await self.send(text_data=self._with_context(utterance.context_id, {"isFinal": True}))
        if not self.multi and not self._closing:
            # stream-input is one context: the connection ends with it.
            await self.close(code=CLOSE_NORMAL)

    async def send_error(
        self,
        context_id: str | None,
        code: str,
        message: str,
        *,
        request_id: str | None = None,
        status: int = 400,
    ) -> None:
        body: dict[str, Any] = {"message": message, "error": code}
        if request_id is not None:
            body["request_id"] = request_id
        await self.send(text_data=self._with_context(context_id, body))


class ElevenLabsMultiStreamConsumer(ElevenLabsStreamConsumer):
    """WS /v1/text-to-speech/{voice_id}/multi-stream-input: contexts named by `context_id`."""

    usage_endpoint = ELEVENLABS_MULTI_STREAM
    multi = True
