"""The interface every speech engine implements, and what they share."""

from __future__ import annotations

import abc
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.core.exceptions import ImproperlyConfigured

from engines.text import Segment, Speech, effective_rate


class EngineConfigurationError(ImproperlyConfigured):
    """The engine cannot start with the configured settings (raised at start-up)."""


class EngineOverloaded(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"The speech engine is at capacity; retry in {retry_after_s} s.")
        self.retry_after_s = retry_after_s


class EngineShareExceeded(EngineOverloaded):
    """One owner (a tenant) already runs its share of the engine's jobs; others may not."""

    def __init__(self, share: int) -> None:
        super().__init__(retry_after_s=1)
        self.args = (f"This tenant already runs {share} syntheses, its share of the engine; retry shortly.",)
        self.share = share


class CloningNotSupported(Exception):
    pass


class EngineFailure(Exception):
    """The engine failed while generating audio for one request."""


@dataclass(frozen=True)
class BuiltinVoice:
    voice_id: str
    name: str
    language: str
    languages: tuple[str, ...] = ()


@dataclass(frozen=True)
class SpeechJob:
    segments: Sequence[Segment]
    voice: BuiltinVoice | None = None
    # Engine-specific conditioning of a cloned voice (bytes from compute_conditioning).
    conditioning: bytes | None = None
    language: str = "en"
    speed: float = 1.0
    # Whose job this is (a tenant), for the engine's fair share; "" for the service's own.
    owner: str = ""

    def rate_of(self, segment: Speech) -> float:
        """The speed an engine speaks `segment` at: held to the range of `speed`."""
        return effective_rate(self.speed, segment.rate)


def voice_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class SpeechEngine(abc.ABC):
    """Load once per process; stream float32 mono audio at `sample_rate`.

    `stream` is an async iterator: a consumer that stops iterating (or is
    cancelled) stops the engine's work for that request.
    """

    name: str
    model: str
    device: str
    sample_rate: int
    supports_cloning = False
    languages: tuple[str, ...] = ()

    def __init__(self, *, max_active_jobs: int, max_jobs_per_owner: int | None = None) -> None:
        self.max_active_jobs = max_active_jobs
        # One tenant's burst must not take every slot: others always find some free.
        self.max_jobs_per_owner = max_jobs_per_owner or max_active_jobs
        self.loaded = False
        self._active_jobs = 0
        self._jobs_by_owner: Counter[str] = Counter()
        self.jobs_started = 0  # a counter for health and metrics
        # Busy time: seconds with at least one job in flight (utilisation = its rate).
        self._busy_seconds = 0.0
        self._busy_since = 0.0

    @abc.abstractmethod
    def load(self) -> None: ...

    @abc.abstractmethod
    def builtin_voices(self) -> list[BuiltinVoice]: ...

    @property
    @abc.abstractmethod
    def model_identity(self) -> str:
        """Changes whenever the model's weights or config change (keys caches and conditioning)."""

    @abc.abstractmethod
    def stream(self, job: SpeechJob) -> AsyncIterator[np.ndarray]: ...

    async def compute_conditioning(self, audio: np.ndarray, sample_rate: int) -> bytes:
        raise CloningNotSupported(f"The {self.name} engine cannot clone voices.")

    def close(self) -> None:  # noqa: B027  (optional hook)
        pass

    def default_voice(self) -> BuiltinVoice:
        return self.builtin_voices()[0]

    def find_builtin_voice(self, voice_id: str) -> BuiltinVoice | None:
        return next((voice for voice in self.builtin_voices() if voice.voice_id == voice_id), None)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "device": self.device,
            "sample_rate": self.sample_rate,
            "loaded": self.loaded,
            "supports_cloning": self.supports_cloning,
            "active_jobs": self._active_jobs,
            "jobs_started": self.jobs_started,
            "max_active_jobs": self.max_active_jobs,
            "max_jobs_per_tenant": self.max_jobs_per_owner,
            "busy_seconds": round(self.busy_seconds, 3),
        }

    @property
    def busy_seconds(self) -> float:
        running = time.monotonic() - self._busy_since if self._active_jobs else 0.0
        return self._busy_seconds + running

    @contextmanager
    def admitted(self, owner: str = "") -> Iterator[None]:
        """Count a job as active for its whole life; refuse it when the engine is full, or
        when its owner already runs its share (`max_jobs_per_owner`).

        Runs on the event loop only, so the counters need no lock.
        """
        # A full engine first: that is capacity (503), whoever holds it; then the owner's share.
        if self._active_jobs >= self.max_active_jobs:
            raise EngineOverloaded(retry_after_s=1)
        if owner and self._jobs_by_owner[owner] >= self.max_jobs_per_owner:
            raise EngineShareExceeded(self.max_jobs_per_owner)
        if self._active_jobs == 0:
            self._busy_since = time.monotonic()
        self._active_jobs += 1
        self._jobs_by_owner[owner] += 1
        self.jobs_started += 1
        try:
            yield
        finally:
            self._active_jobs -= 1
            self._jobs_by_owner[owner] -= 1
            if not self._jobs_by_owner[owner]:
                del self._jobs_by_owner[owner]
            if self._active_jobs == 0:
                self._busy_seconds += time.monotonic() - self._busy_since


def silence_chunk(seconds: float, sample_rate: int) -> np.ndarray:
    return np.zeros(round(seconds * sample_rate), dtype=np.float32)
