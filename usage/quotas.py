"""Monthly audio quotas (`Tenant.quota_minutes`, calendar months in UTC), kept in the database.

What counts is the audio actually sent (a stream cut short counts what went out;
phrase-cache hits count nothing). The counter is a row per tenant and month,
incremented by the usage writer in the same transaction as the usage rows it counts
(usage/recorder.py), so the two never disagree and both survive a database outage
through the usage spool. A quota of 0 means no quota.

Quotas are reserved, not only checked: a request admitted here holds a reservation of
its estimated audio (generously estimated: see RESERVE_CHARS_PER_SECOND) until it ends,
and a request is refused once what is used plus what is held reaches the quota. So
concurrent requests overshoot by at most about one request's audio, not by all of them.
When a request ends, its reservation becomes its actual audio, held until a reading of
the database counter includes it (the usage writer marks its row written). The holds live
in Redis, shared by every process (usage/quota_holds.py); without Redis, per process.

The counter is read through a per-process cache (QUOTA_CACHE_SECONDS): under ASGI every
database read opens a connection in a fresh thread, which cost about 10 ms of time to
first audio on each request. While the database is unreachable the last value read is
used (or none): a short outage must not stop speech, and what is used meanwhile is
still counted afterwards.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import F

from core.errors import ServiceError
from engines.text import Segment, estimated_audio_seconds
from tenants.models import Tenant
from usage.models import QuotaUsage
from usage.quota_holds import QuotaReservation, holds_clock_ms, holds_reserve, holds_rows_written

logger = logging.getLogger(__name__)


def current_month(now: datetime | None = None) -> date:
    now = now or datetime.now(UTC)
    return date(now.year, now.month, 1)


def _seconds_until_next_month(now: datetime) -> int:
    following = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    return math.ceil((following - now).total_seconds())


# (tenant, month) -> (seconds used, when the read began on the holds' clock, when it was
# made on this process's monotonic clock). Event loop only.
_recently_read: dict[tuple[uuid.UUID, date], tuple[float, float, float]] = {}


async def _quota_read(tenant_id: uuid.UUID, month: date) -> tuple[float, float]:
    """The tenant's counter for `month`, and when that reading began (on the clock the
    holds are stamped with: they are compared with it)."""
    cached = _recently_read.get((tenant_id, month))
    if cached is not None and time.monotonic() - cached[2] < settings.QUOTA_CACHE_SECONDS:
        return cached[0], cached[1]
    # Taken before the query: a row written while it runs counts as not yet read.
    read_at_ms = await holds_clock_ms()
    this_month = QuotaUsage.objects.filter(tenant_id=tenant_id, month=month)
    try:
        used = float(await this_month.values_list("audio_seconds", flat=True).afirst() or 0.0)
    except DatabaseError:
        logger.warning("Quota of tenant %s not readable; using the last value seen.", tenant_id)
        return (cached[0], cached[1]) if cached is not None else (0.0, 0.0)
    _recently_read[(tenant_id, month)] = (used, read_at_ms, time.monotonic())
    return used, read_at_ms


async def quota_used_seconds(tenant: Tenant) -> float:
    used, _read_at = await _quota_read(tenant.id, current_month())
    return used


def quota_rows_written(records: Iterable[tuple[uuid.UUID, uuid.UUID, date]]) -> None:
    """The usage writer stored these rows (record id, tenant, month) and counted their audio."""
    holds_rows_written((record_id, (tenant_id, month)) for record_id, tenant_id, month in records)


# Speech runs at about 19 characters a second with Piper's English voice and about 14 with
# a slow XTTS voice: a reservation at 12 errs long, so concurrent requests cannot all fit
# under the quota on estimates that turn out short.
RESERVE_CHARS_PER_SECOND = 12.0


def quota_estimate(segments: list[Segment], speed: float) -> float:
    """The audio to reserve for these segments: a generous estimate."""
    return estimated_audio_seconds(segments, speed, chars_per_second=RESERVE_CHARS_PER_SECOND)


def _quota_exceeded(quota_minutes: float) -> ServiceError:
    return ServiceError(
        429,
        "quota_exceeded",
        f"This month's {quota_minutes:g} minutes of audio are used up; it renews on the 1st (UTC).",
        headers={"Retry-After": str(_seconds_until_next_month(datetime.now(UTC)))},
    )


async def quota_reserve(
    tenant: Tenant,
    estimated_seconds: float,
    *,
    record_id: uuid.UUID | None = None,
    created_at: datetime | None = None,
) -> QuotaReservation | None:
    """Reserve a request's estimated audio, or raise 429 quota_exceeded when what is used
    and held (by every process) already reaches the quota. None when the tenant has none.
    `created_at` is the usage record's: its month is the one the audio counts in."""
    if tenant.quota_minutes == 0:
        return None
    month = current_month(created_at)
    used, read_at_ms = await _quota_read(tenant.id, month)
    reservation = await holds_reserve(
        (tenant.id, month),
        limit=tenant.quota_minutes * 60,
        used=used,
        read_at_ms=read_at_ms,
        record_id=record_id or uuid.uuid4(),
        estimate=estimated_seconds,
    )
    if reservation is None:
        raise _quota_exceeded(tenant.quota_minutes)
    return reservation


async def quota_extend(reservation: QuotaReservation, estimated_seconds: float) -> None:
    """Reserve more audio for a running request (the next piece of a WebSocket utterance,
    before its audio is made), or raise 429 quota_exceeded when what is used and held
    (by every process, this request's own reservation included) already reaches the quota:
    the request then ends there, its audio so far counted when it settles."""
    used, read_at_ms = await _quota_read(reservation.key[0], reservation.key[1])
    if not await reservation.extend(estimated_seconds, used=used, read_at_ms=read_at_ms):
        raise _quota_exceeded(reservation.limit / 60)


async def quota_check(tenant: Tenant) -> None:
    """Refuse a request when the quota is used up (counting what is held), reserving nothing."""
    reservation = await quota_reserve(tenant, 0.0)
    if reservation is not None:
        reservation.settle(0.0)


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
