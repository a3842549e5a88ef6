"""WS /v1/stream: text in as an LLM writes it, audio out as the engine makes it.

The protocol (README "Streaming over WebSocket" is the user's description):

- authenticate with `Authorization: Bearer` on the handshake, or a first message
  `{"type": "auth", "api_key": ...}` within WS_AUTH_SECONDS; then `ready`;
- utterances, each named by the client's `context_id`: `start`, `text`
  pieces (spoken clause by clause as they complete), `flush`, `end`, `cancel`,
  or `synthesize` (all in one);
- audio as binary frames labelled with their context id (synthesis/streaming.py),
  or, with `"format": "twilio"`, Twilio Media Streams JSON ready to forward;
- events `ready`, `audio_start`, `audio_end`, `error` as JSON text frames.

A connection holds one of its tenant's stream slots while open; every
utterance is a request for rate limits, quotas and usage rows.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import suppress
from typing import Any, NoReturn

from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from core.errors import ServiceError, database_unavailable
from engines import EngineFailure, EngineOverloaded
from synthesis.audio import AudioEncoder
from synthesis.services import SynthesisSetup, synthesis_setup
from synthesis.streaming import (
    CONTEXT_ID,
    TransportFlow,
    TwilioFramer,
    frame_pieces,
    labelled_frame,
    ready_text,
    stream_stats,
)
from tenants.authentication import ApiKeyError, Principal, aauthenticate_token, bearer_token
from tenants.limits import StreamLease, arate_limit_check, stream_lease_acquire
from tenants.models import KEY_REVOKED, ApiKey
from tenants.services import tenant_access_group
from usage.quotas import quota_check
from usage.recorder import CANCELLED, CLIENT_DISCONNECTED, STREAM, UsageMeter

logger = logging.getLogger(__name__)

# Close codes (documented in the README).
CLOSE_UNAUTHORIZED = 4001  # no key, a bad one, or none in time
CLOSE_ACCESS_REVOKED = 4003  # the key was revoked or expired, or the tenant deactivated, while open
CLOSE_IDLE = 4008  # nothing sent for WS_IDLE_SECONDS with nothing playing
CLOSE_STREAM_LIMIT = 4029  # the tenant's concurrent streams are all in use
CLOSE_SERVER_ERROR = 1011

TWILIO = "twilio"

# The fields of `start` (and `synthesize`): accepted types; None means optional.
_START_FIELDS: dict[str, tuple[type, ...]] = {
    "voice_id": (str,),
    "language": (str,),
    "format": (str,),
    "sample_rate": (int,),
    "speed": (int, float),
    "stream_sid": (str,),
}


class ProtocolError(Exception):
    """A message the protocol does not allow: an `error` event; the connection stays.

    `abort`: the error ends that context (e.g. its text grew too long).
    """

    def __init__(
        self, code: str, message: str, context_id: str | None = None, *, abort: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.context_id = context_id
        self.abort = abort


class Utterance:
    """One context: its text arrives in pieces; its audio is one continuous stream."""

    def __init__(
        self,
        consumer: StreamConsumer,
        context_id: str,
        setup: SynthesisSetup,
        meter: UsageMeter,
        twilio: TwilioFramer | None,
    ) -> None:
        self.consumer = consumer
        self.context_id = context_id
        self.setup = setup
        self.meter = meter
        self.twilio = twilio
        self.buffer = ""
        self.chars = 0
        self.ended = False
        self.encoder = AudioEncoder(setup.spec, setup.engine.sample_rate, streaming=True)
        self.pieces: asyncio.Queue[str | None] = asyncio.Queue()
        self.started_audio = False
        self.task = asyncio.create_task(self._run(), name=f"utterance {context_id}")

    @property
    def request_id(self) -> str:
        return self.meter.request_id

    def add_text(self, text: str, *, final: bool = False) -> None:
        self.chars += len(text)
        self.meter.input_chars = self.chars
        if self.chars > settings.MAX_TEXT_CHARS:
            raise ProtocolError(
                "text_too_long",
                f"An utterance holds at most {settings.MAX_TEXT_CHARS} characters; this one is cancelled.",
                self.context_id,
                abort=True,
            )
        ready, self.buffer = ready_text(self.buffer + text, final=final)
        if ready.strip():
            self.pieces.put_nowait(ready)

    def end(self) -> None:
        self.add_text("", final=True)
        self.ended = True
        self.pieces.put_nowait(None)

    async def _run(self) -> None:
        try:
            while (text := await self.pieces.get()) is not None:
                try:
                    plan = self.setup.plan(text)
                except ServiceError as exc:
                    if exc.code == "empty_text":  # a piece of only punctuation or markup
                        continue
                    raise
                engine_stream = plan.engine.stream(plan.job)
                try:
                    async for chunk in engine_stream:
                        await self._send_audio(self.encoder.push(chunk))
                finally:
                    await engine_stream.aclose()  # type: ignore[attr-defined]
            await self._send_audio(self.encoder.finish(), final=True)
        except Exception as exc:
            # Whatever failed (text, engine, encoder, the transport), the utterance ends
            # here with its error event and usage row; the connection stays.
            error = _as_api_error(exc)
            if error.status_code >= 500 and error.code != "engine_overloaded":
                logger.exception("Utterance %s failed", self.request_id)
            await self.consumer.utterance_failed(self, error.status_code, error.code, error.message)
        else:
            await self.consumer.utterance_finished(self)

    async def _send_audio(self, data: bytes, *, final: bool = False) -> None:
        if not data and not (final and self.twilio is not None):
            return
        # A slow reader: wait here, so the engine (whose queue is bounded) waits too.
        await self.consumer.flow.writable()
        if not self.started_audio and data:
            self.started_audio = True
            await self.consumer.send_event(
                "audio_start",
                self.context_id,
                request_id=self.request_id,
                format=TWILIO if self.twilio else self.setup.spec.format.value,
                sample_rate=self.setup.spec.sample_rate,
            )
        # An engine chunk can be larger than the server sends in one message: cut it.
        pieces = list(frame_pieces(data)) or [b""]
        for index, piece in enumerate(pieces):
            if self.twilio is not None:
                message = self.twilio.media(piece, final=final and index == len(pieces) - 1)
                if message is not None:
                    await self.consumer.send(text_data=message)
            else:
                await self.consumer.send(bytes_data=labelled_frame(self.context_id, piece))
            self.meter.audio_sent(len(piece), self.encoder.duration_s)

    async def stop(self) -> None:
        """Stop generating and sending: when this returns, no more audio of it goes out.
        Never raises: whatever the task ended with has been reported by the task."""
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("Utterance %s ended with an error while stopping", self.request_id)


class StreamConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]  # channels ships no types
    principal: Principal | None = None
    lease: StreamLease | None = None

    # --- connection ---

    async def connect(self) -> None:
        self.flow = TransportFlow()
        self.utterances: dict[str, Utterance] = {}
        self.last_activity = time.monotonic()
        self.connection_id = uuid.uuid4().hex
        self._background: list[asyncio.Task[None]] = []
        self._closing = False
        await self.accept()
        self.flow.attach(self.base_send)
        stream_stats.connections += 1
        if _key_in_query_string(self.scope.get("query_string", b"")):
            await self._refuse(
                CLOSE_UNAUTHORIZED,
                "api_key_in_url",
                "Never put the API key in the URL (URLs end up in logs): send it in the Authorization "
                "header or as the first message.",
            )
            return
        authorization = _header(self.scope, b"authorization")
        if authorization is not None:
            await self._authenticate(authorization)
        else:
            self._background.append(asyncio.create_task(self._auth_deadline()))
        self._background.append(asyncio.create_task(self._idle_watchdog()))

    async def dispatch(self, message: dict[str, Any]) -> None:
        # An exception that escaped here would end the application: Daphne closes the
        # socket (1011) and never delivers the disconnect, so nothing would be released.
        try:
            # Channels closes stale database connections (a thread hop) before every
            # message; frames of text need no database, so only the rest pay for it.
            if message.get("type") == "websocket.receive":
                await self.websocket_receive(message)
            else:
                await super().dispatch(message)
        except StopConsumer:
            raise
        except Exception:
            logger.exception("WebSocket handler for %r failed", message.get("type"))
            if message.get("type") == "websocket.disconnect":
                raise StopConsumer() from None  # the cleanup has had its turn; end
            await self._refuse(CLOSE_SERVER_ERROR, "internal_error", "The server failed; reconnect.")

    async def disconnect(self, code: int) -> None:
        # Every step runs whatever an earlier one raised: a leaked lease or counter
        # would outlive the connection (a tenant refused streams it does not hold).
        self._closing = True
        try:
            for task in self._background:
                task.cancel()
            for utterance in list(self.utterances.values()):
                await self._end_utterance(utterance, 200, CLIENT_DISCONNECTED)
        finally:
            try:
                if self.lease is not None:
                    await self.lease.release()
            finally:
                self.flow.detach()
                stream_stats.connections -= 1
                if self.principal is not None and self.channel_layer is not None:
                    with suppress(Exception):
                        await self.channel_layer.group_discard(
                            tenant_access_group(self.principal.tenant.id), self.channel_name
                        )

    async def _end_utterance(self, utterance: Utterance, status: int, code: str) -> None:
        """Stop an utterance from outside its task and record how it ended."""
        await utterance.stop()
        self._forget(utterance)
        utterance.meter.finish(status, code)

    async def _refuse(self, close_code: int, code: str, message: str) -> None:
        await self.send_event("error", None, code=code, message=message)
        await self.close(code=close_code)

    async def _authenticate(self, authorization: str) -> None:
        try:
            principal = await aauthenticate_token(bearer_token(authorization))
        except ApiKeyError as exc:
            await self._refuse(CLOSE_UNAUTHORIZED, exc.code, exc.message)
            return
        except ServiceError as exc:  # the database is away and the key was never seen
            await self._refuse(CLOSE_SERVER_ERROR, exc.code, exc.message)
            return
        try:
            lease = await stream_lease_acquire(principal.tenant)
        except ServiceError as exc:
            await self._refuse(CLOSE_STREAM_LIMIT, exc.code, exc.message)
            return
        lease.keep_alive()
        self.principal, self.lease = principal, lease
        if self.channel_layer is not None:
            await self.channel_layer.group_add(tenant_access_group(principal.tenant.id), self.channel_name)
        self._watch_expiry(principal.api_key)
        await self.send_event("ready", None, connection_id=self.connection_id)

    async def _auth_deadline(self) -> None:
        await asyncio.sleep(settings.WS_AUTH_SECONDS)
        if self.principal is None and not self._closing:
            await self._refuse(
                CLOSE_UNAUTHORIZED,
                "auth_timeout",
                f'Authenticate within {settings.WS_AUTH_SECONDS:g} s: {{"type": "auth", "api_key": ...}}.',
            )

    async def _idle_watchdog(self) -> None:
        while not self._closing:
            await asyncio.sleep(min(1.0, settings.WS_IDLE_SECONDS / 4))
            idle = time.monotonic() - self.last_activity
            if not self.utterances and idle >= settings.WS_IDLE_SECONDS:
                self._closing = True
                await self._refuse(
                    CLOSE_IDLE, "idle_timeout", f"Nothing received for {settings.WS_IDLE_SECONDS:g} s."
                )
                return

    def _watch_expiry(self, api_key: ApiKey) -> None:
        if api_key.expires_at is None:
            return
        delay = max(0.0, (api_key.expires_at - timezone.now()).total_seconds())
        self._background.append(asyncio.create_task(self._close_after(delay)))

    async def _close_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.access_changed({"type": "access.changed"})

    async def access_changed(self, event: dict[str, Any]) -> None:
        """From the channel layer: the tenant's keys or state changed on some process."""
        if self.principal is None or self._closing:
            return
        try:
            api_key = await ApiKey.objects.select_related("tenant").aget(pk=self.principal.api_key.pk)
            refusal = api_key.refusal()
        except ApiKey.DoesNotExist:
            refusal = KEY_REVOKED  # deleted: as good as revoked
        except DatabaseError:
            return  # cannot tell now; the next change or the key's expiry will
        if refusal is None:
            self._watch_expiry(api_key)  # e.g. rotated: it now expires at the end of the grace period
            return
        self._closing = True
        for utterance in list(self.utterances.values()):
            await self._end_utterance(utterance, 200, refusal.code)
        await self._refuse(CLOSE_ACCESS_REVOKED, refusal.code, refusal.message)

    # --- messages from the client ---

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        self.last_activity = time.monotonic()
        if self._closing:
            return  # closing (access revoked, idle): nothing new starts
        try:
            if bytes_data is not None:
                raise ProtocolError(
                    "unsupported_frame", "Send JSON text frames; audio only flows to the client."
                )
            message = self._parse(text_data or "")
            kind = message.get("type")
            if self.principal is None:
                if kind != "auth":
                    raise ProtocolError(
                        "auth_required", 'Authenticate first: {"type": "auth", "api_key": ...}.'
                    )
                await self._on_auth(message)
                return
            handler = self._handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise ProtocolError(
                    "unknown_type",
                    f"Unknown message type {kind!r}; one of: {', '.join(sorted(self._handlers))}.",
                )
            await handler(self, message)
        except ProtocolError as exc:
            if (
                exc.abort
                and exc.context_id
                and (utterance := self.utterances.get(exc.context_id)) is not None
            ):
                await self._end_utterance(utterance, 400, exc.code)
            await self.send_event("error", exc.context_id, code=exc.code, message=exc.message)

    def _parse(self, text: str) -> dict[str, Any]:
        if len(text.encode()) > settings.WS_MAX_MESSAGE_BYTES:
            raise ProtocolError(
                "message_too_large",
                f"A message is at most {settings.WS_MAX_MESSAGE_BYTES} bytes; it was ignored.",
            )
        try:
            message = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            raise ProtocolError("malformed_json", "The message is not valid JSON.") from None
        if not isinstance(message, dict):
            raise ProtocolError("malformed_message", "A message is a JSON object with a `type`.")
        return message

    async def _on_auth(self, message: dict[str, Any]) -> None:
        key = message.get("api_key")
        if not isinstance(key, str) or not key:
            raise ProtocolError("missing_api_key", "`api_key` must be your API key.")
        await self._authenticate(f"Bearer {key}")

    @staticmethod
    def _context_id(message: dict[str, Any]) -> str:
        context_id = message.get("context_id")
        if not isinstance(context_id, str) or not CONTEXT_ID.match(context_id):
            raise ProtocolError(
                "invalid_context_id", "`context_id` is 1 to 64 letters, digits or ._:- characters."
            )
        return context_id

    def _utterance(self, message: dict[str, Any]) -> Utterance:
        context_id = self._context_id(message)
        utterance = self.utterances.get(context_id)
        if utterance is None:
            raise ProtocolError(
                "unknown_context", f"No open context {context_id!r}; send `start` first.", context_id
            )
        return utterance

    @staticmethod
    def _text(message: dict[str, Any], context_id: str) -> str:
        text = message.get("text")
        if not isinstance(text, str):
            raise ProtocolError("invalid_message", "`text` must be a string.", context_id)
        return text

    async def _on_start(self, message: dict[str, Any]) -> Utterance:
        context_id = self._context_id(message)
        if context_id in self.utterances:
            raise ProtocolError("context_exists", f"Context {context_id!r} is already open.", context_id)
        if len(self.utterances) >= settings.WS_MAX_CONTEXTS:
            raise ProtocolError(
                "too_many_contexts",
                f"At most {settings.WS_MAX_CONTEXTS} utterances at once per connection.",
                context_id,
            )
        assert self.principal is not None
        tenant = self.principal.tenant
        meter = UsageMeter(endpoint=STREAM, request_id=uuid.uuid4().hex, tenant_id=tenant.id, streaming=True)
        problems = {
            name: f"must be {' or '.join(t.__name__ for t in types)}"
            for name, types in _START_FIELDS.items()
            if (value := message.get(name)) is not None
            and (not isinstance(value, types) or isinstance(value, bool))
        }
        try:
            if problems:
                detail = "; ".join(f"{name} {problem}" for name, problem in problems.items())
                raise ServiceError(400, "invalid_request", f"Bad start message: {detail}.")
            audio_format = message.get("format") or "pcm"
            meter.format = audio_format
            meter.voice_id = message.get("voice_id") or ""
            twilio = None
            if audio_format == TWILIO:
                stream_sid = message.get("stream_sid")
                if not stream_sid:
                    raise ServiceError(
                        400, "missing_stream_sid", 'format "twilio" needs the call\'s `stream_sid`.'
                    )
                twilio = TwilioFramer(stream_sid)
            decision = await arate_limit_check(tenant)
            if decision is not None and not decision.allowed:
                raise ServiceError(
                    429, "rate_limited", f"Over the limit; retry in {decision.headers()['Retry-After']} s."
                )
            await quota_check(tenant)
            setup = await synthesis_setup(
                tenant=tenant,
                voice_id=message.get("voice_id") or None,
                language=message.get("language") or None,
                audio_format="mulaw" if twilio else audio_format,
                sample_rate=8000 if twilio else message.get("sample_rate"),
                speed=float(message.get("speed") or 1.0),
            )
        except DatabaseError:
            self._start_refused(meter, context_id, database_unavailable())
        except Exception as exc:
            error = _as_api_error(exc)
            if error.status_code >= 500 and error.code != "engine_overloaded":
                logger.exception("Starting utterance %s failed", meter.request_id)
            self._start_refused(meter, context_id, error)
        meter.voice_id = setup.voice.voice_id
        utterance = Utterance(self, context_id, setup, meter, twilio)
        self.utterances[context_id] = utterance
        stream_stats.utterances_active += 1
        return utterance

    @staticmethod
    def _start_refused(meter: UsageMeter, context_id: str, exc: ServiceError) -> NoReturn:
        """A refused utterance is still a request: it leaves its usage row."""
        meter.finish(exc.status_code, exc.code)
        raise ProtocolError(exc.code, exc.message, context_id) from exc

    async def _on_text(self, message: dict[str, Any]) -> None:
        utterance = self._utterance(message)
        self._open(utterance).add_text(self._text(message, utterance.context_id))

    async def _on_flush(self, message: dict[str, Any]) -> None:
        utterance = self._utterance(message)
        self._open(utterance).add_text("", final=True)

    async def _on_end(self, message: dict[str, Any]) -> None:
        self._open(self._utterance(message)).end()

    async def _on_cancel(self, message: dict[str, Any]) -> None:
        utterance = self._utterance(message)
        await self._end_utterance(utterance, 200, CANCELLED)
        if utterance.twilio is not None:
            await self.send(text_data=utterance.twilio.clear())
        await self._send_end(utterance, cancelled=True)

    async def _on_synthesize(self, message: dict[str, Any]) -> None:
        context_id = self._context_id(message)
        text = self._text(message, context_id)
        if not text.strip():
            raise ProtocolError("empty_text", "`text` is empty.", context_id)
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

    # --- utterance outcomes (called from their tasks) ---

    def _forget(self, utterance: Utterance) -> None:
        if self.utterances.pop(utterance.context_id, None) is not None:
            stream_stats.utterances_active -= 1
        self.last_activity = time.monotonic()

    # The bookkeeping comes first: a socket that fails the last sends changes nothing
    # about what the utterance used or the slots it held.

    async def utterance_finished(self, utterance: Utterance) -> None:
        self._forget(utterance)
        utterance.meter.finish(200)
        try:
            if utterance.twilio is not None:
                await self.send(text_data=utterance.twilio.mark(utterance.context_id))
            await self._send_end(utterance, cancelled=False)
        except Exception:
            logger.warning("Could not report the end of utterance %s", utterance.request_id, exc_info=True)

    async def utterance_failed(self, utterance: Utterance, status: int, code: str, message: str) -> None:
        self._forget(utterance)
        utterance.meter.finish(status, code)
        try:
            await self.send_event(
                "error", utterance.context_id, request_id=utterance.request_id, code=code, message=message
            )
            await self._send_end(utterance, cancelled=False)
        except Exception:
            logger.warning(
                "Could not report the failure of utterance %s", utterance.request_id, exc_info=True
            )

    async def _send_end(self, utterance: Utterance, *, cancelled: bool) -> None:
        meter = utterance.meter
        await self.send_event(
            "audio_end",
            utterance.context_id,
            request_id=utterance.request_id,
            cancelled=cancelled,
            audio_bytes=meter.audio_bytes,
            audio_seconds=round(meter.audio_seconds, 4),
        )

    async def send_event(self, kind: str, context_id: str | None, **fields: Any) -> None:
        await self.send(text_data=json.dumps({"type": kind, "context_id": context_id, **fields}))


def _as_api_error(exc: Exception) -> ServiceError:
    """The error a client sees for an exception, with its stable code."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, EngineOverloaded):
        return ServiceError(503, "engine_overloaded", str(exc))
    if isinstance(exc, EngineFailure):
        return ServiceError(500, "engine_error", f"The speech engine failed: {exc}")
    return ServiceError(500, "internal_error", "The server failed to speak this; the error is logged.")


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


def _key_in_query_string(query_string: bytes) -> bool:
    lowered = query_string.lower()
    return any(marker in lowered for marker in (b"api_key", b"apikey", b"token", b"authorization", b"cwt_"))
