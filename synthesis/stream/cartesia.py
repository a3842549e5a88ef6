"""Cartesia's TTS WebSocket, over the streaming core (connection.py), so that Cartesia
clients (Pipecat's CartesiaTTSService) work against this service by changing the URL:

    WS /tts/websocket   (and /v1/tts/websocket)

Key: the `X-API-Key` header (or `Authorization: Bearer`), never in the URL (Cartesia's
`?api_key=` is refused: URLs end up in logs). `Cartesia-Version` is accepted whatever it says.

Client messages: a generation request `{"context_id", "transcript", "continue",
"voice": {"mode": "id", "id": "<our voice id>"}, "output_format": {"container": "raw",
"encoding": "pcm_s16le" | "pcm_mulaw", "sample_rate"}, "language"?, "model_id"?,
"add_timestamps"?}`: the first for a `context_id` opens it (its voice, language and output
are the context's), later ones add their transcript; `continue: false` ends the context.
A transcript that ends a sentence is spoken at once; `flush: true` speaks what the context
holds now (the rest of a sentence included). `{"context_id", "cancel": true}` stops a context
at once (barge-in).

Server messages: `{"type": "chunk", "data": "<base64>", "context_id", "done": false,
"status_code": 206}`; with `add_timestamps`, `{"type": "timestamps", "word_timestamps":
{"words", "start", "end"}, ...}` (seconds from the start of the context's audio, estimated:
engines.alignment); `{"type": "done", "done": true, "status_code": 200, "context_id"}` once
a context has ended (cancelled or not); errors `{"type": "error", "error": "<message>",
"code": "<stable code>", "status_code", "done": true, "context_id"}`.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from core.errors import ServiceError
from engines.alignment import CharTimings
from synthesis.admission import SynthesisRequest
from synthesis.stream.connection import StreamConnection
from synthesis.stream.protocol import (
    CLOSE_UNAUTHORIZED,
    ProtocolError,
    context_id_of,
    frame_pieces,
    header,
)
from synthesis.stream.utterance import Utterance
from tenants.authentication import ApiKeyError, bearer_token, credential_in_query_string
from usage.recorder import CARTESIA_STREAM

ENCODINGS = {"pcm_s16le": "pcm", "pcm_mulaw": "mulaw"}


@dataclass
class _Words:
    """A context's word timestamps as its characters' timings arrive: a word is sent once
    the character after it (a space) or the context's end shows it complete."""

    wanted: bool
    word: str = ""
    start_ms: int = 0
    end_ms: int = 0

    def take(self, timings: CharTimings, *, final: bool) -> dict[str, list[Any]]:
        words: list[str] = []
        starts: list[float] = []
        ends: list[float] = []

        def close_word() -> None:
            if self.word:
                words.append(self.word)
                starts.append(self.start_ms / 1000)
                ends.append(self.end_ms / 1000)
            self.word = ""

        for char, start, duration in zip(timings.chars, timings.starts_ms, timings.durations_ms, strict=True):
            if char.isspace():
                close_word()
                continue
            if not self.word:
                self.start_ms = start
            self.word += char
            self.end_ms = start + duration
        if final:
            close_word()
        return {"words": words, "start": starts, "end": ends}


class CartesiaStreamConsumer(StreamConnection):
    usage_endpoint = CARTESIA_STREAM
    char_timings = True
    eager_text = True

    async def connected(self) -> None:
        self.words: dict[str, _Words] = {}
        if credential_in_query_string(self.scope.get("query_string", b"")):
            await self.refuse(
                CLOSE_UNAUTHORIZED,
                "api_key_in_url",
                "Never put the API key in the URL (URLs end up in logs): send it as the X-API-Key header.",
            )
            return
        key = header(self.scope, b"x-api-key")
        if key is None:
            try:
                key = bearer_token(header(self.scope, b"authorization"))
            except ApiKeyError as exc:
                await self.refuse(
                    CLOSE_UNAUTHORIZED, exc.code, "Send your API key as the X-API-Key header.", status=401
                )
                return
        await self.authenticate(key)

    # --- client messages ---

    async def handle(self, message: dict[str, Any]) -> None:
        context_id = context_id_of(message)
        utterance = self.utterances.get(context_id)
        if message.get("cancel") is True:
            if utterance is not None:
                await self.cancel_utterance(utterance)
            return  # a context that has already ended: nothing to stop
        transcript = message.get("transcript", "")
        if not isinstance(transcript, str):
            raise ProtocolError("invalid_message", "`transcript` must be a string.", context_id)
        more = message.get("continue", False)
        flush = message.get("flush", False)
        for name, value in (("continue", more), ("flush", flush)):
            if not isinstance(value, bool):
                raise ProtocolError("invalid_message", f"`{name}` must be true or false.", context_id)
        if utterance is None:
            if not transcript and not more:
                return  # ending a context that never opened (or has ended): nothing to say
            utterance = await self.open_utterance(context_id, lambda: _request(message))
            self.words[context_id] = _Words(wanted=message.get("add_timestamps") is True)
        elif utterance.ended:
            raise ProtocolError("context_ended", f"Context {context_id!r} has ended.", context_id)
        if transcript:
            utterance.add_text(transcript)
        if flush and more:
            utterance.add_text("", final=True)  # speak what is buffered now, mid-sentence or not
        if not more:
            if utterance.queued or utterance.buffer.strip():
                utterance.end()
            else:
                await self.cancel_utterance(utterance)

    # --- server messages ---

    async def send_audio(
        self, utterance: Utterance, data: bytes, timings: CharTimings | None, *, final: bool
    ) -> None:
        context_id = utterance.context_id
        for piece in frame_pieces(data):
            await self._send(
                {
                    "type": "chunk",
                    "data": base64.b64encode(piece).decode("ascii"),
                    "done": False,
                    "status_code": 206,
                    "context_id": context_id,
                }
            )
        words = self.words.get(context_id)
        if words is not None and words.wanted and (timings or final):
            taken = words.take(timings or CharTimings(), final=final)
            if taken["words"]:
                await self._send(
                    {
                        "type": "timestamps",
                        "word_timestamps": taken,
                        "done": False,
                        "status_code": 206,
                        "context_id": context_id,
                    }
                )

    async def send_end(self, utterance: Utterance, *, cancelled: bool) -> None:
        self.words.pop(utterance.context_id, None)
        await self._send(
            {"type": "done", "done": True, "status_code": 200, "context_id": utterance.context_id}
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
        body: dict[str, Any] = {
            "type": "error",
            "error": message,
            "code": code,
            "status_code": status,
            "done": True,
            "context_id": context_id,
        }
        if request_id is not None:
            body["request_id"] = request_id
        await self._send(body)

    async def _send(self, body: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(body))


def _request(message: dict[str, Any]) -> SynthesisRequest:
    """A generation request's voice, language and output as ours; raises ServiceError."""
    voice = message.get("voice")
    if not isinstance(voice, dict) or voice.get("mode", "id") != "id" or not isinstance(voice.get("id"), str):
        raise ServiceError(
            400, "invalid_voice", '`voice` is {"mode": "id", "id": "<voice id>"} (GET /v1/voices lists them).'
        )
    output = message.get("output_format")
    if not isinstance(output, dict):
        raise ServiceError(400, "invalid_output_format", "`output_format` is required.")
    encoding = output.get("encoding")
    if output.get("container", "raw") != "raw" or encoding not in ENCODINGS:
        raise ServiceError(
            400,
            "unsupported_format",
            f'`output_format` is {{"container": "raw", "encoding": one of {", ".join(ENCODINGS)}}}.',
        )
    sample_rate = output.get("sample_rate")
    if sample_rate is not None and (not isinstance(sample_rate, int) or isinstance(sample_rate, bool)):
        raise ServiceError(400, "unsupported_sample_rate", "`sample_rate` must be a number of Hz.")
    language = message.get("language")
    if language is not None and not isinstance(language, str):
        raise ServiceError(400, "invalid_request", "`language` must be a string.")
    return SynthesisRequest(
        text=None,
        voice_id=voice["id"],
        language=language or None,
        audio_format=ENCODINGS[encoding],
        sample_rate=sample_rate,
        streaming=True,
    )
