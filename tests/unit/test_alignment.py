"""Estimated character timings (engines/alignment.py): every character lands inside the
audio it was spoken in, in order, and the timings add up to the audio."""

from __future__ import annotations

import pytest

from engines import SpeechJob
from engines.alignment import (
    CharTimeline,
    CharTimings,
    piper_word_spans,
    sentences,
    spread,
)
from engines.piper import PiperEngine
from engines.text import prepare_text


def _check_contiguous(timings: CharTimings, start_ms: int, end_ms: int) -> None:
    assert timings.starts_ms[0] == start_ms
    for (start, duration), next_start in zip(
        zip(timings.starts_ms, timings.durations_ms, strict=True), timings.starts_ms[1:], strict=False
    ):
        assert start + duration == next_start
    assert timings.starts_ms[-1] + timings.durations_ms[-1] == end_ms


def test_spread_lays_characters_end_to_end_over_exactly_the_span_letters_longer_than_spaces() -> None:
    timings = spread("Hi, you.", 0.5, 1.3)
    assert "".join(timings.chars) == "Hi, you."
    _check_contiguous(timings, 500, 1300)
    by_char = dict(zip(timings.chars, timings.durations_ms, strict=True))
    assert by_char["H"] > by_char[" "] > by_char[","]


def test_sentences_keep_every_character_and_cut_after_sentence_ends() -> None:
    text = "Hello there. How are you? Fine, e.g. 3.5 ok"
    assert sentences(text) == ["Hello there. ", "How are you? ", "Fine, e.g. ", "3.5 ok"]
    assert "".join(sentences(text)) == text


def test_whole_sentence_chunks_take_one_sentence_each_and_match_the_audio() -> None:
    timeline = CharTimeline(whole_pieces=True)
    timeline.begin("One two. Three four. ", 1.0)
    first = timeline.advance(2.0)
    second = timeline.advance(3.5)
    assert "".join(first.chars) == "One two. "
    assert "".join(second.chars) == "Three four. "
    _check_contiguous(first, 1000, 2000)
    _check_contiguous(second, 2000, 3500)
    assert not timeline.finish(3.5)


def test_estimated_chunks_place_what_the_audio_holds_and_the_end_places_the_rest() -> None:
    timeline = CharTimeline(whole_pieces=False)
    text = "a rather long sentence that streams in several chunks"
    timeline.begin(text, 0.0)
    first = timeline.advance(1.0)
    assert 0 < len(first.chars) < len(text)
    _check_contiguous(first, 0, 1000)
    rest = timeline.finish(4.0)
    assert "".join(first.chars + rest.chars) == text
    _check_contiguous(rest, 1000, 4000)


@pytest.mark.parametrize("speed", [0.5, 1.0, 2.0])
def test_a_faster_speed_places_more_characters_in_the_same_audio(speed: float) -> None:
    slow = CharTimeline(whole_pieces=False, speed=speed)
    fast = CharTimeline(whole_pieces=False, speed=speed * 2)
    for timeline in (slow, fast):
        timeline.begin("word " * 40, 0.0)
    assert len(fast.advance(1.0).chars) > len(slow.advance(1.0).chars)


def test_shifted_timings_are_relative_to_a_message_and_never_negative() -> None:
    timings = spread("ab", 1.0, 1.2)
    assert timings.shifted(1000).starts_ms == [0, 100]
    assert timings.shifted(5000).starts_ms == [0, 0]


def test_piper_word_spans_follow_the_phoneme_ids_of_each_word() -> None:
    # BOS ^, then each phoneme and a PAD _, then EOS $: one id each here.
    id_map = {"^": [1], "_": [0], "$": [2], "a": [3], "b": [4], " ": [5]}
    phonemes = ["a", "b", " ", "a"]
    # samples per id:   ^  _  a  _  b  _  ' ' _  a  _  $
    samples = [10, 0, 20, 0, 20, 0, 30, 0, 20, 0, 0]
    spans = piper_word_spans(phonemes, samples, id_map)
    assert spans == [(10 / 100, 50 / 100), (80 / 100, 100 / 100)]
    assert piper_word_spans(phonemes, samples[:-2], id_map) is None  # ids that do not line up


def test_engine_word_spans_place_each_word_of_a_sentence_where_the_engine_spoke_it() -> None:
    timeline = CharTimeline(whole_pieces=True)
    timeline.begin("Hi there. ", 0.0)
    timings = timeline.advance(1.0, [(0.1, 0.3), (0.6, 0.9)])
    assert "".join(timings.chars) == "Hi there. "
    _check_contiguous(timings, 100, 1000)  # the silence before the first word holds no character
    starts = dict(zip(timings.chars, timings.starts_ms, strict=False))
    assert starts["H"] == 100
    assert starts["t"] == 600
    # Words that are not the text's (a number read as two words): proportions instead.
    fallback = CharTimeline(whole_pieces=True)
    fallback.begin("It is 42. ", 0.0)
    assert fallback.advance(1.0, [(0.1, 0.2), (0.3, 0.4), (0.5, 0.6), (0.7, 0.8)]).starts_ms[0] == 0


async def test_each_piper_chunk_carries_the_spans_of_its_own_words() -> None:
    engine = PiperEngine(workers=1)
    engine.load()
    try:
        text = 'Thanks for calling. <break time="1ms"/> Your table is booked.'
        job = SpeechJob(segments=prepare_text(f"<speak>{text}</speak>", max_chars=5000))
        chunks = [chunk async for chunk in engine.stream(job)]
    finally:
        engine.close()
    # The break is a chunk of its own that speaks no words (a few samples of silence).
    assert [chunk.words == [] for chunk in chunks] == [False, True, False]
    heard = [chunk.words for chunk in chunks if chunk.words != []]
    assert [len(spans or []) for spans in heard] == [3, 4]
    for spans in heard:
        assert spans is not None
        edges = [edge for span in spans for edge in span]
        assert edges == sorted(edges)
        assert edges[0] > 0.0
        assert edges[-1] <= 1.0


def test_a_quick_first_chunk_takes_as_many_words_as_the_engine_spoke_and_the_next_the_rest() -> None:
    timeline = CharTimeline(whole_pieces=True)
    timeline.begin("Thanks for calling Acme Dental, this is Ava. ", 0.0)
    opening = timeline.advance(1.0, [(0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.0)])
    rest = timeline.advance(2.0, [(0.0, 0.3), (0.3, 0.6), (0.6, 1.0)])
    assert "".join(opening.chars) == "Thanks for calling Acme Dental, "
    assert "".join(rest.chars) == "this is Ava. "
    assert rest.starts_ms[0] == 1000
    assert not timeline.finish(2.0)
