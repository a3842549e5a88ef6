"""Liveness: cheap, unauthenticated, and never touching the database."""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.decorators import api_view, authentication_classes, permission_classes
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response

from core.redis import breaker, redis_configured
from engines import loaded_engine
from synthesis.stream.stats import stream_stats
from usage.recorder import usage_flusher, usage_spool

PROCESS_STARTED = time.monotonic()


def engine_info() -> dict[str, Any]:
    """What the speech engine reports about itself (health never loads it)."""
    engine = loaded_engine()
    if engine is None:
        return {"name": settings.TTS_ENGINE, "loaded": False}
    return engine.info()


@extend_schema(
    auth=[],
    summary="Liveness and engine information",
    responses=inline_serializer(
        "Health",
        {
            "status": serializers.CharField(),
            "version": serializers.CharField(),
            "uptime_s": serializers.FloatField(),
            "engine": serializers.DictField(allow_null=True),
            "redis": serializers.DictField(),
            "usage": serializers.DictField(),
            "streams": serializers.DictField(),
        },
    ),
)
@api_view(["GET"])
@authentication_classes([])
@permission_classes([AllowAny])
def health(request: Request) -> Response:
    return Response(
        {
            "status": "ok",
            "version": settings.VERSION,
            "uptime_s": round(time.monotonic() - PROCESS_STARTED, 3),
            "engine": engine_info(),
            "redis": {
                "configured": redis_configured(),
                "fallback_active": redis_configured() and not breaker.allows(),
                "failures": breaker.failures,
            },
            "usage": usage_info(),
            "streams": {
                "connections": stream_stats.connections,
                "utterances_active": stream_stats.utterances_active,
                "paused_for_slow_reader": stream_stats.paused_for_slow_reader,
                "pauses_total": stream_stats.pauses_total,
            },
        }
    )


def usage_info() -> dict[str, Any]:
    """The usage buffer: records waiting for the database, and whether it is away."""
    spool = usage_spool()
    files, size = spool.pending()
    flusher = usage_flusher()
    failing_since = spool.failing_since
    return {
        # False while the journal cannot be written (synthesis is refused: usage_unavailable).
        "journal_writable": spool.writable,
        "journal_error": spool.failure,
        "journal_failing_s": None if failing_since is None else round(time.monotonic() - failing_since, 1),
        # Records kept in memory meanwhile, and those lost because that store was full.
        "held_records": spool.held(),
        "lost_records": spool.lost,
        "spooled_files": files,
        "spooled_bytes": size,
        "database_unavailable": flusher is not None and flusher.outage_since is not None,
        "rows_written": 0 if flusher is None else flusher.rows_written,
        # Records the database refused (see the dead-letter file in the spool): not lost,
        # but not billed until someone looks.
        "dead_letters": spool.dead_letters(),
    }
