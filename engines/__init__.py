"""The process's one speech engine, chosen by TTS_ENGINE and loaded once."""

from __future__ import annotations

import threading

from django.conf import settings

from core.redis import redis_configured
from engines.base import BuiltinVoice, SpeechEngine, SpeechJob
from engines.capacity import EngineSlot, QueuePolicy
from engines.errors import (
    CloningNotSupported,
    EngineConfigurationError,
    EngineFailure,
    EngineOverloaded,
    EngineShareExceeded,
)
from engines.fleet import RedisFleetShare

__all__ = [
    "BuiltinVoice",
    "CloningNotSupported",
    "EngineConfigurationError",
    "EngineFailure",
    "EngineOverloaded",
    "EngineShareExceeded",
    "EngineSlot",
    "QueuePolicy",
    "SpeechEngine",
    "SpeechJob",
    "get_engine",
    "loaded_engine",
]

_engine: SpeechEngine | None = None
_engine_lock = threading.Lock()


def queue_policy() -> QueuePolicy:
    return QueuePolicy(
        headroom=settings.ENGINE_REALTIME_HEADROOM,
        realtime=settings.ENGINE_ADMISSION == "realtime",
        queue_max=settings.ENGINE_QUEUE_MAX,
        queue_seconds=settings.ENGINE_QUEUE_SECONDS,
    )


def build_engine() -> SpeechEngine:
    engine = _build_configured_engine()
    if redis_configured():  # every process's slots count toward a tenant's share
        engine.admission.share_across(
            RedisFleetShare(settings.REDIS_KEY_PREFIX), max_per_owner=settings.ENGINE_FLEET_JOBS_PER_TENANT
        )
    return engine


def _build_configured_engine() -> SpeechEngine:
    choice = settings.TTS_ENGINE
    if choice == "auto":
        choice = "xtts" if settings.XTTS_MODEL_PATH else "piper"
    if choice == "xtts":
        from engines.xtts import XttsEngine

        return XttsEngine(
            checkpoint_dir=settings.XTTS_MODEL_PATH,
            device=settings.XTTS_DEVICE,
            half=settings.XTTS_HALF,
            max_active_jobs=settings.ENGINE_MAX_ACTIVE_JOBS,
            max_jobs_per_owner=settings.ENGINE_MAX_JOBS_PER_TENANT,
            queue_policy=queue_policy(),
            stream_chunk_size=settings.XTTS_STREAM_CHUNK_TOKENS,
            max_audio_tokens=settings.XTTS_MAX_AUDIO_TOKENS,
            deterministic=settings.XTTS_DETERMINISTIC,
            max_batch=settings.XTTS_MAX_BATCH,
            half_dtype=settings.XTTS_HALF_DTYPE,
        )
    from engines.piper import PiperEngine

    return PiperEngine(
        workers=settings.PIPER_WORKERS,
        threads_per_worker=settings.PIPER_THREADS_PER_WORKER,
        max_active_jobs=settings.ENGINE_MAX_ACTIVE_JOBS,
        max_jobs_per_owner=settings.ENGINE_MAX_JOBS_PER_TENANT,
        queue_policy=queue_policy(),
        noise_scale=settings.PIPER_NOISE_SCALE,
        noise_w_scale=settings.PIPER_NOISE_W_SCALE,
    )


def get_engine() -> SpeechEngine:
    """The loaded engine; the first call loads it (asgi.py makes that call at start-up)."""
    global _engine
    if _engine is None:
        with _engine_lock:
            if _engine is None:
                engine = build_engine()
                engine.load()
                _engine = engine
    return _engine


def loaded_engine() -> SpeechEngine | None:
    return _engine
