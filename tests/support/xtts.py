"""The real XTTS engine on a tiny, randomly initialised checkpoint (no GPU here)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engines.capacity import QueuePolicy
from engines.xtts import XttsEngine


@contextmanager
def loaded_tiny_xtts(checkpoint: Path, **options: Any) -> Iterator[XttsEngine]:
    """The real XTTS engine on the tiny checkpoint: CPU, small chunks, greedy (repeatable) decoding."""
    settings: dict[str, Any] = {
        "device": "cpu",
        "stream_chunk_size": 4,
        "max_audio_tokens": 12,
        "deterministic": True,
        # Concurrency tests of the engine itself: admission by measured capacity must not bind.
        "queue_policy": QueuePolicy(realtime=False),
    }
    engine = XttsEngine(checkpoint_dir=str(checkpoint), **{**settings, **options})
    engine.load()
    try:
        yield engine
    finally:
        engine.close()
