"""`speed` means what it says for every engine: at speed s a text's audio lasts 1/s of what it
lasts at speed 1 (within 10%), across the whole range, SSML prosody rates included.

Lengths are counted in samples; nothing here is timed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from engines import SpeechEngine, SpeechJob
from engines.piper import PiperEngine
from engines.tempo import TempoStretch, stretched, tempo_stages
from engines.text import Segment, prepare_text
from engines.xtts import XttsEngine
from tests.support.xtts import loaded_tiny_xtts

TEXT = "Please hold the line while we connect your call. Your order ships on Tuesday."
SPEEDS = (0.25, 0.5, 2.0, 4.0)
TOLERANCE = 0.10


@pytest.fixture(scope="module")
def piper() -> PiperEngine:
    # No duration noise: speed 1 is then one length, not a draw, and the ratios measure speed only.
    engine = PiperEngine(workers=1, noise_w_scale=0.0)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def xtts(xtts_checkpoint: Path) -> Iterator[XttsEngine]:
    with loaded_tiny_xtts(xtts_checkpoint) as engine:
        yield engine


async def samples_at(engine: SpeechEngine, segments: list[Segment], speed: float) -> int:
    job = SpeechJob(segments=segments, voice=engine.default_voice(), speed=speed)
    return sum([chunk.sample_count async for chunk in engine.stream(job)])


def assert_durations_follow_speed(at_speed_one: int, lengths: dict[float, int]) -> None:
    for speed, length in lengths.items():
        ratio = at_speed_one / length
        assert abs(ratio / speed - 1) <= TOLERANCE, f"speed {speed} made audio {ratio:.2f}x faster"


async def test_piper_audio_lasts_one_over_speed_of_its_length_at_speed_one(piper: PiperEngine) -> None:
    segments = prepare_text(TEXT, max_chars=5000)
    at_one = await samples_at(piper, segments, 1.0)
    lengths = {speed: await samples_at(piper, segments, speed) for speed in SPEEDS}
    assert_durations_follow_speed(at_one, lengths)


async def test_piper_honours_the_ssml_rate_times_the_speed(piper: PiperEngine) -> None:
    plain = await samples_at(piper, prepare_text(TEXT, max_chars=5000), 1.0)
    slow = prepare_text(f'<speak><prosody rate="50%">{TEXT}</prosody></speak>', max_chars=5000)
    # 50% of speed 4 is speed 2; 50% of speed 1 is speed 0.5.
    assert_durations_follow_speed(plain, {2.0: await samples_at(piper, slow, 4.0)})
    assert_durations_follow_speed(plain, {0.5: await samples_at(piper, slow, 1.0)})


async def test_piper_at_speed_one_is_not_stretched(piper: PiperEngine) -> None:
    segments = prepare_text("Hello there.", max_chars=5000)
    job = SpeechJob(segments=segments, speed=1.0)
    phonemes = piper._phonemize("Hello there.")[0]
    rendered = [chunk.samples async for chunk in piper.stream(job)]
    # Deterministic durations, and noise only in the waveform: compare lengths, which a stretch changes.
    assert sum(len(chunk) for chunk in rendered) == len(piper._render(phonemes, 1.0)[0])


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_xtts_audio_lasts_one_over_speed_of_its_length_at_speed_one(xtts: XttsEngine) -> None:
    segments = prepare_text(TEXT, max_chars=5000)
    at_one = await samples_at(xtts, segments, 1.0)
    lengths = {speed: await samples_at(xtts, segments, speed) for speed in SPEEDS}
    assert_durations_follow_speed(at_one, lengths)


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.75, 1.5, 2.0, 3.0, 4.0])
def test_a_stretch_in_pieces_is_as_long_as_asked_and_keeps_the_pitch(rate: float) -> None:
    sample_rate = 22050
    time = np.arange(sample_rate * 2) / sample_rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * time)).astype(np.float32)
    stretch = TempoStretch(rate, sample_rate)
    pieces = [stretch.push(piece) for piece in np.array_split(tone, 7)]
    out = np.concatenate([*pieces, stretch.finish()])
    assert abs(len(out) / (len(tone) / rate) - 1) < 0.02
    spectrum = np.abs(np.fft.rfft(out[len(out) // 4 : 3 * len(out) // 4]))
    peak_hz = np.argmax(spectrum) * sample_rate / (len(out) // 2)
    assert abs(peak_hz - 440) < 10


def test_a_rate_of_one_returns_the_audio_itself_and_large_rates_are_chained() -> None:
    audio = np.ones(100, dtype=np.float32)
    assert stretched(audio, 1.0, 22050) is audio
    assert tempo_stages(4.0) == [2.0, 2.0]
    assert tempo_stages(0.25) == [0.5, 0.5]
    assert tempo_stages(3.0) == [2.0, 1.5]
