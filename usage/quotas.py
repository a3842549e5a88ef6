"""Monthly audio quotas (`Tenant.quota_minutes`, calendar months in UTC), kept in the database.

A request that would start past the quota is refused; what counts is the audio
actually sent (a stream cut short counts what went out; phrase-cache hits count
nothing). The counter is a row per tenant and month, incremented by the usage
writer in the same transaction as the usage rows it counts (usage/recorder.py),
so the two never disagree and both survive a database outage through the usage
spool. A quota of 0 means no quota.

The check reads the counter through a per-process cache (QUOTA_CACHE_SECONDS):
under ASGI every database read opens a connection in a fresh thread, which cost
about 10 ms of time to first audio on each request. Other processes' usage
therefore shows within that many seconds plus USAGE_FLUSH_SECONDS. While the
database is unreachable the last value read is used (or none): a short outage
must not stop speech, and what is used meanwhile is still counted afterwards.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, date, datetime

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import F

from core.errors import ServiceError
from tenants.models import Tenant
from usage.models import QuotaUsage

logger = logging.getLogger(__name__)


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
    try:
        used = float(await this_month.values_list("audio_seconds", flat=True).afirst() or 0.0)
    except DatabaseError:
        logger.warning("Quota of tenant %s not readable; using the last value seen.", tenant.id)
        return cached[0] if cached is not None else 0.0
    _recently_read[(tenant.id, month)] = (used, time.monotonic())
    return used


async def quota_check(tenant: Tenant) -> None:
    if tenant.quota_minutes == 0:
        return
    if await quota_used_seconds(tenant) >= tenant.quota_minutes * 60:
        now = datetime.now(UTC)
        raise ServiceError(
            429,
            "quota_exceeded",
            f"This month's {tenant.quota_minutes} minutes of audio are used up; it renews on the 1st (UTC).",
            headers={"Retry-After": str(_seconds_until_next_month(now))},
        )


def quota_note_local(tenant_id: uuid.UUID, audio_seconds: float) -> None:
    """Count audio this process just produced in its own view of the quota at
    once; the database counter follows when the usage row is written."""
    key = (tenant_id, current_month())
    if (cached := _recently_read.get(key)) is not None:
        _recently_read[key] = (cached[0] + audio_seconds, cached[1])


def quota_counters_add(seconds_by_month: Mapping[tuple[uuid.UUID, date], float]) -> None:
    """Add audio seconds to the per-month counters (inside the caller's transaction).

    Sorted, so that two writers touching the same counters lock them in the same order.
    """
    for (tenant_id, month), seconds in sorted(seconds_by_month.items()):
        counter = QuotaUsage.objects.filter(tenant_id=tenant_id, month=month)
        if counter.update(audio_seconds=F("audio_seconds") + seconds):
            continue
        try:
            with transaction.atomic():
                QuotaUsage.objects.create(tenant_id=tenant_id, month=month, audio_seconds=seconds)
        except IntegrityError:  # created by a concurrent writer in between
            counter.update(audio_seconds=F("audio_seconds") + seconds)
