"""However a request's text is punctuated, no segment an engine renders in one pass is longer
than MAX_SEGMENT_CHARS (issue 26): the class of inputs is text without marks, one giant word,
Chinese without spaces, runs of whitespace, and any mix of them."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engines.alignment import sentences
from engines.piper import phoneme_runs
from engines.text import (
    MAX_SEGMENT_CHARS,
    Pause,
    Speech,
    bounded_runs,
    bounded_speech,
    is_speakable,
    normalise_whitespace,
    prepare_text,
)

LONG = 10_000
CLASS = {
    "words without marks": ("hello " * 2000)[:LONG],
    "one giant word": "a" * LONG,
    "a URL-like token": "https://example.com/" + "path/" * 2000,
    "Chinese without spaces": "你好世界" * 2500,
    "digits without marks": "12345 " * 1700,
    "whitespace runs and newlines": ("word \n\n\t   " * 1000),
    "mixed": ("hello world " * 50 + "x" * 3000 + " 你好" * 500 + "   \n" * 300) * 2,
}


def speech_lengths(text: str) -> list[int]:
    segments = prepare_text(text, max_chars=10 * LONG, first_chunk_words=5)
    return [len(segment.text) for segment in segments if isinstance(segment, Speech)]


@pytest.mark.parametrize("text", CLASS.values(), ids=CLASS.keys())
def test_every_segment_of_long_unpunctuated_text_is_within_the_bound(text: str) -> None:
    lengths = speech_lengths(text)
    assert max(lengths) <= MAX_SEGMENT_CHARS
    # Nothing is lost: the segments together say the text.
    segments = prepare_text(text, max_chars=10 * LONG)
    spoken = "".join(segment.text for segment in segments if isinstance(segment, Speech))
    assert re.sub(r"\s", "", spoken) == re.sub(r"\s", "", text)


# (Before a word longer than a run, the run of words before it may be short: its parts fill runs.)
UNIFORM = {name: text for name, text in CLASS.items() if name != "mixed"}


@pytest.mark.parametrize("text", UNIFORM.values(), ids=UNIFORM.keys())
def test_runs_are_about_equal_so_none_is_a_stub(text: str) -> None:
    runs = [len(normalise_whitespace(run)) for run in bounded_runs(normalise_whitespace(text))]
    assert max(runs) <= MAX_SEGMENT_CHARS
    assert min(runs) >= MAX_SEGMENT_CHARS // 4


def test_text_within_the_bound_is_one_run() -> None:
    text = "word " * (MAX_SEGMENT_CHARS // 5)
    assert bounded_runs(text) == [text]
    assert bounded_runs("") == [""]


def test_a_run_is_cut_at_a_clause_mark_near_its_middle_rather_than_between_words() -> None:
    text = "one two three four five six seven eight, nine ten eleven twelve thirteen fourteen"
    runs = bounded_runs(text, 50)
    assert runs[0] == "one two three four five six seven eight, "


def test_a_run_does_not_end_on_a_word_that_leads_into_the_next() -> None:
    text = "we will see the doctor and the nurse in the morning on the day before the trip to the sea"
    for run in bounded_runs(text, 30)[:-1]:
        assert run.split()[-1] not in {"the", "and", "in", "on", "to"}


def test_a_cut_between_words_joins_the_next_segment_and_a_cut_at_a_comma_does_not() -> None:
    words = " ".join(["hello"] * 60)
    segments = prepare_text(f"{words}, {words}", max_chars=5000)
    speeches = [segment for segment in segments if isinstance(segment, Speech)]
    assert len(speeches) >= 3
    for segment in speeches[:-1]:
        assert segment.continues == (not segment.text.endswith(","))
    assert not speeches[-1].continues


def test_a_giant_word_is_cut_after_a_mark_inside_it_and_never_before_a_combining_mark() -> None:
    url = "https://example.com/" + "abc/" * 100
    assert all(run.endswith("/") for run in bounded_runs(url)[:-1])
    accented = "e\u0301" * 500
    for run in bounded_runs(accented)[1:]:
        assert run[0] == "e"


def test_ssml_breaks_and_rates_stay_where_they_were_around_the_cuts() -> None:
    words = " ".join(["slow"] * 100)
    segments = prepare_text(
        f'<speak>Hi there.<break time="1s"/><prosody rate="50%">{words}</prosody>'
        f'<break time="500ms"/>{words}</speak>',
        max_chars=5000,
    )
    pauses = [index for index, segment in enumerate(segments) if isinstance(segment, Pause)]
    assert [segments[index] for index in pauses] == [Pause(1.0), Pause(0.5)]
    slow = segments[pauses[0] + 1 : pauses[1]]
    fast = segments[pauses[1] + 1 :]
    assert len(slow) > 1
    assert len(fast) > 1
    assert all(isinstance(s, Speech) and s.rate == 0.5 and len(s.text) <= MAX_SEGMENT_CHARS for s in slow)
    assert all(isinstance(s, Speech) and s.rate == 1.0 and len(s.text) <= MAX_SEGMENT_CHARS for s in fast)
    # The runs before a break do not join across it.
    assert isinstance(slow[-1], Speech)
    assert not slow[-1].continues


def test_the_timings_sentences_are_the_engines_runs_however_the_whitespace_is_written() -> None:
    raw = "  ".join(["hello"] * 150) + "\n\n" + "a" * 450 + " done"
    normalised = normalise_whitespace(raw)
    assert [normalise_whitespace(piece) for piece in sentences(raw)] == [
        run.strip() for run in bounded_runs(normalised)
    ]
    assert "".join(sentences(raw)) == raw


def test_an_engine_with_a_lower_bound_cuts_a_segment_into_joined_runs() -> None:
    runs = bounded_speech(Speech("hello " * 100, rate=1.5, continues=False), 82)
    assert all(len(run.text) <= 82 and run.rate == 1.5 for run in runs)
    assert [run.continues for run in runs] == [True] * (len(runs) - 1) + [False]


@pytest.mark.parametrize(
    ("count", "gap_every"), [(10_000, 0), (1000, 7), (257, 5), (256, 0), (40, 3)], ids=str
)
def test_piper_renders_at_most_its_phoneme_bound_at_word_gaps_where_there_are_some(
    count: int, gap_every: int
) -> None:
    phonemes = [" " if gap_every and index % gap_every == gap_every - 1 else "a" for index in range(count)]
    runs = phoneme_runs(phonemes)
    assert all(0 < len(run) <= 256 for run in runs)
    if gap_every:
        assert sum(len(run) for run in runs) + len(runs) - 1 == count  # only the gaps cut at went
    else:
        assert sum(len(run) for run in runs) == count


TEXT_ALPHABET = st.sampled_from([*"ab, .\n\t", "你", "e\u0301", "/", "  ", "1"])


@settings(max_examples=300, deadline=None)
@given(st.lists(TEXT_ALPHABET, max_size=1500).map("".join), st.integers(min_value=8, max_value=300))
def test_any_text_is_cut_into_runs_that_are_within_the_bound_and_make_the_text(text: str, limit: int) -> None:
    runs = bounded_runs(text, limit)
    assert "".join(runs) == text
    assert all(len(normalise_whitespace(run)) <= limit for run in runs)
    # Cut from the normalised text, the runs are the same.
    from_normalised = [normalise_whitespace(run) for run in bounded_runs(normalise_whitespace(text), limit)]
    assert [run for run in from_normalised if run] == [
        normalise_whitespace(run) for run in runs if normalise_whitespace(run)
    ]


@settings(max_examples=100, deadline=None)
@given(st.lists(TEXT_ALPHABET, min_size=1, max_size=3000).map("".join))
def test_any_text_prepares_into_segments_within_the_bound(text: str) -> None:
    if not is_speakable(text):  # nothing to say: refused with its code (test_text.py)
        return
    segments = prepare_text(text, max_chars=10_000, first_chunk_words=5)
    assert all(len(s.text) <= MAX_SEGMENT_CHARS for s in segments if isinstance(s, Speech))
