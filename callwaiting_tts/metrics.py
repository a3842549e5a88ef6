"""GET /metrics: the service's metrics (core.metrics) and gauges read from its state when
scraped, next to django-prometheus's HTTP and database basics. Served only to a scraper
holding METRICS_TOKEN (see metrics_view).
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

from api.errors import error_response
from engines import loaded_engine
from synthesis.stream.stats import stream_stats
from usage.recorder import usage_spool

# (metric, key in SpeechEngine.info(), help): what an autoscaler reads of the engine.
ENGINE_GAUGES = (
    (
        "cwt_engine_jobs_in_flight",
        "active_jobs",
        "Streams the engine holds (HTTP syntheses and WebSocket utterances): its demand.",
    ),
    (
        "cwt_engine_queue_depth",
        "queued_jobs",
        "Requests waiting for the engine to have real-time room for them.",
    ),
    (
        "cwt_engine_capacity_audio_seconds_per_second",
        "capacity_audio_seconds_per_second",
        "Audio seconds per second the engine is measured to make: the real-time streams it can feed.",
    ),
    (
        "cwt_engine_realtime_limit",
        "realtime_limit",
        "Streams admission lets the engine hold (capacity times headroom).",
    ),
    ("cwt_engine_queued_total", "jobs_queued", "Requests that waited in the engine's queue."),
    (
        "cwt_engine_refused_total",
        "jobs_refused",
        "Requests the engine refused (no real-time room soon enough, or share).",
    ),
    (
        "cwt_engine_busy_seconds_total",
        "busy_seconds",
        "Seconds the engine has spent with at least one job in flight.",
    ),
)


class _ServiceState:
    """Gauges read when scraped, from the state the service already keeps."""

    def __init__(self) -> None:
        self.active_streams = Gauge(
            "cwt_active_streams", "Open streams: HTTP streamed responses and WebSocket connections."
        )
        self.active_streams.set_function(self._active_streams)
        self.utterances = Gauge("cwt_stream_utterances_active", "WebSocket utterances being spoken.")
        self.utterances.set_function(lambda: stream_stats.utterances_active)
        # The engine's admission state (engines/capacity.py), by its key in engine.info().
        self.engine = [self._engine_gauge(*gauge) for gauge in ENGINE_GAUGES]
        self.spool_bytes = Gauge("cwt_usage_spool_bytes", "Usage records waiting for the database (bytes).")
        self.spool_bytes.set_function(lambda: _spool()[1])
        self.spool_files = Gauge("cwt_usage_spool_files", "Usage journal files waiting for the database.")
        self.spool_files.set_function(lambda: _spool()[0])
        self.journal_writable = Gauge(
            "cwt_usage_journal_writable", "1 while the usage journal can be written; 0: synthesis is refused."
        )
        self.journal_writable.set_function(lambda: float(usage_spool().writable))
        self.held_records = Gauge(
            "cwt_usage_held_records", "Usage records held in memory because the journal cannot be written."
        )
        self.held_records.set_function(lambda: float(usage_spool().held()))
        self.gpu_memory = Gauge("cwt_gpu_memory_bytes", "GPU memory allocated by the engine (0 off GPU).")
        self.gpu_memory.set_function(_gpu_memory_bytes)

    @staticmethod
    def _engine_gauge(name: str, key: str, documentation: str) -> Gauge:
        gauge = Gauge(name, documentation)
        gauge.set_function(lambda: _engine_value(key))
        return gauge

    @staticmethod
    def _active_streams() -> float:
        stats = stream_stats
        return float(stats.connections + stats.http_streams)


def _engine_value(name: str) -> float:
    engine = loaded_engine()
    value = engine.info().get(name) if engine is not None else None
    return float(value) if value is not None else 0.0


def _spool() -> tuple[int, int]:
    return usage_spool().pending()


def _gpu_memory_bytes() -> float:
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
    if request.method != "GET":  # HEAD arrives as GET (middleware.MethodMiddleware)
        return error_response(request, 405, "method_not_allowed", "Use GET.", headers={"Allow": "GET"})
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
