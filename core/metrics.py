"""The service's own Prometheus metric objects, and the one place synthesis is recorded.

Synthesis metrics are recorded when a usage record is made (usage.recorder.UsageMeter.finish),
so every synthesis endpoint and every WebSocket utterance counts the same way. Labels are
bounded: endpoint, format, status code, cached, refusal reason; a tenant label only with
METRICS_TENANT_LABELS (one series per tenant). No label ever carries text.
"""

from __future__ import annotations

from django.conf import settings
from prometheus_client import Counter, Histogram

# 25 ms to 5 s, finer where voice agents live (under a second), then the slow tail.
LATENCY_BUCKETS = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, float("inf"))
TOTAL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, float("inf"))
REFUSALS = ("rate_limited", "quota_exceeded", "stream_limit")


def _labels(*names: str) -> list[str]:
    return [*names, "tenant"] if settings.METRICS_TENANT_LABELS else list(names)


SYNTHESIS_REQUESTS = Counter(
    "cwt_synthesis_requests",
    "Synthesis requests (HTTP requests and WebSocket utterances), by how they ended.",
    _labels("endpoint", "format", "status", "cached"),
)
TIME_TO_FIRST_AUDIO = Histogram(
    "cwt_time_to_first_audio_seconds",
    "From the request (or utterance start) to its first audio byte sent.",
    _labels("endpoint"),
    buckets=LATENCY_BUCKETS,
)
SYNTHESIS_DURATION = Histogram(
    "cwt_synthesis_duration_seconds",
    "From the request to its last byte (or its error).",
    _labels("endpoint"),
    buckets=TOTAL_BUCKETS,
)
AUDIO_SECONDS = Counter("cwt_audio_seconds", "Seconds of audio sent.", _labels("endpoint"))
AUDIO_BYTES = Counter("cwt_audio_bytes", "Bytes of encoded audio sent.", _labels("endpoint"))
USAGE_DEAD_LETTERS = Counter(
    "cwt_usage_dead_letters",
    "Usage records the database refused, moved to the dead-letter file (see /v1/health).",
)
USAGE_JOURNAL_FAILURES = Counter(
    "cwt_usage_journal_failures",
    "Usage records the journal could not take (disk full, read-only, permission): held in memory.",
)
USAGE_RECORDS_LOST = Counter(
    "cwt_usage_records_lost",
    "Usage records dropped: the journal failed and the held store was full (each one is logged).",
)
USAGE_UNAVAILABLE_REFUSALS = Counter(
    "cwt_usage_unavailable_refusals",
    "Synthesis requests and utterances refused (usage_unavailable): their usage could not be recorded.",
)
LIMIT_REFUSALS = Counter("cwt_limit_refusals", "Requests refused by a tenant limit.", _labels("reason"))
CONNECTION_CUTS = Counter(
    "cwt_connections_cut",
    "Connections the server cut: slow headers or body, too many from one address, no WebSocket "
    "auth in time, a streamed response its client stopped reading.",
    ["reason"],
)
HTTP_REQUESTS = Counter(
    "cwt_http_requests", "API requests (under /v1), by route and status.", ["method", "route", "status"]
)
HTTP_DURATION = Histogram(
    "cwt_http_request_duration_seconds",
    "API request time until the response starts (streamed bodies go on after).",
    ["route"],
    buckets=LATENCY_BUCKETS,
)


def synthesis_observed(
    *,
    tenant_id: str,
    endpoint: str,
    audio_format: str,
    status: int,
    error_code: str | None,
    cached: bool,
    first_audio_s: float | None,
    total_s: float,
    audio_seconds: float,
    audio_bytes: int,
) -> None:
    tenant = {"tenant": tenant_id} if settings.METRICS_TENANT_LABELS else {}
    SYNTHESIS_REQUESTS.labels(
        endpoint=endpoint,
        format=audio_format or "none",
        status=str(status),
        cached=str(cached).lower(),
        **tenant,
    ).inc()
    if first_audio_s is not None:
        TIME_TO_FIRST_AUDIO.labels(endpoint=endpoint, **tenant).observe(first_audio_s)
    SYNTHESIS_DURATION.labels(endpoint=endpoint, **tenant).observe(total_s)
    if audio_seconds:
        AUDIO_SECONDS.labels(endpoint=endpoint, **tenant).inc(audio_seconds)
    if audio_bytes:
        AUDIO_BYTES.labels(endpoint=endpoint, **tenant).inc(audio_bytes)
    if error_code in REFUSALS:
        LIMIT_REFUSALS.labels(reason=error_code, **tenant).inc()
    elif error_code == "usage_unavailable":
        USAGE_UNAVAILABLE_REFUSALS.inc()


def limit_refused(reason: str, tenant_id: str) -> None:
    """A refusal that is not a synthesis request (a WebSocket connection over the stream cap)."""
    tenant = {"tenant": tenant_id} if settings.METRICS_TENANT_LABELS else {}
    LIMIT_REFUSALS.labels(reason=reason, **tenant).inc()
