"""`python -m callwaiting_tts.serve`: run Daphne on HOST:PORT, and shut down gently.

On SIGTERM (what a pod gets before it is stopped) or SIGINT the server stops
accepting connections, /v1/ready turns 503, running synthesis (HTTP streams,
whole-file requests, WebSocket utterances) finishes, for at most
SHUTDOWN_GRACE_SECONDS, and then the process exits. Idle WebSocket connections
are closed at the end, as Daphne closes every connection when it stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any

logger = logging.getLogger("callwaiting_tts.serve")

DRAIN_POLL_SECONDS = 0.2


def _work_in_flight() -> int:
    from engines import loaded_engine
    from synthesis.stream.stats import stream_stats

    engine = loaded_engine()
    jobs = int(engine.info()["active_jobs"]) if engine is not None else 0
    return jobs + stream_stats.http_streams + stream_stats.utterances_active


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "callwaiting_tts.settings")
    # daphne.server installs Twisted's asyncio reactor when imported: before anything takes the default one.
    import daphne.server  # noqa: F401
    import django

    django.setup()
    from django.conf import settings
    from twisted.internet import reactor as twisted_reactor

    reactor: Any = twisted_reactor  # typed by Twisted as a bare module attribute

    from callwaiting_tts.asgi import application
    from callwaiting_tts.http_server import RedactingAccessLog, ServiceServer
    from callwaiting_tts.lifecycle import lifecycle
    from engines import loaded_engine
    from tenants.limits import limits_warm_up

    # JSON logs come from the service's own request log; Daphne's access lines are plain text.
    access_log = RedactingAccessLog(sys.stdout) if settings.LOG_FORMAT == "plain" else None
    server = ServiceServer(
        application=application,
        endpoints=[f"tcp:port={settings.PORT}:interface={settings.HOST}"],
        signal_handlers=False,
        action_logger=access_log,
        # A WebSocket's opening handshake, and its whole time before it is open, within
        # WS_AUTH_SECONDS (Daphne's defaults: 5 s and 20 s); its auth message is held to the
        # same by the consumer (synthesis/stream/connection.py).
        websocket_handshake_timeout=settings.WS_AUTH_SECONDS,
        websocket_connect_timeout=settings.WS_AUTH_SECONDS,
    )

    # On the server's own event loop once it runs: the async Redis client is bound to it.
    reactor.callWhenRunning(lambda: asyncio.ensure_future(limits_warm_up()))

    def drain() -> None:
        if lifecycle.draining:
            return
        lifecycle.draining = True
        deadline = time.monotonic() + settings.SHUTDOWN_GRACE_SECONDS
        logger.info(
            "Shutting down: no new connections; waiting up to %ss for running work.",
            settings.SHUTDOWN_GRACE_SECONDS,
        )
        for port in server.ports:
            port.stopListening()

        def finish_when_idle() -> None:
            busy = _work_in_flight()
            if busy and time.monotonic() < deadline:
                reactor.callLater(DRAIN_POLL_SECONDS, finish_when_idle)
                return
            if busy:
                logger.warning("Grace period over with %d synthesis job(s) still running.", busy)
            reactor.stop()

        finish_when_idle()

    def on_signal(signum: int, _frame: Any) -> None:
        reactor.callFromThread(drain)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logger.info("Starting server at %s:%s", settings.HOST, settings.PORT)
    try:
        server.run()
    finally:
        # The engine's workers finish the step they are in and stop: a thread left inside
        # the model (ONNX Runtime, torch) as the interpreter exits takes the process down.
        engine = loaded_engine()
        if engine is not None:
            engine.close()
    if server.listen_failure:
        sys.exit(
            f"error: cannot listen on {settings.HOST}:{settings.PORT} ({server.listen_failure}); "
            "is another server using it? Set PORT to choose another."
        )


if __name__ == "__main__":
    main()
