"""The protocol-agnostic core of every streaming WebSocket: what WS /v1/stream and the
ElevenLabs- and Cartesia-compatible sockets share, so that each of them is only a thin
layer that parses its own messages and draws its own events.

The core owns the connection: authentication (one path: `aauthenticate_token`, whatever
header or message the key came in), its stream lease, the live access re-check, the idle
watchdog, and the utterances: each is admitted by `synthesis_admit` (rate limit, plan,
quota), metered by its own UsageMeter (one usage row whatever happens, under the
dialect's endpoint name), run by utterance.Utterance (the one engine -> encoder -> socket
loop, with flow control), cancelled by `cancel_utterance`, and cleaned up once when the
connection ends, however it ends (`_cleanup`: on Daphne's disconnect, on a send that finds the
socket closed, or when the consumer's task ends for any other reason).

A dialect subclasses `StreamConnection` and supplies:

- `connected()`: what to do once the socket is accepted (authenticate from a header, or
  wait for a first message);
- `handle(message)`: one parsed JSON message of its protocol (raising ProtocolError for a
  bad one);
- `send_error`, `send_audio`, `send_end`: its shapes of an error, of audio (with character
  timings when `char_timings` is on) and of an utterance's end;
- `usage_endpoint`, and optionally `authenticated()`, `idle_seconds`,
  `eager_text`, `char_timings`.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import suppress
from datetime import datetime
from typing import Any, NoReturn

from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.utils import timezone

from core.channel_layer import ChannelLayerUnavailable, channel_layer_in_outage, channel_layer_recoveries
from core.errors import ServiceError
from core.metrics import CONNECTION_CUTS
from engines.alignment import CharTimings
from synthesis.admission import SynthesisRequest, service_error_for, synthesis_admit
from synthesis.stream.access import access_recheck
from synthesis.stream.flow import TransportFlow
from synthesis.stream.protocol import (
    CLOSE_ACCESS_REVOKED,
    CLOSE_IDLE,
    CLOSE_SERVER_ERROR,
    CLOSE_STREAM_LIMIT,
    CLOSE_UNAUTHORIZED,
    ProtocolError,
    SocketClosed,
    header,
    parse_message,
    sendable_close_code,
)
from synthesis.stream.stats import stream_stats
from synthesis.stream.twilio import TwilioFramer
from synthesis.stream.utterance import Utterance
from tenants.authentication import (
    CREDENTIAL_HEADERS,
    ApiKeyError,
    Principal,
    aauthenticate_token,
    conflicting_credentials,
    credential_value,
    credentials_presented,
    principal_authorize,
    principal_require_voice,
)
from tenants.limits import StreamLease, stream_lease_acquire
from tenants.services import tenant_access_group
from usage.recorder import CANCELLED, CLIENT_DISCONNECTED, UsageMeter

logger = logging.getLogger(__name__)


class StreamConnection(AsyncWebsocketConsumer, abc.ABC):  # type: ignore[misc]  # channels ships no types
    principal: Principal | None = None
    key_used: str | None = None  # the credential it authenticated with
    lease: StreamLease | None = None
    # The layer's recovery count when this connection joined its tenant's group; None while
    # it is not in the group (then `_access_watch` polls the database).
    _access_joined_at: int | None = None
    _closing = False  # nothing new starts (closing, or closed)
    _socket_gone = False  # a send found the socket closed: nothing more can be sent
    _connected = False  # connect() has set the connection up: there is something to clean up
    _counted = False  # counted in stream_stats.connections
    _cleaned = False  # `_cleanup` has run (it runs once)

    # --- what a dialect supplies ---

    usage_endpoint: str  # the endpoint name of its utterances' usage rows
    # Text whose message ends a sentence is spoken at once, without waiting for the space
    # after it (clients that send whole sentences, e.g. ElevenLabs' auto_mode).
    eager_text = False
    # Character timings with each chunk of audio (send_audio's `timings`).
    char_timings = False

    async def connected(self) -> None:
        """The socket is accepted: authenticate from the handshake, or wait for a message."""

    async def authenticated(self) -> None:
        """The key is good and the lease held."""

    @abc.abstractmethod
    async def handle(self, message: dict[str, Any]) -> None:
        """One parsed client message; raise ProtocolError for one the protocol refuses."""

    @abc.abstractmethod
    async def send_error(
        self,
        context_id: str | None,
        code: str,
        message: str,
        *,
        request_id: str | None = None,
        status: int = 400,
    ) -> None: ...

    @abc.abstractmethod
    async def send_audio(
        self, utterance: Utterance, data: bytes, timings: CharTimings | None, *, final: bool
    ) -> None:
        """Audio of `utterance` (possibly empty, with timings only, or the final tail)."""

    @abc.abstractmethod
    async def send_end(self, utterance: Utterance, *, cancelled: bool) -> None:
        """The utterance has ended (finished, failed, cancelled): no more of its audio follows."""

    @property
    def idle_seconds(self) -> float:
        return float(settings.WS_IDLE_SECONDS)

    # --- connection ---

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        # The connection's cleanup must not depend on Daphne delivering websocket.disconnect:
        # the consumer's task also ends by StopConsumer after a send found the socket closed,
        # by an exception from the channel layer, or cancelled by Daphne
        # (application_close_timeout). Whichever way, the cleanup runs here (once).
        try:
            await super().__call__(scope, receive, send)
        except Exception:
            # Escaping, it would make Daphne close with 1011 itself; close with ours instead.
            logger.exception("WebSocket consumer failed")
            await self.close(code=CLOSE_SERVER_ERROR)
        finally:
            # Shielded: a second cancellation (the server shutting down) cannot cut it short.
            await asyncio.shield(self._cleanup())

    async def connect(self) -> None:
        self.flow = TransportFlow()
        self.utterances: dict[str, Utterance] = {}
        self.last_activity = time.monotonic()
        self.connection_id = uuid.uuid4().hex
        self._background: list[asyncio.Task[None]] = []
        self._connected = True
        await self.accept()
        self.flow.attach(self.base_send)
        stream_stats.connections += 1
        self._counted = True
        await self.connected()
        if not self._closing:
            self._background.append(asyncio.create_task(self._idle_watchdog()))

    async def dispatch(self, message: dict[str, Any]) -> None:
        # An exception that escaped here would end the consumer before the disconnect that
        # Daphne sends: `__call__` closes it with 4500 and cleans up, but the client would
        # get no error event first.
        try:
            # Channels closes stale database connections (a thread hop) before every
            # message; frames of text need no database, so only the rest pay for it.
            if message.get("type") == "websocket.receive":
                await self.websocket_receive(message)
            else:
                await super().dispatch(message)
        except StopConsumer:
            raise
        except SocketClosed:
            # The client has gone (or is going): there is no one to answer. The connection's
            # work ends now, without waiting for a disconnect that may never be delivered.
            await self._cleanup()
            raise StopConsumer() from None
        except Exception:
            logger.exception("WebSocket handler for %r failed", message.get("type"))
            if message.get("type") == "websocket.disconnect":
                raise StopConsumer() from None  # `__call__` finishes the cleanup; end
            await self.refuse(
                CLOSE_SERVER_ERROR, "internal_error", "The server failed; reconnect.", status=500
            )

    async def disconnect(self, code: int) -> None:
        await self._cleanup()

    async def _cleanup(self) -> None:
        """Give back everything the connection holds, once: its background tasks, its
        utterances (each with its engine slot, quota reservation and usage row), its stream
        lease, its place in the counters and its access group. Every step runs whatever an
        earlier one raised: a leaked lease or counter would outlive the connection (a tenant
        refused streams it does not hold)."""
        if self._cleaned or not self._connected:
            return
        self._cleaned = True
        self._closing = True
        for task in self._background:
            task.cancel()
        for utterance in list(self.utterances.values()):
            try:
                await self._end_utterance(utterance, 200, CLIENT_DISCONNECTED)
            except Exception:  # the others must still end (and give back their slots)
                logger.exception("Ending utterance %s on disconnect failed", utterance.request_id)
        if self.lease is not None:
            try:
                await self.lease.release()
            except Exception:
                logger.exception("Releasing the stream lease of %s failed", self.connection_id)
        self.flow.detach()
        if self._counted:
            self._counted = False
            stream_stats.connections -= 1
        if self.principal is not None and self.channel_layer is not None:
            with suppress(Exception):
                await self.channel_layer.group_discard(
                    tenant_access_group(self.principal.tenant.id), self.channel_name
                )

    async def send(
        self, text_data: str | None = None, bytes_data: bytes | None = None, close: bool = False
    ) -> None:
        """Send on the socket; SocketClosed once it has closed (Autobahn raises on a send
        after the client's close frame, before Daphne has seen the connection end)."""
        if self._socket_gone:
            raise SocketClosed("The socket has closed.")
        try:
            await super().send(text_data=text_data, bytes_data=bytes_data, close=close)
        except Exception as exc:
            self._socket_gone = self._closing = True
            raise SocketClosed("The socket has closed.") from exc

    async def close(self, code: int | None = None, reason: str | None = None) -> None:
        """Close the socket with a code Daphne can send; never raises (a socket that has
        already closed needs no close)."""
        self._closing = True
        if code is not None and not sendable_close_code(code):
            logger.error("Close code %s cannot be sent; closing with %s", code, CLOSE_SERVER_ERROR)
            code = CLOSE_SERVER_ERROR
        if self._socket_gone:
            return
        try:
            await super().close(code=code, reason=reason)
        except Exception:
            logger.info("Closing a WebSocket that had already closed", exc_info=True)

    async def _end_utterance(self, utterance: Utterance, status: int, code: str) -> None:
        """Stop an utterance from outside its task and record how it ended."""
        await utterance.stop()
        self._forget(utterance)
        utterance.meter.finish(status, code)

    async def refuse(self, close_code: int, code: str, message: str, *, status: int = 400) -> None:
        """The dialect's error, then the socket closes."""
        self._closing = True
        with suppress(Exception):
            await self.send_error(None, code, message, status=status)
        await self.close(code=close_code)

    async def close_all(self, close_code: int = 1000) -> None:
        """End every utterance (cancelled) and close the socket (a client's close_socket)."""
        self._closing = True
        for utterance in list(self.utterances.values()):
            await self._end_utterance(utterance, 200, CANCELLED)
        await self.close(code=close_code)

    async def authenticate(self, key: str) -> None:
        """The one authentication path of every dialect: the API key (or any credential
        `aauthenticate_token` takes), then one of the tenant's stream leases. A handshake
        header carrying another credential than `key` (the dialect's own header, Bearer, or a
        first message's key) refuses the connection: which would bill is nobody's guess."""
        headers = {name: header(self.scope, name.encode()) or "" for name in CREDENTIAL_HEADERS}
        found, _in_query = credentials_presented(headers, {})
        if found - {credential_value(key)}:
            error = conflicting_credentials()
            await self.refuse(CLOSE_UNAUTHORIZED, error.code, error.message, status=error.status_code)
            return
        try:
            principal = await aauthenticate_token(key)
            # A client token's routes (every streaming socket is the `stream` route), and a
            # browser's Origin against the tenant's list.
            principal_authorize(
                principal,
                route="stream",
                origin=header(self.scope, b"origin"),
            )
        except ApiKeyError as exc:
            await self.refuse(CLOSE_UNAUTHORIZED, exc.code, exc.message, status=exc.status_code)
            return
        except ServiceError as exc:
            # 403: outside a token's scope, or an origin the tenant does not allow (4003);
            # else the database is away and the key was never seen.
            forbidden = exc.status_code == 403
            await self.refuse(
                CLOSE_ACCESS_REVOKED if forbidden else CLOSE_SERVER_ERROR,
                exc.code,
                exc.message,
                status=exc.status_code,
            )
            return
        try:
            lease = await stream_lease_acquire(principal.tenant)
        except ServiceError as exc:
            await self.refuse(CLOSE_STREAM_LIMIT, exc.code, exc.message, status=exc.status_code)
            return
        lease.keep_alive()
        self.principal, self.lease = principal, lease
        self.key_used = credential_value(key)
        await self._join_access_group()
        self._background.append(asyncio.create_task(self._access_watch()))
        self._watch_expiry(principal.api_key.expires_at)
        await self.authenticated()

    def start_auth_deadline(self, hint: str) -> None:
        """Refuse the connection unless a key arrives within WS_AUTH_SECONDS."""
        self._background.append(asyncio.create_task(self._auth_deadline(hint)))

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

    async def _auth_deadline(self, hint: str) -> None:
        await asyncio.sleep(settings.WS_AUTH_SECONDS)
        if self.principal is None and not self._closing:
            CONNECTION_CUTS.labels(reason="ws_auth_timeout").inc()
            await self.refuse(
                CLOSE_UNAUTHORIZED,
                "auth_timeout",
                f"Authenticate within {settings.WS_AUTH_SECONDS:g} s: {hint}.",
            )

    async def _idle_watchdog(self) -> None:
        while not self._closing:
            idle_limit = self.idle_seconds
            await asyncio.sleep(min(1.0, idle_limit / 4))
            idle = time.monotonic() - self.last_activity
            if not self.utterances and idle >= idle_limit and not self._closing:
                await self.refuse(
                    CLOSE_IDLE, "idle_timeout", f"Nothing received for {idle_limit:g} s.", status=408
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
        await self.refuse(CLOSE_ACCESS_REVOKED, check.refusal.code, check.refusal.message, status=403)

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
            await self.handle(parse_message(text_data or ""))
        except ProtocolError as exc:
            if (
                exc.abort
                and exc.context_id
                and (utterance := self.utterances.get(exc.context_id)) is not None
            ):
                # An utterance ended by its text (too long, bad SSML, over its limits) ends
                # as any started utterance does: its error, then its end.
                await self._end_utterance(utterance, 400, exc.code)
                await self.send_error(
                    exc.context_id, exc.code, exc.message, request_id=utterance.request_id, status=exc.status
                )
                await self.send_end(utterance, cancelled=False)
                return
            await self.send_error(exc.context_id, exc.code, exc.message, status=exc.status)

    # --- utterances ---

    async def open_utterance(
        self,
        context_id: str,
        wanted: Callable[[], SynthesisRequest],
        *,
        twilio: Callable[[], TwilioFramer] | None = None,
        format_label: str | None = None,
    ) -> Utterance:
        """Admit an utterance (its request built by `wanted`, which may refuse it) and start it.
        A refusal is a ProtocolError for its context, and still a request with its usage row."""
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
        meter = UsageMeter(
            endpoint=self.usage_endpoint, request_id=uuid.uuid4().hex, tenant_id=tenant.id, streaming=True
        )
        framer = None
        try:
            framer = twilio() if twilio is not None else None
            request = wanted()
            principal_require_voice(self.principal, request.voice_id)
            admission = await synthesis_admit(tenant=tenant, request=request, meter=meter, rate_limit=True)
        except Exception as exc:
            self._start_refused(meter, context_id, service_error_for(exc, request_id=meter.request_id))
        if format_label is not None:
            meter.format = format_label
        utterance = Utterance(
            self,
            context_id,
            admission.setup,
            meter,
            framer,
            eager=self.eager_text,
            timings=self.char_timings,
        )
        self.utterances[context_id] = utterance
        stream_stats.utterances_active += 1
        return utterance

    @staticmethod
    def _start_refused(meter: UsageMeter, context_id: str, exc: ServiceError) -> NoReturn:
        """A refused utterance is still a request: it leaves its usage row."""
        meter.finish(exc.status_code, exc.code)
        raise ProtocolError(exc.code, exc.message, context_id, status=exc.status_code) from exc

    async def cancel_utterance(self, utterance: Utterance) -> None:
        """Stop at once (barge-in): when this returns no more of its audio goes out."""
        await self._end_utterance(utterance, 200, CANCELLED)
        await self.send_end(utterance, cancelled=True)

    # --- utterance outcomes (called from their tasks) ---

    def _forget(self, utterance: Utterance) -> None:
        if self.utterances.pop(utterance.context_id, None) is not None:
            stream_stats.utterances_active -= 1
        self.last_activity = time.monotonic()

    # The bookkeeping comes first: a socket that fails the last sends changes nothing
    # about what the utterance used or the slots it held.

    async def utterance_finished(self, utterance: Utterance) -> None:
        utterance.finished = True
        self._forget(utterance)
        utterance.meter.finish(200)
        try:
            await self.send_end(utterance, cancelled=False)
        except SocketClosed:
            pass  # the client has gone: no one to tell
        except Exception:
            logger.warning("Could not report the end of utterance %s", utterance.request_id, exc_info=True)

    async def utterance_failed(self, utterance: Utterance, status: int, code: str, message: str) -> None:
        self._forget(utterance)
        utterance.meter.finish(status, code)
        try:
            await self.send_error(
                utterance.context_id, code, message, request_id=utterance.request_id, status=status
            )
            await self.send_end(utterance, cancelled=False)
        except SocketClosed:
            pass  # the client has gone: no one to tell
        except Exception:
            logger.warning(
                "Could not report the failure of utterance %s", utterance.request_id, exc_info=True
            )
