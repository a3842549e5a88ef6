from __future__ import annotations

import numpy as np
import pytest

from core.errors import ServiceError
from synthesis.audio import SAMPLE_RATES, AudioEncoder, AudioFormat, OutputSpec
from tests.support.audio import decode


def tone(seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def encode(spec: OutputSpec, chunks: list[np.ndarray], input_rate: int, *, streaming: bool) -> bytes:
    encoder = AudioEncoder(spec, input_rate, streaming=streaming)
    return b"".join([encoder.push(chunk) for chunk in chunks] + [encoder.finish()])


CASES = [
    (fmt, rate)
    for fmt in AudioFormat
    if fmt is not AudioFormat.MULAW
    for rate in SAMPLE_RATES
    if not (fmt is AudioFormat.OPUS and rate in (22050, 44100))  # Opus has no such rates
] + [(AudioFormat.MULAW, None)]


@pytest.mark.parametrize(("audio_format", "rate"), CASES)
@pytest.mark.parametrize("streaming", [True, False])
def test_every_format_and_rate_decodes_to_the_right_duration(
    audio_format: AudioFormat, rate: int | None, streaming: bool
) -> None:
    spec = OutputSpec.parse(audio_format.value, rate)
    chunks = [tone(0.4, 22050) for _ in range(5)]  # 2.0 s at the engine's rate
    audio = decode(encode(spec, chunks, 22050, streaming=streaming), spec)
    # MP3 and AAC add encoder delay and frame padding (up to ~0.26 s at 8 kHz)
    # that a streamed file has no header to trim.
    slack = 0.3 if audio_format in (AudioFormat.MP3, AudioFormat.AAC) else 0.15
    assert 1.9 <= len(audio) / spec.sample_rate <= 2.0 + slack
    assert np.abs(audio).max() > 0.2


@pytest.mark.parametrize("audio_format", ["wav", "pcm", "mulaw", "flac"])
def test_streamed_and_whole_files_decode_to_identical_samples(audio_format: str) -> None:
    spec = OutputSpec.parse(audio_format, None)
    chunks = [tone(seconds, 22050) for seconds in (0.13, 0.5, 0.07, 0.9)]
    streamed = decode(encode(spec, chunks, 22050, streaming=True), spec)
    whole = decode(encode(spec, chunks, 22050, streaming=False), spec)
    np.testing.assert_array_equal(streamed, whole)


def test_streaming_wav_starts_with_an_open_ended_header_and_whole_wav_has_exact_sizes() -> None:
    spec = OutputSpec.parse("wav", 24000)
    streamed = encode(spec, [tone(0.5, 24000)], 24000, streaming=True)
    whole = encode(spec, [tone(0.5, 24000)], 24000, streaming=False)
    assert streamed[:4] == b"RIFF"
    assert streamed[40:44] == b"\xff\xff\xff\xff"
    assert int.from_bytes(whole[40:44], "little") == len(whole) - 44 == 24000


@pytest.mark.parametrize("audio_format", ["opus", "mp3", "wav", "pcm", "mulaw"])
def test_streaming_encoders_emit_audio_per_chunk_not_only_at_the_end(audio_format: str) -> None:
    spec = OutputSpec.parse(audio_format, None)
    encoder = AudioEncoder(spec, 22050, streaming=True)
    emitted = [len(encoder.push(tone(0.3, 22050))) for _ in range(4)]
    assert sum(1 for size in emitted[1:] if size > 0) >= 2


@pytest.mark.parametrize(
    ("audio_format", "rate", "code"),
    [
        ("aiff", None, "unsupported_format"),
        ("wav", 11025, "unsupported_sample_rate"),
        ("opus", 44100, "unsupported_sample_rate"),
        ("mulaw", 16000, "unsupported_sample_rate"),
    ],
)
def test_bad_format_or_rate_is_a_400(audio_format: str, rate: int | None, code: str) -> None:
    with pytest.raises(ServiceError) as raised:
        OutputSpec.parse(audio_format, rate)
    assert (raised.value.status_code, raised.value.code) == (400, code)
