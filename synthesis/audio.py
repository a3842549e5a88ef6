"""Resampling and encoding of engine audio into the formats clients ask for.

Engines produce float32 mono chunks at their own rate. `AudioEncoder` turns a
sequence of such chunks into bytes of one output format, chunk by chunk, so
that streamed responses carry audio as soon as it exists. Resampling is soxr's
streaming resampler; compressed formats are libsndfile (through soundfile).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import soundfile
import soxr
from soundfile import _ffi, _snd

from core.errors import ServiceError


class AudioFormat(StrEnum):
    WAV = "wav"
    PCM = "pcm"
    MP3 = "mp3"
    OPUS = "opus"
    FLAC = "flac"
    MULAW = "mulaw"
    AAC = "aac"


SAMPLE_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
DEFAULT_SAMPLE_RATE = 24000
_OPUS_RATES = (8000, 16000, 24000, 48000)  # what the Opus codec itself accepts
MULAW_SAMPLE_RATE = 8000

CONTENT_TYPES = {
    AudioFormat.WAV: "audio/wav",
    AudioFormat.PCM: "audio/pcm",
    AudioFormat.MP3: "audio/mpeg",
    AudioFormat.OPUS: "audio/ogg; codecs=opus",
    AudioFormat.FLAC: "audio/flac",
    AudioFormat.MULAW: "audio/ulaw",
    AudioFormat.AAC: "audio/aac",
}

# libsndfile's SFC_SET_OGG_PAGE_LATENCY_MS: without it an Ogg Opus stream
# holds about a second of audio before the first page leaves.
_SFC_SET_OGG_PAGE_LATENCY_MS = 0x1302
_OGG_PAGE_LATENCY_MS = 40.0
# SFC_SET_BITRATE_MODE, SF_BITRATE_MODE_CONSTANT: a streamed MP3 cannot get its
# VBR header filled in at the end, and players estimate a CBR file's length right.
_SFC_SET_BITRATE_MODE = 0x1305
_SF_BITRATE_MODE_CONSTANT = 0
_SNDFILE_FORMATS = {
    AudioFormat.MP3: ("MP3", "MPEG_LAYER_III"),
    AudioFormat.OPUS: ("OGG", "OPUS"),
    AudioFormat.FLAC: ("FLAC", "PCM_16"),
}


@dataclass(frozen=True)
class OutputSpec:
    format: AudioFormat
    sample_rate: int

    @property
    def content_type(self) -> str:
        if self.format is AudioFormat.PCM:
            return f"audio/pcm;rate={self.sample_rate};encoding=s16le;channels=1"
        return CONTENT_TYPES[self.format]

    @classmethod
    def parse(cls, format_name: str | None, sample_rate: int | None) -> OutputSpec:
        try:
            audio_format = AudioFormat((format_name or "wav").lower())
        except ValueError:
            known = ", ".join(f.value for f in AudioFormat)
            raise ServiceError(
                400, "unsupported_format", f"Unknown format {format_name!r}; use one of: {known}."
            ) from None
        if audio_format is AudioFormat.MULAW:
            if sample_rate not in (None, MULAW_SAMPLE_RATE):
                raise ServiceError(400, "unsupported_sample_rate", "mulaw is always 8000 Hz.")
            return cls(audio_format, MULAW_SAMPLE_RATE)
        rate = sample_rate or DEFAULT_SAMPLE_RATE
        allowed = _OPUS_RATES if audio_format is AudioFormat.OPUS else SAMPLE_RATES
        if rate not in allowed:
            raise ServiceError(
                400,
                "unsupported_sample_rate",
                f"{audio_format.value} supports sample rates {', '.join(map(str, allowed))}; got {rate}.",
            )
        return cls(audio_format, rate)


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    scaled: np.ndarray = (np.clip(samples, -1.0, 1.0) * 32767.0).round()
    return scaled.astype("<i2")


def wav_header(sample_rate: int, data_bytes: int | None) -> bytes:
    """A 44-byte PCM WAV header; with data_bytes None, the sizes say "unknown"
    (0xFFFFFFFF), which players treat as "read to the end of the stream"."""
    data_size = 0xFFFFFFFF if data_bytes is None else data_bytes
    riff_size = 0xFFFFFFFF if data_bytes is None else 36 + data_bytes
    byte_rate = sample_rate * 2
    return (
        b"RIFF"
        + struct.pack("<I", riff_size)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, byte_rate, 2, 16)
        + b"data"
        + struct.pack("<I", data_size)
    )


class _Sink(io.BytesIO):
    """Where libsndfile writes; remembers how much of it has been sent on."""

    emitted = 0

    def take_new(self) -> bytes:
        data = self.getbuffer()[self.emitted :].tobytes()
        self.emitted += len(data)
        return data


class _AacWriter:
    """AAC-LC in ADTS frames (what `audio/aac` means), through FFmpeg's encoder
    (PyAV). ADTS needs no header or index, so it streams frame by frame."""

    BIT_RATE = 64_000  # plenty for mono speech

    def __init__(self, sample_rate: int) -> None:
        import av

        self._sink = _Sink()
        self._container = av.open(self._sink, "w", format="adts")
        self._stream = self._container.add_stream("aac", rate=sample_rate, layout="mono")
        self._stream.bit_rate = self.BIT_RATE
        self._sample_rate = sample_rate
        self.frames = 0  # ADTS frames written, each FRAME_SAMPLES long when decoded

    FRAME_SAMPLES = 1024  # AAC-LC

    def write(self, samples: np.ndarray) -> bytes:
        import av

        frame = av.AudioFrame.from_ndarray(
            float_to_int16(samples).reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = self._sample_rate
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
            self.frames += 1
        return self._sink.take_new()

    def finish(self) -> bytes:
        for packet in self._stream.encode(None):
            self._container.mux(packet)
            self.frames += 1
        self._container.close()
        return self._sink.take_new()


class AudioEncoder:
    """Feed float32 chunks at `input_rate`; get bytes of `spec` back as they are ready.

    With `streaming`, bytes come out of `push` as soon as the encoder has them
    (a WAV gets an open-ended header). Without, `finish` returns the whole file
    with exact headers; `push` returns nothing.
    """

    def __init__(self, spec: OutputSpec, input_rate: int, *, streaming: bool) -> None:
        self.spec = spec
        self.streaming = streaming
        self.samples_in = 0  # engine samples taken (the limit on audio per request counts these)
        self.samples_out = 0
        self._resampler = (
            soxr.ResampleStream(input_rate, spec.sample_rate, 1, dtype="float32", quality="HQ")
            if input_rate != spec.sample_rate
            else None
        )
        self._pcm_parts: list[bytes] = []
        self._sink: _Sink | None = None
        self._sndfile: soundfile.SoundFile | None = None
        self._aac = _AacWriter(spec.sample_rate) if spec.format is AudioFormat.AAC else None
        self._aac_parts: list[bytes] = []
        self._header_sent = False
        if spec.format in _SNDFILE_FORMATS:
            container, subtype = _SNDFILE_FORMATS[spec.format]
            self._sink = _Sink()
            self._sndfile = soundfile.SoundFile(
                self._sink, "w", spec.sample_rate, 1, format=container, subtype=subtype
            )
            if spec.format is AudioFormat.OPUS:
                latency = _ffi.new("double*", _OGG_PAGE_LATENCY_MS)
                _snd.sf_command(
                    self._sndfile._file, _SFC_SET_OGG_PAGE_LATENCY_MS, latency, _ffi.sizeof("double")
                )

    @property
    def duration_s(self) -> float:
        """Seconds of speech encoded (what usage counts)."""
        return self.samples_out / self.spec.sample_rate

    @property
    def decoded_duration_s(self) -> float:
        """Seconds a player decodes from the finished file. AAC in ADTS has no way to say
        that its first frame is the encoder's priming or how much of its last is padding,
        so it decodes whole frames: up to two frames (85 ms at 24 kHz) longer than the
        speech. Every other format decodes to exactly `duration_s`."""
        if self._aac is not None:
            return self._aac.frames * _AacWriter.FRAME_SAMPLES / self.spec.sample_rate
        return self.duration_s

    def push(self, chunk: np.ndarray) -> bytes:
        samples = chunk.astype(np.float32, copy=False)
        self.samples_in += len(samples)
        if self._resampler is not None:
            samples = self._resampler.resample_chunk(samples, last=False)
        return self._encode(samples)

    def finish(self) -> bytes:
        tail = b""
        if self._resampler is not None:
            tail = self._encode(self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
        if self._aac is not None:
            rest = self._aac.finish()
            return tail + rest if self.streaming else b"".join(self._aac_parts) + tail + rest
        if self._sndfile is not None and self._sink is not None:
            self._sndfile.close()
            if self.streaming:
                return tail + self._sink.take_new()
            return self._sink.getvalue()
        if self.streaming:
            if self.spec.format is AudioFormat.WAV and not self._header_sent:
                self._header_sent = True
                tail = wav_header(self.spec.sample_rate, None) + tail
            return tail
        body = b"".join(self._pcm_parts)
        if self.spec.format is AudioFormat.WAV:
            return wav_header(self.spec.sample_rate, len(body)) + body
        return body

    def _encode(self, samples: np.ndarray) -> bytes:
        self.samples_out += len(samples)
        if self._aac is not None:
            data = self._aac.write(samples) if len(samples) else b""
            if self.streaming:
                return data
            self._aac_parts.append(data)
            return b""
        if self._sndfile is not None and self._sink is not None:
            if len(samples):
                self._sndfile.write(samples)
            return self._sink.take_new() if self.streaming else b""
        data = self._raw_bytes(samples)
        if not self.streaming:
            self._pcm_parts.append(data)
            return b""
        if self.spec.format is AudioFormat.WAV and not self._header_sent:
            self._header_sent = True
            return wav_header(self.spec.sample_rate, None) + data
        return data

    def _raw_bytes(self, samples: np.ndarray) -> bytes:
        if not len(samples):
            return b""
        if self.spec.format is AudioFormat.MULAW:
            buffer = io.BytesIO()
            soundfile.write(buffer, samples, MULAW_SAMPLE_RATE, format="RAW", subtype="ULAW")
            return buffer.getvalue()
        return float_to_int16(samples).tobytes()
