"""The channel layer in production: channels_redis's, made to ride out a Redis outage.

The layer carries one kind of message here: "a tenant's access changed, check your key
again" (tenants.services.tenant_access_changed) to every process's open WebSockets. A
Redis outage must not end those connections: channels_redis lets a failed read escape
from `receive`, which would end the consumer with it (and, escaping it, the socket).
This layer instead waits for Redis to come back, and says meanwhile that it is in an
outage, so that consumers check their keys against the database on their own instead
(synthesis.stream.consumer). `group_add` raises ChannelLayerUnavailable, a consumer
that could not join its group retries; `group_discard` never fails (memberships expire).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from channels.layers import BaseChannelLayer
from channels_redis.core import RedisChannelLayer
from django.conf import settings

from core.redis import REDIS_ERRORS

logger = logging.getLogger(__name__)

RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 5.0


class ChannelLayerUnavailable(Exception):
    pass


class ResilientRedisChannelLayer(RedisChannelLayer):  # type: ignore[misc]  # channels_redis ships no types
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outage_since: float | None = None
        # Bumped when Redis answers again after an outage: memberships made before it may
        # be gone (a restarted Redis keeps nothing), so consumers join their groups again.
        self.recoveries = 0

    async def receive(self, channel: str) -> dict[str, Any]:
        delay = RETRY_FIRST_SECONDS
        while True:
            try:
                return await super().receive(channel)  # type: ignore[no-any-return]
            except REDIS_ERRORS as exc:
                self._outage(exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)
            if await self._answers():
                self._recovered()

    async def group_add(self, group: str, channel: str) -> None:
        # Bounded like every other Redis call: a Redis that hangs must not hold up a new
        # connection for the layer's long read timeout.
        try:
            await asyncio.wait_for(super().group_add(group, channel), settings.REDIS_TIMEOUT_SECONDS)
        except (TimeoutError, *REDIS_ERRORS) as exc:
            self._outage(exc)
            raise ChannelLayerUnavailable(str(exc)) from exc
        self._recovered()

    async def group_discard(self, group: str, channel: str) -> None:
        try:
            await asyncio.wait_for(super().group_discard(group, channel), settings.REDIS_TIMEOUT_SECONDS)
        except (TimeoutError, *REDIS_ERRORS) as exc:
            self._outage(exc)

    async def _answers(self) -> bool:
        try:
            await self.connection(0).ping()
        except REDIS_ERRORS:
            return False
        return True

    def _outage(self, exc: BaseException) -> None:
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            logger.warning(
                "The channel layer lost Redis (%s); open streams poll the database meanwhile.", exc
            )

    def _recovered(self) -> None:
        if self.outage_since is not None:
            logger.info(
                "The channel layer has Redis again after %.1f s.", time.monotonic() - self.outage_since
            )
            self.outage_since = None
            self.recoveries += 1


def channel_layer_in_outage(layer: BaseChannelLayer | None) -> bool:
    """Whether broadcasts may be missed now (a layer that cannot tell: never)."""
    return isinstance(layer, ResilientRedisChannelLayer) and layer.outage_since is not None


def channel_layer_recoveries(layer: BaseChannelLayer | None) -> int:
    return layer.recoveries if isinstance(layer, ResilientRedisChannelLayer) else 0


__all__ = [
    "ChannelLayerUnavailable",
    "ResilientRedisChannelLayer",
    "channel_layer_in_outage",
    "channel_layer_recoveries",
]
