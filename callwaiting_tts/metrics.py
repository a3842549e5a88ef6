"""Prometheus metrics: the service's own, next to django-prometheus's HTTP and database basics.

Synthesis metrics are recorded in one place, when a usage record is made
(usage.recorder.UsageMeter.finish), so every synthesis endpoint and every
WebSocket utterance counts the same way. Labels are bounded: endpoint, format,
status code, cached, refusal reason; a tenant label only with METRICS_TENANT_LABELS
(one series per tenant). No label ever carries text.

GET /metrics serves them to a scraper holding METRICS_TOKEN (see metrics_view).
"""

from __future__ import annotations

import hmac
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from callwaiting_tts.errors import error_response

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
LIMIT_REFUSALS = Counter("cwt_limit_refusals", "Requests refused by a tenant limit.", _labels("reason"))
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


def limit_refused(reason: str, tenant_id: str) -> None:
    """A refusal that is not a synthesis request (a WebSocket connection over the stream cap)."""
    tenant = {"tenant": tenant_id} if settings.METRICS_TENANT_LABELS else {}
    LIMIT_REFUSALS.labels(reason=reason, **tenant).inc()


class _ServiceState:
    """Gauges read when scraped, from the state the service already keeps."""

    def __init__(self) -> None:
        self.active_streams = Gauge(
            "cwt_active_streams", "Open streams: HTTP streamed responses and WebSocket connections."
        )
        self.active_streams.set_function(self._active_streams)
        self.utterances = Gauge("cwt_stream_utterances_active", "WebSocket utterances being spoken.")
        self.utterances.set_function(lambda: _stream_stats().utterances_active)
        self.engine_jobs = Gauge(
            "cwt_engine_jobs_in_flight", "Synthesis jobs admitted by the engine (its queue)."
        )
        self.engine_jobs.set_function(lambda: _engine_value("active_jobs"))
        self.engine_busy = Gauge(
            "cwt_engine_busy_seconds_total", "Seconds the engine has spent with at least one job in flight."
        )
        self.engine_busy.set_function(lambda: _engine_value("busy_seconds"))
        self.spool_bytes = Gauge("cwt_usage_spool_bytes", "Usage records waiting for the database (bytes).")
        self.spool_bytes.set_function(lambda: _spool()[1])
        self.spool_files = Gauge("cwt_usage_spool_files", "Usage journal files waiting for the database.")
        self.spool_files.set_function(lambda: _spool()[0])
        self.gpu_memory = Gauge("cwt_gpu_memory_bytes", "GPU memory allocated by the engine (0 off GPU).")
        self.gpu_memory.set_function(_gpu_memory_bytes)

    @staticmethod
    def _active_streams() -> float:
        stats = _stream_stats()
        return float(stats.connections + stats.http_streams)


def _stream_stats() -> Any:
    from synthesis.streaming import stream_stats

    return stream_stats


def _engine_value(name: str) -> float:
    from synthesis.engines import loaded_engine

    engine = loaded_engine()
    return float(engine.info().get(name, 0)) if engine is not None else 0.0


def _spool() -> tuple[int, int]:
    from usage.recorder import usage_spool

    return usage_spool().pending()


def _gpu_memory_bytes() -> float:
    from synthesis.engines import loaded_engine

    engine = loaded_engine()
    if engine is None or "cuda" not in str(engine.info().get("device", "")):
        return 0.0
    import torch

    return float(torch.cuda.memory_allocated())


service_state = _ServiceState()


def metrics_view(request: HttpRequest) -> HttpResponseBase:
    """The scrape endpoint: only with `Authorization: Bearer <METRICS_TOKEN>`;
    without a configured token it does not exist (404)."""
    token = settings.METRICS_TOKEN
    if not token:
        return error_response(request, 404, "not_found", "No such endpoint or object.")
    offered = request.headers.get("Authorization", "")
    if not hmac.compare_digest(offered.encode(), f"Bearer {token}".encode()):
        return error_response(
            request,
            401,
            "invalid_metrics_token",
            "Send Authorization: Bearer <METRICS_TOKEN>.",
            headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
        )
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
