"""ASGI entry point: HTTP to Django, WebSocket to Channels (Daphne serves both)."""

import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "callwaiting_tts.settings")

# Django must be set up before anything that imports models.
django_http_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.urls import URLPattern, path  # noqa: E402
from servestatic import ServeStaticASGI  # noqa: E402

from callwaiting_tts.handlers import ApiASGIHandler  # noqa: E402
from callwaiting_tts.hosts import allowed_hosts_websocket  # noqa: E402
from callwaiting_tts.lifecycle import engine_warm_up  # noqa: E402
from engines import get_engine  # noqa: E402
from synthesis.stream.flow import backpressured_send  # noqa: E402
from usage.recorder import usage_flusher_start  # noqa: E402

api_http_app = ApiASGIHandler()

# Static files (admin, API docs) are served in front of Django so that they
# never take the sync thread; with DEBUG off nothing else would serve them.
site_http_app = ServeStaticASGI(django_http_app, root=settings.STATIC_ROOT, prefix=settings.STATIC_URL)


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[Mapping[str, Any]], Awaitable[None]]


async def http_app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["path"].startswith(settings.API_PATH_PREFIX):
        # A streamed answer waits for its client to read (synthesis/stream/flow.py).
        await api_http_app(scope, receive, backpressured_send(send))
    else:
        await site_http_app(scope, receive, send)


# The engine loads now, at start-up: a misconfigured one stops the server here
# instead of failing the first request, and no request pays for the load (or,
# after one warm-up synthesis, for its lazy initialisation).
engine_warm_up(get_engine())
# The usage writer starts with the process: rows a killed predecessor left (its spool, its
# requests in flight) are written now, not when the first request here finishes.
usage_flusher_start()

from synthesis.stream.cartesia import CartesiaStreamConsumer  # noqa: E402
from synthesis.stream.consumer import StreamConsumer  # noqa: E402
from synthesis.stream.elevenlabs import ElevenLabsMultiStreamConsumer, ElevenLabsStreamConsumer  # noqa: E402

websocket_urlpatterns: list[URLPattern] = [
    path("v1/stream", StreamConsumer.as_asgi(), name="stream"),
    # ElevenLabs- and Cartesia-compatible sockets (docs/elevenlabs.md, docs/cartesia.md).
    path(
        "v1/text-to-speech/<str:voice_id>/stream-input",
        ElevenLabsStreamConsumer.as_asgi(),
        name="elevenlabs-stream-input",
    ),
    path(
        "v1/text-to-speech/<str:voice_id>/multi-stream-input",
        ElevenLabsMultiStreamConsumer.as_asgi(),
        name="elevenlabs-multi-stream-input",
    ),
    path("tts/websocket", CartesiaStreamConsumer.as_asgi(), name="cartesia-websocket"),
    path("v1/tts/websocket", CartesiaStreamConsumer.as_asgi(), name="cartesia-websocket-v1"),
]

application = ProtocolTypeRouter(
    {
        "http": http_app,
        "websocket": allowed_hosts_websocket(URLRouter(websocket_urlpatterns)),
    }
)
