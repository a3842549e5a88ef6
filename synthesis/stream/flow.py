"""Flow control from Daphne's socket buffer: a slow reader pauses generation."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from synthesis.stream.stats import stream_stats


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
