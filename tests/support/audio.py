"""Decoding what the service sends, with decoders other than the ones that made it."""

from __future__ import annotations

import io

import av
import miniaudio
import numpy as np
import soundfile

from synthesis.audio import AudioFormat, OutputSpec


def decode(data: bytes, spec: OutputSpec) -> np.ndarray:
    if spec.format is AudioFormat.PCM:
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32767
    if spec.format is AudioFormat.MULAW:
        audio, _ = soundfile.read(
            io.BytesIO(data), samplerate=8000, channels=1, format="RAW", subtype="ULAW", dtype="float32"
        )
        return np.asarray(audio)
    if spec.format is AudioFormat.AAC:
        with av.open(io.BytesIO(data), mode="r", format="aac") as container:
            assert container.streams.audio[0].sample_rate == spec.sample_rate
            frames = [frame.to_ndarray().reshape(-1) for frame in container.decode(audio=0)]
        return np.concatenate(frames).astype(np.float32)
    if spec.format in (AudioFormat.FLAC, AudioFormat.MP3):
        # libsndfile cannot read a FLAC whose header says "length unknown" (as a
        # streamed one must); miniaudio's decoders read to the end, as players do.
        reader = miniaudio.flac_read_f32 if spec.format is AudioFormat.FLAC else miniaudio.mp3_read_f32
        info = reader(data)
        assert info.sample_rate == spec.sample_rate
        return np.asarray(info.samples, dtype=np.float32)
    with soundfile.SoundFile(io.BytesIO(data)) as handle:
        assert handle.samplerate == spec.sample_rate
        return np.concatenate(list(handle.blocks(blocksize=4096, dtype="float32")))
