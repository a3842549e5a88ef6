"""The interface every speech engine implements, and what they share."""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engines.capacity import EngineSlot, QueuePolicy, RealtimeAdmission, ThroughputMeter
from engines.errors import CloningNotSupported
from engines.text import Segment, Speech, effective_rate

# Where each word of a chunk lies, as fractions (start, end) of the chunk's audio.
WordSpans = list[tuple[float, float]]


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """A chunk of an engine's audio (float32 mono at the engine's rate) and, when the engine
    knows them, the text it speaks and the spans of its words: the timings travel with
    their audio, so no consumer has to match them up by position (engines/alignment.py
    reads them). `words == []`: a chunk of silence (a break), which speaks nothing."""

    samples: np.ndarray
    words: WordSpans | None = None
    text: str | None = None

    @property
    def sample_count(self) -> int:
        return len(self.samples)


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
    # A slot already held for this job (a WebSocket utterance holds one across its pieces of
    # text); None: `stream` takes one for the job's own life.
    slot: EngineSlot | None = None

    def rate_of(self, segment: Speech) -> float:
        """The speed an engine speaks `segment` at: held to the range of `speed`."""
        return effective_rate(self.speed, segment.rate)


def voice_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class SpeechEngine(abc.ABC):
    """Load once per process; stream float32 mono audio at `sample_rate`.

    `stream` is an async iterator: a consumer that stops iterating (or is cancelled)
    stops the engine's work for that request. It first takes a slot from the engine's
    admission (engines/capacity.py: by real-time capacity, with a short queue and a fair
    share per owner) unless the job brings one; an engine makes the audio in `make_audio`
    and reports its steps to `throughput`.
    """

    name: str
    model: str
    device: str
    sample_rate: int
    supports_cloning = False
    languages: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        max_active_jobs: int,
        max_jobs_per_owner: int | None = None,
        parallelism: int = 1,
        queue_policy: QueuePolicy | None = None,
    ) -> None:
        self.max_active_jobs = max_active_jobs
        # One tenant's burst must not take every slot: others always find some free.
        self.max_jobs_per_owner = max_jobs_per_owner or max_active_jobs
        self.loaded = False
        self.throughput = ThroughputMeter(parallelism)
        self.admission = RealtimeAdmission(
            meter=self.throughput,
            max_active=max_active_jobs,
            max_per_owner=self.max_jobs_per_owner,
            policy=queue_policy or QueuePolicy(),
        )

    @abc.abstractmethod
    def load(self) -> None: ...

    @abc.abstractmethod
    def builtin_voices(self) -> list[BuiltinVoice]: ...

    @property
    @abc.abstractmethod
    def model_identity(self) -> str:
        """Changes whenever the model's weights or config change (keys caches and conditioning)."""

    @abc.abstractmethod
    def make_audio(self, job: SpeechJob) -> AsyncIterator[AudioChunk]:
        """The job's audio, chunk by chunk; called with the job's slot held."""

    async def reserve(self, owner: str = "") -> EngineSlot:
        """A slot to hold across several jobs (SpeechJob.slot); the caller releases it."""
        return await self.admission.acquire(owner)

    async def stream(self, job: SpeechJob) -> AsyncIterator[AudioChunk]:
        slot = job.slot or await self.admission.acquire(job.owner)
        try:
            async for chunk in self.make_audio(job):
                yield chunk
        finally:
            if job.slot is None:
                slot.release()

    async def compute_conditioning(self, audio: np.ndarray, sample_rate: int) -> bytes:
        raise CloningNotSupported(f"The {self.name} engine cannot clone voices.")

    def close(self) -> None:  # noqa: B027  (optional hook)
        pass

    def default_voice(self) -> BuiltinVoice:
        return self.builtin_voices()[0]

    def find_builtin_voice(self, voice_id: str) -> BuiltinVoice | None:
        return next((voice for voice in self.builtin_voices() if voice.voice_id == voice_id), None)

    def speaks(self, tag: str) -> str | None:
        """The engine's own name for a language tag, or None if it does not speak it."""
        return match_language(tag, self.languages)

    def info(self) -> dict[str, Any]:
        state = self.admission.state()
        return {
            "name": self.name,
            "model": self.model,
            "device": self.device,
            "sample_rate": self.sample_rate,
            "loaded": self.loaded,
            "supports_cloning": self.supports_cloning,
            "active_jobs": state.demand,
            "queued_jobs": state.queued,
            "jobs_started": state.admitted_total,
            "jobs_queued": state.queued_total,
            "jobs_refused": state.refused_total,
            "max_active_jobs": self.max_active_jobs,
            "max_jobs_per_tenant": self.max_jobs_per_owner,
            "fleet_jobs_per_tenant": self.admission.fleet_max_per_owner or None,
            # Audio seconds per second it makes now (None until measured): the real-time
            # streams it can hold; `realtime_limit` is what admission lets in.
            "capacity_audio_seconds_per_second": (
                round(state.capacity, 2) if state.capacity is not None else None
            ),
            "realtime_limit": round(self.admission.realtime_limit(), 2),
            "busy_seconds": round(state.busy_seconds, 3),
        }


def silence_chunk(seconds: float, sample_rate: int) -> np.ndarray:
    return np.zeros(round(seconds * sample_rate), dtype=np.float32)


def match_language(tag: str, languages: tuple[str, ...]) -> str | None:
    """Which of `languages` a tag names, matched as BCP 47 tags are, whatever their case or
    separator: `en-US`, `en_us` and `EN` all name Piper's `en`; XTTS's `zh-cn` is `zh-CN`,
    `zh_CN` or plain `zh`. A region not listed falls back to its language (`en-GB` to `en`).
    An engine that lists no languages takes any tag, normalised."""
    wanted = tag.strip().lower().replace("_", "-")
    if not languages or wanted in languages:
        return wanted
    primary = wanted.split("-", 1)[0]
    if primary in languages:
        return primary
    return next((known for known in languages if known.split("-", 1)[0] == primary), None)
