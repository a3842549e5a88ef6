"""Monthly audio quotas (`Tenant.quota_minutes`, calendar months in UTC), kept in the database.

What counts is the audio actually sent (a stream cut short counts what went out;
phrase-cache hits count nothing). The counter is a row per tenant and month,
incremented by the usage writer in the same transaction as the usage rows it counts
(usage/recorder.py), so the two never disagree and both survive a database outage
through the usage spool. A quota of 0 means no quota.

Quotas are reserved, not only checked: a request admitted here holds a reservation of
its estimated audio (generously estimated: see RESERVE_CHARS_PER_SECOND) until it ends,
and a request is refused once what is used plus what is reserved reaches the quota. So
concurrent requests overshoot by at most about one request's audio, not by all of them.
When a request ends, its reservation becomes its actual audio, held here until a reading
of the database counter includes it (the usage writer marks its row written).
Reservations are per process; other processes' usage shows within those same seconds.

The counter is read through a per-process cache (QUOTA_CACHE_SECONDS): under ASGI every
database read opens a connection in a fresh thread, which cost about 10 ms of time to
first audio on each request. While the database is unreachable the last value read is
used (or none): a short outage must not stop speech, and what is used meanwhile is
still counted afterwards.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import F

from core.errors import ServiceError
from engines.text import Segment, estimated_audio_seconds
from tenants.models import Tenant
from usage.models import QuotaUsage

logger = logging.getLogger(__name__)


def current_month(now: datetime | None = None) -> date:
    now = now or datetime.now(UTC)
    return date(now.year, now.month, 1)


def _seconds_until_next_month(now: datetime) -> int:
    following = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
    return math.ceil((following - now).total_seconds())


# (tenant, month) -> (seconds used, when the read began). Event loop only.
_recently_read: dict[tuple[uuid.UUID, date], tuple[float, float]] = {}


async def _quota_read(tenant: Tenant, month: date) -> tuple[float, float]:
    """The tenant's counter for `month` and when that reading began (monotonic)."""
    cached = _recently_read.get((tenant.id, month))
    if cached is not None and time.monotonic() - cached[1] < settings.QUOTA_CACHE_SECONDS:
        return cached
    # Taken before the query: a row written while it runs counts as not yet read.
    read_at = time.monotonic()
    this_month = QuotaUsage.objects.filter(tenant=tenant, month=month)
    try:
        used = float(await this_month.values_list("audio_seconds", flat=True).afirst() or 0.0)
    except DatabaseError:
        logger.warning("Quota of tenant %s not readable; using the last value seen.", tenant.id)
        return cached if cached is not None else (0.0, 0.0)
    _recently_read[(tenant.id, month)] = (used, read_at)
    return used, read_at


async def quota_used_seconds(tenant: Tenant) -> float:
    used, _read_at = await _quota_read(tenant, current_month())
    return used


@dataclass
class _Settled:
    seconds: float
    written_at: float | None = None  # when the usage writer stored its row (monotonic)


@dataclass
class _Held:
    """Audio of one tenant and month that the counter, as last read, does not include."""

    reserved: float = 0.0  # requests running now, by estimate
    # Requests that ended, by usage record id, until a reading of the counter includes them.
    settled: dict[uuid.UUID, _Settled] = field(default_factory=dict)

    def seconds(self, read_at: float) -> float:
        for record_id in [
            record_id
            for record_id, entry in self.settled.items()
            if entry.written_at is not None and entry.written_at < read_at
        ]:
            del self.settled[record_id]  # the reading includes it
        return self.reserved + sum(entry.seconds for entry in self.settled.values())


# (tenant, month) -> what is held, and each settled record's place. The event loop
# reserves and settles; the usage writer's thread marks rows written: one lock for both.
_held: dict[tuple[uuid.UUID, date], _Held] = {}
_settled_records: dict[uuid.UUID, _Settled] = {}
_held_lock = threading.Lock()


@dataclass(eq=False)
class QuotaReservation:
    """A running request's claim on its tenant's quota; `settle` it once, when it ends."""

    key: tuple[uuid.UUID, date]
    record_id: uuid.UUID  # the id of the request's usage record
    seconds: float
    settled: bool = False

    def grow(self, seconds: float) -> None:
        """More text arrived (a WebSocket utterance): reserve its audio too."""
        with _held_lock:
            if not self.settled:
                self.seconds += seconds
                _held.setdefault(self.key, _Held()).reserved += seconds

    def settle(self, actual_seconds: float) -> None:
        """The request ended having sent `actual_seconds` (0 for cache hits and refusals):
        held until a reading of the counter includes its row."""
        with _held_lock:
            if self.settled:
                return
            self.settled = True
            held = _held.setdefault(self.key, _Held())
            held.reserved = max(0.0, held.reserved - self.seconds)
            if actual_seconds > 0 and settings.USAGE_RECORDS:
                entry = _Settled(actual_seconds)
                held.settled[self.record_id] = entry
                _settled_records[self.record_id] = entry


def quota_rows_written(record_ids: Iterable[uuid.UUID]) -> None:
    """The usage writer stored these records' rows (and their audio in the counter)."""
    now = time.monotonic()
    with _held_lock:
        for record_id in record_ids:
            if (entry := _settled_records.pop(record_id, None)) is not None:
                entry.written_at = now


# Speech runs at about 19 characters a second with Piper's English voice and about 14 with
# a slow XTTS voice: a reservation at 12 errs long, so concurrent requests cannot all fit
# under the quota on estimates that turn out short.
RESERVE_CHARS_PER_SECOND = 12.0


def quota_estimate(segments: list[Segment], speed: float) -> float:
    """The audio to reserve for these segments: a generous estimate."""
    return estimated_audio_seconds(segments, speed, chars_per_second=RESERVE_CHARS_PER_SECOND)


def _quota_exceeded(tenant: Tenant) -> ServiceError:
    return ServiceError(
        429,
        "quota_exceeded",
        f"This month's {tenant.quota_minutes} minutes of audio are used up; it renews on the 1st (UTC).",
        headers={"Retry-After": str(_seconds_until_next_month(datetime.now(UTC)))},
    )


async def quota_reserve(
    tenant: Tenant, estimated_seconds: float, *, record_id: uuid.UUID | None = None
) -> QuotaReservation | None:
    """Reserve a request's estimated audio, or raise 429 quota_exceeded when what is used
    and held already reaches the quota. None when the tenant has no quota."""
    if tenant.quota_minutes == 0:
        return None
    month = current_month()
    used, read_at = await _quota_read(tenant, month)
    # No await from here on: the check and the reservation are one step on the event loop.
    key = (tenant.id, month)
    with _held_lock:
        held = _held.setdefault(key, _Held())
        if used + held.seconds(read_at) >= tenant.quota_minutes * 60:
            raise _quota_exceeded(tenant)
        held.reserved += estimated_seconds
    return QuotaReservation(key, record_id or uuid.uuid4(), estimated_seconds)


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
