"""Flow control from Daphne's socket buffer: a slow reader pauses generation, on a
WebSocket (TransportFlow) and on a streamed HTTP response (backpressured_send).

The Twisted and Daphne internals this relies on are named here, once, and
tests/unit/test_daphne_internals.py fails if Daphne or Twisted change them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

from django.conf import settings

from core.metrics import CONNECTION_CUTS
from synthesis.stream.stats import stream_stats

logger = logging.getLogger(__name__)

Send = Callable[[Mapping[str, Any]], Awaitable[None]]


# --- Daphne and Twisted internals -------------------------------------------------------


def daphne_protocol(send: Any) -> Any:
    """The connection's protocol behind an ASGI `send`: Daphne gives each connection
    `partial(server.handle_reply, protocol)` (a WebRequest for HTTP, an Autobahn
    WebSocket protocol for a socket). None under any other server."""
    return send.args[0] if isinstance(send, partial) and send.args else None


def http_transport_paused(request: Any) -> bool:
    """Whether Twisted's HTTP channel was told its transport's buffer is full before a
    producer registered (HTTPChannel._waitingForTransport): then no pauseProducing comes."""
    return bool(getattr(getattr(request, "channel", None), "_waitingForTransport", False))


def http_abort(request: Any) -> None:
    """Drop the request's TCP connection now; Daphne then sends the application `http.disconnect`."""
    channel = getattr(request, "channel", None)
    transport = getattr(channel, "transport", None)
    if transport is not None:
        transport.abortConnection()


class _PushProducer:
    """Twisted's IPushProducer as an event: set while the transport takes more, cleared while
    it asks us to pause. Twisted calls these on the event loop's thread."""

    def __init__(self) -> None:
        self._writable = asyncio.Event()
        self._writable.set()

    def pauseProducing(self) -> None:
        self._writable.clear()

    def resumeProducing(self) -> None:
        self._writable.set()

    def stopProducing(self) -> None:
        self._writable.set()  # the connection is gone: let senders run into the closed socket


class TransportFlow(_PushProducer):
    """Backpressure from the socket: Daphne writes through Twisted, which asks a
    registered push producer to pause when the connection's write buffer is full
    and to resume when it drains. Senders wait for `writable` before each frame,
    so a client that reads slowly pauses generation instead of growing memory.

    Under servers other than Daphne (or in tests with WebsocketCommunicator)
    there is no transport to register with and sending never waits.
    """

    def __init__(self) -> None:
        super().__init__()
        self._protocol: Any = None

    def attach(self, send: Any) -> bool:
        # Daphne gives each connection `partial(server.handle_reply, protocol)`;
        # its protocol is an Autobahn WebSocket protocol, which takes producers.
        protocol: Any = daphne_protocol(send)
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


class ResponseFlow(_PushProducer):
    """A streamed HTTP response's producer on Twisted's request (Request.registerProducer):
    the HTTP channel passes on the transport's pause when its write buffer is full and its
    resume when it drains."""

    def __init__(self, request: Any) -> None:
        super().__init__()
        self.request: Any = request
        request.registerProducer(self, True)
        if http_transport_paused(request):
            self._writable.clear()

    def detach(self) -> None:
        request, self.request = self.request, None
        if request is not None and getattr(request, "channel", None) is not None:
            request.unregisterProducer()
        self._writable.set()

    async def writable_within(self, seconds: float) -> bool:
        if self._writable.is_set():
            return True
        stream_stats.paused_for_slow_reader += 1
        stream_stats.pauses_total += 1
        try:
            await asyncio.wait_for(self._writable.wait(), seconds)
            return True
        except TimeoutError:
            return False
        finally:
            stream_stats.paused_for_slow_reader -= 1


def backpressured_send(send: Send) -> Send:
    """An HTTP `send` that waits, before each piece of a streamed body, until the socket
    takes more: the response's generator (and the engine behind it, whose queue is
    bounded) waits with it, so a client that never reads holds the socket's buffers and
    no more. A client that takes nothing for HTTP_STREAM_STALL_SECONDS is cut: its
    connection dropped, Django cancels the response, which releases what it held.
    Under servers other than Daphne the send is returned as it is."""
    request = daphne_protocol(send)
    if request is None or not hasattr(request, "registerProducer"):
        return send
    flow: ResponseFlow | None = None
    cut = False

    async def flowing_send(message: Mapping[str, Any]) -> None:
        nonlocal flow, cut
        if message["type"] != "http.response.body":
            await send(message)
            return
        if cut:
            return
        more = bool(message.get("more_body", False))
        if flow is None and more:  # a streamed body: whole ones are written at once
            flow = ResponseFlow(request)
        if flow is not None:
            if not await flow.writable_within(settings.HTTP_STREAM_STALL_SECONDS):
                cut = True
                flow.detach()
                CONNECTION_CUTS.labels(reason="stream_stalled").inc()
                logger.warning(
                    "Cut a streamed response its client read nothing of for %gs.",
                    settings.HTTP_STREAM_STALL_SECONDS,
                )
                http_abort(request)
                return
            if not more:  # Twisted finishes the request on the last piece: unregister first
                flow.detach()
        await send(message)

    return flowing_send
