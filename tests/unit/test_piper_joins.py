"""A quick first chunk must not sound clipped: where Piper joins the first few words to
the rest of their sentence, there is no gap and no click that the same text spoken whole
does not have. Measured in samples of the real voice; nothing here is timed."""

from __future__ import annotations

import numpy as np
import pytest

from engines import SpeechJob
from engines.base import WordSpans
from engines.piper import MAX_PHONEMES_PER_RENDER, SILENCE_LEVEL, PiperEngine, spans_within
from engines.text import Segment, Speech, prepare_text

TEXTS = [
    "I can see your file here and your last cleaning was in March.",
    "We have openings on Tuesday morning at nine and Wednesday afternoon at two.",
    "Please arrive ten minutes early so that we can update your insurance details.",
]
WINDOW_SECONDS = 0.01


@pytest.fixture(scope="module")
def piper() -> PiperEngine:
    # No duration noise: the whole and the cut text are then comparable renders.
    engine = PiperEngine(workers=1, noise_w_scale=0.0)
    engine.load()
    return engine


async def chunks_of(engine: PiperEngine, segments: list[Segment]) -> list[np.ndarray]:
    return [chunk.samples async for chunk in engine.stream(SpeechJob(segments=segments))]


def silent_runs(audio: np.ndarray, sample_rate: int) -> list[tuple[int, int]]:
    """(start, length) of each run of silent 10 ms windows, in windows."""
    window = round(WINDOW_SECONDS * sample_rate)
    count = len(audio) // window
    silent = np.abs(audio[: count * window]).reshape(count, window).max(axis=1) < SILENCE_LEVEL
    runs: list[tuple[int, int]] = []
    start = None
    for index, quiet in enumerate([*silent, False]):
        if quiet and start is None:
            start = index
        elif not quiet and start is not None:
            runs.append((start, index - start))
            start = None
    return runs


def longest_inner_silence(audio: np.ndarray, sample_rate: int) -> float:
    """The longest pause between the first and last sound (a comma's pause, a word gap)."""
    runs = silent_runs(audio, sample_rate)
    count = len(audio) // round(WINDOW_SECONDS * sample_rate)
    inner = [length for start, length in runs if start > 0 and start + length < count]
    return max(inner, default=0) * WINDOW_SECONDS


@pytest.mark.parametrize("text", TEXTS)
async def test_the_join_after_a_quick_first_chunk_has_no_gap_or_click_the_whole_text_lacks(
    piper: PiperEngine, text: str
) -> None:
    rate = piper.sample_rate
    whole = np.concatenate(await chunks_of(piper, prepare_text(text, max_chars=500)))
    cut_segments = prepare_text(text, max_chars=500, first_chunk_words=5)
    assert isinstance(cut_segments[0], Speech)
    assert cut_segments[0].continues
    first, *rest = await chunks_of(piper, cut_segments)
    joined = np.concatenate([first, *rest])

    # No gap: the silence at the join is no longer than the pauses the voice makes inside
    # the same sentence spoken whole (and never longer than a short word gap).
    join_gap = longest_inner_silence(joined[: len(first) + len(rest[0])], rate)
    assert join_gap <= max(longest_inner_silence(whole, rate), 0.1) + WINDOW_SECONDS
    assert join_gap <= 0.15

    # No click: no step between neighbouring samples around the join sharper than the
    # sharpest the whole rendering has anywhere.
    edge = round(0.01 * rate)
    around_join = joined[len(first) - edge : len(first) + edge]
    assert np.max(np.abs(np.diff(around_join))) <= np.max(np.abs(np.diff(whole)))

    # Nothing lost or added: the cut text lasts about as long as the whole one.
    assert abs(len(joined) - len(whole)) / len(whole) < 0.15


async def test_the_first_chunk_is_a_small_part_of_the_sentence(piper: PiperEngine) -> None:
    chunks = await chunks_of(piper, prepare_text(TEXTS[1], max_chars=500, first_chunk_words=5))
    assert len(chunks) == 2
    assert len(chunks[0]) < 0.5 * (len(chunks[0]) + len(chunks[1]))


def test_word_spans_follow_the_audio_when_a_join_trims_its_silence() -> None:
    # A chunk of 1000 samples cut to [100, 900): fractions of the old chunk, moved to the new.
    assert spans_within([(0.1, 0.5), (0.5, 0.95)], 1000, 100, 900) == [(0.0, 0.5), (0.5, 1.0)]


async def test_a_sentence_that_reads_far_longer_than_it_is_written_renders_in_bounded_passes(
    piper: PiperEngine,
) -> None:
    # 200 characters of digits are about 1,300 phonemes (a minute of speech) in one sentence.
    rendered: list[int] = []
    render = piper._render

    def spy(phonemes: list[str], rate: float) -> tuple[np.ndarray, WordSpans | None]:
        rendered.append(len(phonemes))
        return render(phonemes, rate)

    piper._render = spy  # type: ignore[method-assign]
    try:
        chunks = await chunks_of(piper, [Speech("12345 " * 33)])
    finally:
        del piper._render
    assert len(rendered) >= 4
    assert max(rendered) <= MAX_PHONEMES_PER_RENDER
    # All of it is spoken (about 40 s of digits), not cut short.
    assert sum(len(chunk) for chunk in chunks) / piper.sample_rate > 30
