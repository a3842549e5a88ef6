"""ALLOWED_HOSTS on every route: the API's lean middleware stack (callwaiting_tts.handlers)
has none of Django's middleware that would call `request.get_host()` (CommonMiddleware,
CSRF), so nothing checked the Host there, and Channels checks nothing on a socket.

A request for a host the service does not serve is refused before anything else reads it:
HTTP `400 invalid_host` in the JSON error shape (both stacks, `AllowedHostsMiddleware` in
callwaiting_tts.middleware), a WebSocket handshake refused (`allowed_hosts_websocket`).
That keeps DNS rebinding and Host-poisoned absolute URLs out, and means nothing downstream
(links, origins) could be misled by a Host it did not choose; the service's own origin is
configured (PUBLIC_BASE_URL, tenants.origins), never read from the request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from django.conf import settings
from django.http.request import split_domain_port, validate_host

logger = logging.getLogger(__name__)

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[Mapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]


def allowed_hosts() -> list[str]:
    """As Django's `HttpRequest.get_host`: with DEBUG and no list, the local names."""
    hosts = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not hosts:
        hosts = [".localhost", "127.0.0.1", "[::1]"]
    return hosts


def host_allowed(host: str) -> bool:
    domain, _port = split_domain_port(host)
    return bool(domain) and validate_host(domain, allowed_hosts())


def _scope_host(scope: Mapping[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if bytes(name).lower() == b"host":
            return bytes(value).decode("latin-1")
    server = scope.get("server")
    if server and server[0]:
        return f"{server[0]}:{server[1]}" if server[1] else str(server[0])
    return None  # only an in-process harness sends neither (RFC 6455 requires Host)


def allowed_hosts_websocket(app: ASGIApp) -> ASGIApp:
    """Refuse a WebSocket handshake for a host not in ALLOWED_HOSTS (Daphne answers 403)."""

    async def guarded(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        host = _scope_host(scope)
        if host is None or host_allowed(host):
            await app(scope, receive, send)
            return
        logger.warning("Refused a WebSocket handshake for host %r (not in ALLOWED_HOSTS).", host[:200])
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.close"})

    return guarded
