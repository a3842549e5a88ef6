"""Which browser origins may call the API: each tenant's allowed origins (admin-edited,
empty by default, so no browser may use a tenant's credentials until its operator says so).

Two checks, because a CORS preflight carries no credential:

- The preflight (`OPTIONS` with Access-Control-Request-Method) cannot say which tenant it
  is for, so it is answered for the union of every active tenant's origins
  (`preflight_origins`). That only tells the browser it may send the real request; it grants
  nothing.
- The real request carries its key or client token, and is refused (403
  `origin_not_allowed`; a WebSocket is closed with 4003) unless its `Origin` is one of that
  tenant's origins and, for a client token scoped to origins, one of the token's
  (`origin_allowed`). A request without `Origin` is from a server-side client and is not
  affected; a page of this service itself always is allowed (the playground): its origin
  is the configured PUBLIC_BASE_URL's, never read from the request's Host, which whoever
  sends the request chooses (a page on evil.example resolving to this server would send
  `Host: evil.example` with `Origin: http://evil.example`).

The union is kept in process memory and read again from the database at most every
CORS_ORIGINS_CACHE_SECONDS, only by requests that carry an Origin (requests from servers
never pay for it). An origin added in the admin reaches preflights within that time.
"""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.db import DatabaseError

from tenants.models import Tenant
from tenants.tokens import ClientToken, normalise_origin

logger = logging.getLogger(__name__)


def is_own_origin(origin: str) -> bool:
    """Is this Origin the service's own (PUBLIC_BASE_URL: scheme, host and port)?"""
    normalised = normalise_origin(origin)
    return normalised is not None and normalised == normalise_origin(settings.PUBLIC_BASE_URL)


def origin_allowed(tenant: Tenant, token: ClientToken | None, origin: str | None) -> bool:
    if origin is None:
        return True  # not a browser: server-side clients send no Origin
    if is_own_origin(origin):
        return True
    normalised = normalise_origin(origin)
    if normalised is None:
        return False  # "null" (sandboxed frames, file: pages) and anything else unnamed
    if normalised not in tenant.allowed_origins:
        return False
    return token is None or token.origins is None or normalised in token.origins


class PreflightOrigins:
    """The union of every active tenant's allowed origins, refreshed at most every
    CORS_ORIGINS_CACHE_SECONDS. Event loop only (the API's middleware)."""

    def __init__(self) -> None:
        self._origins: frozenset[str] = frozenset()
        self._read_at = float("-inf")

    async def refresh_if_stale(self) -> None:
        if time.monotonic() - self._read_at < settings.CORS_ORIGINS_CACHE_SECONDS:
            return
        try:
            lists = [
                origins
                async for origins in Tenant.objects.filter(is_active=True)
                .exclude(allowed_origins=[])
                .values_list("allowed_origins", flat=True)
            ]
        except DatabaseError:
            logger.warning("Database unavailable; CORS preflights use the origins read before.")
            self._read_at = time.monotonic()  # not on every request of an outage
            return
        self._origins = frozenset(origin for origins in lists for origin in origins)
        self._read_at = time.monotonic()

    def allows(self, origin: str) -> bool:
        normalised = normalise_origin(origin)
        return normalised is not None and normalised in self._origins

    def forget(self) -> None:
        """Read the database again at the next request (tests, and an admin edit here)."""
        self._read_at = float("-inf")


preflight_origins = PreflightOrigins()
