"""XTTS v2 through coqui-tts: one model per process, pinned to one device.

coqui's own `inference_stream` decodes one request at a time (its GPT prefix is
shared model state), so a GPU's throughput would be one stream's. Instead every
use of the model goes through one XttsBatcher thread (engines/xtts_batch.py):
the running requests advance one audio token per step together, each with its
own conditioning prefix and KV cache (engines/xtts_gpt.py), up to `max_batch`
(XTTS_MAX_BATCH) at a time; requests join and leave between steps. With greedy
decoding (`deterministic`) a request's audio is exactly the same whatever else
runs with it.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import AudioChunk, BuiltinVoice, SpeechEngine, SpeechJob, voice_slug
from engines.capacity import QueuePolicy
from engines.errors import EngineConfigurationError, EngineFailure
from engines.xtts_batch import XttsBatcher
from engines.xtts_gpt import Sampling, XttsStepModel

logger = logging.getLogger(__name__)
XTTS_SAMPLE_RATE = 24000
REQUIRED_FILES = ("config.json", "model.pth", "vocab.json")


def resolve_device(requested: str) -> str:
    import torch

    device = requested or ("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise EngineConfigurationError(f"XTTS_DEVICE={device!r} is not a torch device: {exc}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineConfigurationError(
                f"XTTS_DEVICE={device!r} but CUDA is not available on this machine."
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise EngineConfigurationError(
                f"XTTS_DEVICE={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist."
            )
    elif parsed.type != "cpu":
        raise EngineConfigurationError(f"XTTS_DEVICE={device!r}: only cpu and cuda devices are supported.")
    return device


def check_checkpoint_dir(path: str) -> Path:
    if not path:
        raise EngineConfigurationError("TTS_ENGINE=xtts needs XTTS_MODEL_PATH (a checkpoint directory).")
    directory = Path(path)
    if not directory.is_dir():
        raise EngineConfigurationError(f"XTTS_MODEL_PATH={path!r} is not a directory.")
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise EngineConfigurationError(f"XTTS_MODEL_PATH={path!r} lacks {', '.join(missing)}.")
    return directory


class XttsEngine(SpeechEngine):
    name = "xtts"
    sample_rate = XTTS_SAMPLE_RATE
    supports_cloning = True

    def __init__(
        self,
        *,
        checkpoint_dir: str,
        device: str = "",
        half: bool = False,
        max_active_jobs: int = 16,
        max_jobs_per_owner: int | None = None,
        queue_policy: QueuePolicy | None = None,
        stream_chunk_size: int = 20,
        max_audio_tokens: int | None = None,
        deterministic: bool = False,
        max_batch: int = 16,
        half_dtype: str = "float16",
    ) -> None:
        super().__init__(
            max_active_jobs=max_active_jobs,
            max_jobs_per_owner=max_jobs_per_owner,
            queue_policy=queue_policy,
        )
        self.checkpoint_dir = check_checkpoint_dir(checkpoint_dir)
        self.model = self.checkpoint_dir.name
        self._requested_device = device
        self.device = device or "auto"
        self.half = half
        self.stream_chunk_size = stream_chunk_size
        self.max_audio_tokens = max_audio_tokens
        self.deterministic = deterministic
        self.max_batch = max_batch
        if half_dtype not in ("float16", "bfloat16"):
            raise EngineConfigurationError(
                f"XTTS half precision must be float16 or bfloat16, not {half_dtype!r}."
            )
        self.half_dtype = half_dtype
        self._model: Any = None
        self._voices: list[BuiltinVoice] = []
        self._speaker_latents: dict[str, tuple[Any, Any]] = {}
        self._scheduler: XttsBatcher | None = None
        self._identity = ""

    def load(self) -> None:
        if self.loaded:
            return
        import torch
        from TTS.tts.configs.xtts_config import XttsConfig
        from TTS.tts.models.xtts import Xtts

        self.device = resolve_device(self._requested_device)
        if self.half and not self.device.startswith("cuda"):
            raise EngineConfigurationError("XTTS_HALF=1 needs a CUDA device.")
        config = XttsConfig()
        config.load_json(str(self.checkpoint_dir / "config.json"))
        model = Xtts.init_from_config(config)
        try:
            model.load_checkpoint(
                config, checkpoint_dir=str(self.checkpoint_dir), use_deepspeed=False, eval=True
            )
        except Exception as exc:
            raise EngineConfigurationError(
                f"Could not load the XTTS checkpoint in {self.checkpoint_dir}: {exc}"
            ) from exc
        model.to(self.device)
        if self.half:
            model.gpt.to(getattr(torch, self.half_dtype))
        model.eval()
        self._model = model
        self.languages = tuple(config.languages)
        if model.speaker_manager is not None:
            for speaker_name, latents in model.speaker_manager.speakers.items():
                voice = BuiltinVoice(
                    voice_id=voice_slug(speaker_name),
                    name=speaker_name,
                    language="en",
                    languages=self.languages,
                )
                self._voices.append(voice)
                self._speaker_latents[voice.voice_id] = (
                    latents["gpt_cond_latent"],
                    latents["speaker_embedding"],
                )
        digest = hashlib.sha256((self.checkpoint_dir / "config.json").read_bytes())
        weights = self.checkpoint_dir / "model.pth"
        digest.update(str(weights.stat().st_size).encode())
        with weights.open("rb") as handle:
            digest.update(handle.read(1 << 20))
        self._identity = f"xtts:{self.model}:{digest.hexdigest()[:16]}"
        # coqui's stream generator always samples; top-1 sampling is greedy.
        sampling = Sampling(top_k=1) if self.deterministic else Sampling()
        # The engine's admission is the limit; the batcher's is only a backstop,
        # with room for jobs cancelled but not yet dropped at its next step.
        self._scheduler = XttsBatcher(
            model,
            XttsStepModel(model.gpt, sampling=sampling, exact=self.deterministic),
            sample_rate=self.sample_rate,
            max_batch=self.max_batch,
            max_streams=2 * self.max_active_jobs,
            stream_chunk_size=self.stream_chunk_size,
            max_audio_tokens=self.max_audio_tokens,
            meter=self.throughput,
            on_step=self.admission.poke,
        )
        torch.set_grad_enabled(False)
        self.loaded = True
        logger.info(
            "XTTS loaded from %s on %s (%d built-in voices)",
            self.checkpoint_dir,
            self.device,
            len(self._voices),
        )

    def builtin_voices(self) -> list[BuiltinVoice]:
        return list(self._voices)

    @property
    def model_identity(self) -> str:
        return self._identity

    @property
    def scheduler(self) -> XttsBatcher:
        assert self._scheduler is not None, "XttsEngine.load() has not run"
        return self._scheduler

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["max_batch"] = self.max_batch
        info["languages"] = list(self.languages)
        return info

    def close(self) -> None:
        if self._scheduler is not None:
            self._scheduler.stop()

    async def compute_conditioning(self, audio: np.ndarray, sample_rate: int) -> bytes:
        return await self.scheduler.run(lambda: self._conditioning_bytes(audio, sample_rate))

    def _conditioning_bytes(self, audio: np.ndarray, sample_rate: int) -> bytes:
        import torch

        waveform = torch.from_numpy(np.asarray(audio, dtype=np.float32)).unsqueeze(0)
        gpt_cond_latent = self._model.get_gpt_cond_latents(waveform, sample_rate)
        speaker_embedding = self._model.get_speaker_embedding(waveform, sample_rate)
        buffer = io.BytesIO()
        torch.save(
            {"gpt_cond_latent": gpt_cond_latent.cpu(), "speaker_embedding": speaker_embedding.cpu()}, buffer
        )
        return buffer.getvalue()

    def _latents_for(self, job: SpeechJob) -> tuple[Any, Any]:
        import torch

        if job.conditioning is not None:
            loaded = torch.load(io.BytesIO(job.conditioning), weights_only=True)
            return loaded["gpt_cond_latent"], loaded["speaker_embedding"]
        voice = job.voice or self.default_voice()
        return self._speaker_latents[voice.voice_id]

    async def make_audio(self, job: SpeechJob) -> AsyncIterator[AudioChunk]:
        try:
            conditioning = self._latents_for(job)
        except Exception as exc:
            raise EngineFailure(f"The voice's conditioning cannot be used: {exc}") from exc
        scheduled = self.scheduler.submit(job, conditioning)
        # XTTS does not say where its words fall: engines/alignment.py estimates them.
        async for chunk in scheduled.chunks():
            yield AudioChunk(chunk)
