"""Usage summaries for the dashboard: totals and groups over a period, for one tenant."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal

from django.db import connection
from django.db.models import Aggregate, Count, F, FloatField, Q, QuerySet, Sum
from django.db.models.functions import TruncDate

from tenants.models import Tenant
from usage.models import QuotaUsage, UsageLog
from usage.quotas import current_month
from usage.recorder import CANCELLED, CLIENT_DISCONNECTED

GroupBy = Literal["day", "voice", "endpoint"]
GROUP_FIELDS: dict[str, Any] = {
    "day": TruncDate("created_at"),  # in UTC, the project's TIME_ZONE
    "voice": F("voice_id"),
    "endpoint": F("endpoint"),
}
PERCENTILES = (("latency_ms_p50", 0.50), ("latency_ms_p95", 0.95))

# A cancelled stream is the caller's choice, not a failure: counted apart.
_CANCELLED = Q(error_code__in=(CLIENT_DISCONNECTED, CANCELLED))
_FAILED = Q(error_code__isnull=False) & ~_CANCELLED
_HAS_AUDIO = Q(latency_ms__isnull=False)


class PercentileCont(Aggregate):
    """PostgreSQL's percentile_cont: the linearly interpolated quantile."""

    function = "PERCENTILE_CONT"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression: Any, fraction: float, **extra: Any) -> None:
        super().__init__(expression, fraction=float(fraction), **extra)


def _percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """The same interpolation as percentile_cont, for databases without it (SQLite)."""
    if not sorted_values:
        return None
    position = (len(sorted_values) - 1) * fraction
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_values) - 1)
    return sorted_values[lower] + (sorted_values[upper] - sorted_values[lower]) * (position - lower)


@dataclass(frozen=True)
class UsageQuery:
    tenant: Tenant
    start: datetime  # inclusive
    end: datetime  # exclusive
    group_by: GroupBy | None = None

    def rows(self) -> QuerySet[UsageLog]:
        return UsageLog.objects.filter(
            tenant=self.tenant, created_at__gte=self.start, created_at__lt=self.end
        )


def _metrics() -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "requests": Count("id"),
        "errors": Count("id", filter=_FAILED),
        "cancelled": Count("id", filter=_CANCELLED),
        "characters": Sum("input_chars"),
        "audio_seconds": Sum("audio_seconds"),
        "audio_bytes": Sum("audio_bytes"),
    }
    if connection.vendor == "postgresql":
        for name, fraction in PERCENTILES:
            metrics[name] = PercentileCont("latency_ms", fraction, filter=_HAS_AUDIO)
    return metrics


def _tidy(values: dict[str, Any]) -> dict[str, Any]:
    seconds = values.get("audio_seconds") or 0.0
    tidy = {
        "requests": values["requests"],
        "errors": values["errors"],
        "cancelled": values["cancelled"],
        "characters": values["characters"] or 0,
        "audio_seconds": round(seconds, 3),
        "audio_bytes": values["audio_bytes"] or 0,
    }
    for name, _fraction in PERCENTILES:
        latency = values.get(name)
        tidy[name] = None if latency is None else round(latency, 1)
    return tidy


def _python_percentiles(rows: QuerySet[UsageLog], key: Any, groups: dict[Any, dict[str, Any]]) -> None:
    """Fill in the latency percentiles where the database has no percentile_cont
    (SQLite, the embedded default). `key` groups the rows; None: all together."""
    if connection.vendor == "postgresql":
        return
    latencies: dict[Any, list[float]] = defaultdict(list)
    with_audio = rows.filter(_HAS_AUDIO)
    if key is None:
        latencies[None] = [float(v) for v in with_audio.values_list("latency_ms", flat=True) if v is not None]
    else:
        for group, latency in with_audio.annotate(key=key).values_list("key", "latency_ms"):
            if latency is not None:
                latencies[group].append(latency)
    for group, values in groups.items():
        ordered = sorted(latencies.get(group, []))
        for name, fraction in PERCENTILES:
            values[name] = _percentile(ordered, fraction)


def usage_summary(query: UsageQuery) -> dict[str, Any]:
    totals = query.rows().aggregate(**_metrics())
    _python_percentiles(query.rows(), None, {None: totals})
    summary: dict[str, Any] = {
        "from": query.start.isoformat().replace("+00:00", "Z"),
        "to": query.end.isoformat().replace("+00:00", "Z"),
        "group_by": query.group_by,
        "totals": _tidy(totals),
    }
    if query.group_by is not None:
        grouped: dict[Any, dict[str, Any]] = {}
        for row in (
            query.rows()
            .annotate(key=GROUP_FIELDS[query.group_by])
            .values("key")
            .annotate(**_metrics())
            .order_by("key")
        ):
            values: dict[str, Any] = dict(row)
            grouped[values.pop("key")] = values
        _python_percentiles(query.rows(), GROUP_FIELDS[query.group_by], grouped)
        summary["groups"] = [
            {"key": key.isoformat() if isinstance(key, date) else key, **_tidy(values)}
            for key, values in grouped.items()
        ]
    summary["quota"] = quota_summary(query.tenant)
    return summary


def quota_summary(tenant: Tenant) -> dict[str, Any]:
    """This month's audio against the tenant's quota (read fresh, not through the cache)."""
    month = current_month()
    used = float(
        QuotaUsage.objects.filter(tenant=tenant, month=month).values_list("audio_seconds", flat=True).first()
        or 0.0
    )
    limit = tenant.quota_minutes * 60 if tenant.quota_minutes else None
    return {
        "month": month.strftime("%Y-%m"),
        "used_seconds": round(used, 3),
        "limit_seconds": limit,
        "remaining_seconds": None if limit is None else round(max(0.0, limit - used), 3),
    }
