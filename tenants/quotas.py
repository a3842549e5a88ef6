"""Monthly audio quotas (`Tenant.quota_minutes`, calendar months in UTC), kept in the database.

A request that would start past the quota is refused; what counts is the audio
actually produced (a stream cut short counts what was sent). The counter is a
row per tenant and month, incremented atomically, so it survives restarts and
holds even while Redis is down. A quota of 0 means no quota.

The check reads the counter through a per-process cache (QUOTA_CACHE_SECONDS):
under ASGI every database read opens a connection in a fresh thread, which cost
about 10 ms of time to first audio on each request. Other processes' usage
therefore shows within that many seconds.
"""

from __future__ import annotations

import math
import time
import uuid
from datetime import UTC, date, datetime

from django.conf import settings
from django.db import IntegrityError
from django.db.models import F

from callwaiting_tts.errors import ApiError
from tenants.models import QuotaUsage, Tenant


def current_month(now: datetime | None = None) -> date:
    now = now or datetime.now(UTC)
    return date(now.year, now.month, 1)


def _seconds_until_next_month(now: datetime) -> int:
    following = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    return math.ceil((following - now).total_seconds())


# (tenant, month) -> (seconds used, when read). Event loop only.
_recently_read: dict[tuple[uuid.UUID, date], tuple[float, float]] = {}


async def quota_used_seconds(tenant: Tenant) -> float:
    month = current_month()
    cached = _recently_read.get((tenant.id, month))
    if cached is not None and time.monotonic() - cached[1] < settings.QUOTA_CACHE_SECONDS:
        return cached[0]
    this_month = QuotaUsage.objects.filter(tenant=tenant, month=month)
    used = float(await this_month.values_list("audio_seconds", flat=True).afirst() or 0.0)
    _recently_read[(tenant.id, month)] = (used, time.monotonic())
    return used


async def quota_check(tenant: Tenant) -> None:
    if tenant.quota_minutes == 0:
        return
    if await quota_used_seconds(tenant) >= tenant.quota_minutes * 60:
        now = datetime.now(UTC)
        raise ApiError(
            429,
            "quota_exceeded",
            f"This month's {tenant.quota_minutes} minutes of audio are used up; it renews on the 1st (UTC).",
            headers={"Retry-After": str(_seconds_until_next_month(now))},
        )


async def quota_add(tenant: Tenant, audio_seconds: float) -> None:
    if audio_seconds <= 0:
        return
    month = current_month()
    if (cached := _recently_read.get((tenant.id, month))) is not None:
        _recently_read[(tenant.id, month)] = (cached[0] + audio_seconds, cached[1])
    counter = QuotaUsage.objects.filter(tenant=tenant, month=month)
    if await counter.aupdate(audio_seconds=F("audio_seconds") + audio_seconds):
        return
    try:
        await QuotaUsage.objects.acreate(tenant=tenant, month=month, audio_seconds=audio_seconds)
    except IntegrityError:  # created by a concurrent request in between
        await counter.aupdate(audio_seconds=F("audio_seconds") + audio_seconds)
