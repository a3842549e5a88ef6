"""Estimated character timings (engines/alignment.py): every character lands inside the
audio it was spoken in, in order, and the timings add up to the audio."""

from __future__ import annotations

import pytest

from engines.alignment import CharTimeline, CharTimings, sentences, spread


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
