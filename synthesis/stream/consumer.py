"""WS /v1/stream: text in as an LLM writes it, audio out as the engine makes it.

The connection: authentication (handshake header or a first `auth` message), its stream
lease, the messages that open, feed, end and cancel utterances, and how each utterance's
outcome reaches the client. The rest of the package: protocol.py (messages, frames, close
codes), utterance.py (the engine -> encoder -> socket loop), twilio.py, flow.py (a slow
reader pauses generation), access.py (the live key re-check), stats.py. docs/streaming.md
is the client's description.

A connection holds one of its tenant's stream slots while open; every utterance is a
request for rate limits, quotas and usage rows (synthesis.admission).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import suppress
from datetime import datetime
from typing import Any, NoReturn

from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.utils import timezone

from core.channel_layer import ChannelLayerUnavailable, channel_layer_in_outage, channel_layer_recoveries
from core.errors import ServiceError
from engines.text import is_speakable
from synthesis.admission import service_error_for, synthesis_admit, utterance_request
from synthesis.stream.access import access_recheck
from synthesis.stream.flow import TransportFlow
from synthesis.stream.protocol import (
    CLOSE_ACCESS_REVOKED,
    CLOSE_IDLE,
    CLOSE_SERVER_ERROR,
    CLOSE_STREAM_LIMIT,
    CLOSE_UNAUTHORIZED,
    ProtocolError,
    context_id_of,
    header,
    key_in_query_string,
    parse_message,
    text_of,
)
from synthesis.stream.stats import stream_stats
from synthesis.stream.twilio import TWILIO, TwilioFramer
from synthesis.stream.utterance import Utterance
from tenants.authentication import (
    ApiKeyError,
    Principal,
    aauthenticate_token,
    bearer_token,
    principal_authorize,
    principal_require_voice,
)
from tenants.limits import StreamLease, stream_lease_acquire
from tenants.services import tenant_access_group
from usage.recorder import CANCELLED, CLIENT_DISCONNECTED, STREAM, UsageMeter

logger = logging.getLogger(__name__)


class StreamConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]  # channels ships no types
    principal: Principal | None = None
    lease: StreamLease | None = None
    # The layer's recovery count when this connection joined its tenant's group; None while
    # it is not in the group (then `_access_watch` polls the database).
    _access_joined_at: int | None = None

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
        if key_in_query_string(self.scope.get("query_string", b"")):
            await self._refuse(
                CLOSE_UNAUTHORIZED,
                "api_key_in_url",
                "Never put the API key in the URL (URLs end up in logs): send it in the Authorization "
                "header or as the first message.",
            )
            return
        authorization = header(self.scope, b"authorization")
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
            # A client token's routes, and a browser's Origin against the tenant's list.
            principal_authorize(
                principal,
                route="stream",
                origin=header(self.scope, b"origin"),
                host=header(self.scope, b"host"),
            )
        except ApiKeyError as exc:
            await self._refuse(CLOSE_UNAUTHORIZED, exc.code, exc.message)
            return
        except ServiceError as exc:
            # 403: outside a token's scope, or an origin the tenant does not allow (4003);
            # else the database is away and the key was never seen.
            forbidden = exc.status_code == 403
            await self._refuse(
                CLOSE_ACCESS_REVOKED if forbidden else CLOSE_SERVER_ERROR, exc.code, exc.message
            )
            return
        try:
            lease = await stream_lease_acquire(principal.tenant)
        except ServiceError as exc:
            await self._refuse(CLOSE_STREAM_LIMIT, exc.code, exc.message)
            return
        lease.keep_alive()
        self.principal, self.lease = principal, lease
        await self._join_access_group()
        self._background.append(asyncio.create_task(self._access_watch()))
        self._watch_expiry(principal.api_key.expires_at)
        await self.send_event("ready", None, connection_id=self.connection_id)

    async def _join_access_group(self) -> None:
        """Listen for the tenant's access changes; while Redis is away this fails, and
        `_access_watch` polls the database instead until it can join."""
        assert self.principal is not None
        self._access_joined_at = None
        if self.channel_layer is None:
            return
        try:
            await self.channel_layer.group_add(
                tenant_access_group(self.principal.tenant.id), self.channel_name
            )
        except ChannelLayerUnavailable:
            return
        self._access_joined_at = channel_layer_recoveries(self.channel_layer)

    async def _access_watch(self) -> None:
        """While this connection may miss a broadcast (the layer has lost Redis, or this
        connection is not in its group), check its key against the database every
        WS_ACCESS_POLL_SECONDS, and join the group again once Redis is back."""
        while not self._closing:
            await asyncio.sleep(settings.WS_ACCESS_POLL_SECONDS)
            layer = self.channel_layer
            in_outage = channel_layer_in_outage(layer)
            if layer is None or (not in_outage and self._access_joined_at == channel_layer_recoveries(layer)):
                continue
            await self.access_changed({"type": "access.changed"})
            if not in_outage and not self._closing:
                await self._join_access_group()

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

    def _watch_expiry(self, expires_at: datetime | None) -> None:
        if expires_at is None:
            return
        delay = max(0.0, (expires_at - timezone.now()).total_seconds())
        self._background.append(asyncio.create_task(self._close_after(delay)))

    async def _close_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        await self.access_changed({"type": "access.changed"})

    async def access_changed(self, event: dict[str, Any]) -> None:
        """From the channel layer: the tenant's keys or state changed on some process."""
        if self.principal is None or self._closing:
            return
        check = await access_recheck(self.principal.api_key.pk)
        if check is None:
            return
        if check.refusal is None:
            self._watch_expiry(check.expires_at)  # e.g. rotated: it now expires after the grace period
            return
        self._closing = True
        for utterance in list(self.utterances.values()):
            await self._end_utterance(utterance, 200, check.refusal.code)
        await self._refuse(CLOSE_ACCESS_REVOKED, check.refusal.code, check.refusal.message)

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
            message = parse_message(text_data or "")
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
                # An utterance ended by its text (too long, bad SSML, over its limits) ends
                # as any started utterance does: its error, then its audio_end.
                await self._end_utterance(utterance, 400, exc.code)
                await self.send_event(
                    "error",
                    exc.context_id,
                    request_id=utterance.request_id,
                    code=exc.code,
                    message=exc.message,
                )
                await self._send_end(utterance, cancelled=False)
                return
            await self.send_event("error", exc.context_id, code=exc.code, message=exc.message)

    async def _on_auth(self, message: dict[str, Any]) -> None:
        key = message.get("api_key")
        if not isinstance(key, str) or not key:
            raise ProtocolError("missing_api_key", "`api_key` must be your API key.")
        await self._authenticate(f"Bearer {key}")

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
        twilio = None
        try:
            if message.get("format") == TWILIO:
                stream_sid = message.get("stream_sid")
                if not isinstance(stream_sid, str) or not stream_sid:
                    raise ServiceError(
                        400, "missing_stream_sid", 'format "twilio" needs the call\'s `stream_sid`.'
                    )
                twilio = TwilioFramer(stream_sid)
            wanted = utterance_request(message, twilio=twilio is not None)
            principal_require_voice(self.principal, wanted.voice_id)
            admission = await synthesis_admit(tenant=tenant, request=wanted, meter=meter, rate_limit=True)
        except Exception as exc:
            self._start_refused(meter, context_id, service_error_for(exc, request_id=meter.request_id))
        if twilio is not None:
            meter.format = TWILIO
        utterance = Utterance(self, context_id, admission.setup, meter, twilio)
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
        self._open(utterance).add_text(text_of(message, utterance.context_id))

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
