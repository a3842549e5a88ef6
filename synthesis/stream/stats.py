"""This process's streams, for /v1/health, /metrics and the SIGTERM drain."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StreamStats:
    """This process's WebSocket streams, for /v1/health (and metrics)."""

    connections: int = 0
    http_streams: int = 0  # streamed /v1/synthesize responses in progress
    utterances_active: int = 0
    paused_for_slow_reader: int = 0
    pauses_total: int = 0


stream_stats = StreamStats()
