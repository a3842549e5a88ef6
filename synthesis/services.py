"""What happens on synthesize: validate, resolve the voice, run the engine, encode.

Every synthesis is bounded by MAX_AUDIO_SECONDS_PER_REQUEST twice: at admission by an
estimate from its text (`output_budget`, a 400 before any audio), and while it runs by the
encoder's count (`encoded_audio`), for what the estimate could not see.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from django.conf import settings

from core.errors import ServiceError
from engines import BuiltinVoice, EngineSlot, SpeechEngine, SpeechJob, get_engine
from engines.base import WordSpans
from engines.text import MAX_RATE, MIN_RATE, OutputBudget, Segment, SsmlLimits, prepare_text
from synthesis.audio import AudioEncoder, OutputSpec
from tenants.models import Tenant
from voices.services import tenant_voice_find, voice_conditioning

MIN_SPEED = MIN_RATE
MAX_SPEED = MAX_RATE
AUDIO_TOO_LONG = "audio_too_long"


@dataclass
class SynthesisResult:
    """Filled in while a synthesis runs: what the response headers report."""

    spec: OutputSpec
    audio_seconds: float = 0.0  # speech made (usage)
    file_seconds: float = 0.0  # the finished file's length as decoded (X-Audio-Duration)
    # The code of a limit that ended a streamed answer early (its body ends cleanly there).
    cut_short: str | None = None


@dataclass(frozen=True, slots=True)
class AudioPart:
    """What one engine chunk became: its encoded audio (empty when the encoder holds its
    samples back, e.g. for a whole MP3 frame), the spans of the words the chunk speaks
    (when the engine knows them), and the encoder's clock at the chunk's end, in seconds
    of audio. Timings are read from here, so they stay with the audio they describe."""

    data: bytes
    words: WordSpans | None = None
    end_s: float = 0.0
    text: str | None = None  # what the chunk speaks, when the engine says (AudioChunk.text)


@dataclass(frozen=True)
class SynthesisPlan:
    engine: SpeechEngine
    job: SpeechJob
    spec: OutputSpec
    voice_id: str
    voice_identity: str

    def cache_key(self) -> str:
        """Everything that decides the audio: equal keys, equal bytes (given deterministic decoding)."""
        parts = [
            self.engine.model_identity,
            self.voice_identity,
            repr(list(self.job.segments)),
            self.job.language,
            f"{self.job.speed:.4f}",
            self.spec.format.value,
            str(self.spec.sample_rate),
        ]
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class ResolvedVoice:
    voice_id: str
    language: str
    # Changes when the voice's audio would: a cloned voice's row and conditioning version.
    identity: str
    builtin: BuiltinVoice | None = None
    conditioning: bytes | None = None


async def voice_resolve(*, engine: SpeechEngine, tenant: Tenant, voice_id: str | None) -> ResolvedVoice:
    """The voice a request names (built-in or the tenant's own); the default when none is named."""
    if not voice_id:
        default = engine.default_voice()
        return ResolvedVoice(
            voice_id=default.voice_id,
            language=default.language,
            identity=f"builtin:{default.voice_id}",
            builtin=default,
        )
    # Built-ins first: a tenant cannot name a voice like a built-in one (voice
    # upload refuses it), and these need no database read.
    builtin = engine.find_builtin_voice(voice_id)
    if builtin is not None:
        return ResolvedVoice(
            voice_id=builtin.voice_id,
            language=builtin.language,
            identity=f"builtin:{builtin.voice_id}",
            builtin=builtin,
        )
    own = await tenant_voice_find(tenant=tenant, voice_id=voice_id)
    if own is None:
        raise ServiceError(
            404, "voice_not_found", f"No voice {voice_id!r}; GET /v1/voices lists the available voices."
        )
    conditioning = await voice_conditioning(engine=engine, voice=own)
    return ResolvedVoice(
        voice_id=own.voice_id,
        language=own.language,
        identity=f"cloned:{own.id}:{own.conditioning_version}",
        conditioning=conditioning,
    )


@dataclass(frozen=True)
class SynthesisSetup:
    """Everything about a synthesis but its text: checked once, then used for
    every piece of text (a WebSocket utterance arrives in many)."""

    engine: SpeechEngine
    spec: OutputSpec
    voice: ResolvedVoice
    language: str
    speed: float
    # The tenant, for the engine's fair share (engines know no tenants: an opaque name).
    owner: str = ""

    def plan_segments(self, segments: list[Segment], *, slot: EngineSlot | None = None) -> SynthesisPlan:
        job = SpeechJob(
            slot=slot,
            segments=segments,
            voice=self.voice.builtin,
            conditioning=self.voice.conditioning,
            language=self.language,
            speed=self.speed,
            owner=self.owner,
        )
        return SynthesisPlan(
            engine=self.engine,
            job=job,
            spec=self.spec,
            voice_id=self.voice.voice_id,
            voice_identity=self.voice.identity,
        )


def text_segments(text: str, *, opening: bool = True) -> list[Segment]:
    """A request's text as segments under the configured limits; raises ServiceError.
    `opening`: the text starts the audio (a request's, or an utterance's first piece), so
    its first chunk is kept short (FIRST_CHUNK_WORDS)."""
    limits = SsmlLimits(max_depth=settings.SSML_MAX_DEPTH, max_break_seconds=settings.SSML_MAX_BREAK_SECONDS)
    return prepare_text(
        text,
        max_chars=settings.MAX_TEXT_CHARS,
        ssml=limits,
        first_chunk_words=settings.FIRST_CHUNK_WORDS if opening else 0,
    )


def output_budget(speed: float) -> OutputBudget:
    """What one request (or WebSocket utterance) at `speed` may make, as configured."""
    return OutputBudget(
        speed=speed,
        max_audio_seconds=settings.MAX_AUDIO_SECONDS_PER_REQUEST,
        max_break_seconds_total=settings.SSML_MAX_BREAK_SECONDS_TOTAL,
    )


def audio_too_long() -> ServiceError:
    limit = settings.MAX_AUDIO_SECONDS_PER_REQUEST
    return ServiceError(
        400,
        AUDIO_TOO_LONG,
        f"The audio reached the limit of {limit:g} s per request.",
        details={"limit": limit},
    )


async def synthesis_setup(
    *,
    tenant: Tenant,
    voice_id: str | None = None,
    language: str | None = None,
    audio_format: str | None = None,
    sample_rate: int | None = None,
    speed: float = 1.0,
) -> SynthesisSetup:
    """Check the voice and output settings before any engine work; raises ServiceError."""
    spec = OutputSpec.parse(audio_format, sample_rate)
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise ServiceError(400, "invalid_speed", f"speed must be between {MIN_SPEED} and {MAX_SPEED}.")
    engine = get_engine()
    voice = await voice_resolve(engine=engine, tenant=tenant, voice_id=voice_id)
    requested = language or voice.language
    spoken = engine.speaks(requested)
    if spoken is None:
        raise ServiceError(
            400,
            "unsupported_language",
            f"The {engine.name} engine speaks {', '.join(engine.languages)}; got {requested!r}.",
        )
    return SynthesisSetup(
        engine=engine, spec=spec, voice=voice, language=spoken, speed=speed, owner=tenant.id.hex
    )


async def encoded_audio(plan: SynthesisPlan, encoder: AudioEncoder) -> AsyncIterator[AudioPart]:
    """The plan's audio through `encoder`, as the engine makes it: the one engine -> encoder
    loop, for HTTP and WebSocket alike, one part per engine chunk (its data possibly empty).
    It does not finish the encoder (a WebSocket utterance runs several plans through one).
    Closing this iterator (a client that went away) closes the engine's stream, which stops
    its work for this request.

    Once the encoder has taken MAX_AUDIO_SECONDS_PER_REQUEST of engine audio (counted over
    everything it has taken: a whole WebSocket utterance), the audio up to that point goes
    out and ServiceError `audio_too_long` is raised: the engine stops there."""
    limit = round(settings.MAX_AUDIO_SECONDS_PER_REQUEST * plan.engine.sample_rate)
    engine_stream = plan.engine.stream(plan.job)
    try:
        async for chunk in engine_stream:
            room = limit - encoder.samples_in
            if chunk.sample_count > room:
                # The words of a chunk cut short are no longer the chunk's: none are reported.
                yield AudioPart(encoder.push(chunk.samples[: max(room, 0)]), None, encoder.duration_s)
                raise audio_too_long()
            yield AudioPart(encoder.push(chunk.samples), chunk.words, encoder.duration_s, chunk.text)
    finally:
        await engine_stream.aclose()  # type: ignore[attr-defined]


async def synthesis_audio(
    plan: SynthesisPlan, result: SynthesisResult, *, streaming: bool
) -> AsyncIterator[AudioPart]:
    """Encoded audio as the engine makes it (streaming), or the whole file as one piece:
    the parts that carry audio or word spans.

    Audio over the limit per request: the whole file is refused (400 audio_too_long, from
    the iterator); a stream, whose status has gone out, ends cleanly at the limit, as a
    well-formed file, with `result.cut_short` saying why (its usage row carries the code)."""
    encoder = AudioEncoder(plan.spec, plan.engine.sample_rate, streaming=streaming)
    audio = encoded_audio(plan, encoder)
    try:
        async for part in audio:
            result.audio_seconds = encoder.duration_s
            if part.data or part.words:
                yield part
    except ServiceError as exc:
        if not (streaming and exc.code == AUDIO_TOO_LONG):
            raise
        result.cut_short = exc.code
    finally:
        await audio.aclose()  # type: ignore[attr-defined]
    data = encoder.finish()
    result.audio_seconds = encoder.duration_s
    result.file_seconds = encoder.decoded_duration_s
    if data:
        yield AudioPart(data, None, encoder.duration_s)
