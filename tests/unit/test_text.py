from __future__ import annotations

import pytest

from core.errors import ServiceError
from engines.base import SpeechJob
from engines.text import (
    MAX_SSML_DEPTH,
    OutputBudget,
    Pause,
    Segment,
    Speech,
    SsmlLimits,
    effective_rate,
    estimated_audio_seconds,
    prepare_text,
    split_for_streaming,
    strip_control_characters,
)


def code_of(text: str, max_chars: int = 5000) -> str:
    with pytest.raises(ServiceError) as raised:
        prepare_text(text, max_chars=max_chars)
    return raised.value.code


@pytest.mark.parametrize("text", ["", "   ", "\n\t ", "\x00\x07\u200b"])
def test_empty_or_invisible_text_is_refused(text: str) -> None:
    assert code_of(text) == "empty_text"


@pytest.mark.parametrize(
    "text",
    [
        "...!!!???",
        "  ,,, ",
        "— … ¿?",
        "😀👍",
        '<speak><break time="500ms"/>...<break strength="strong"/></speak>',
        '<speak><p>!!!</p><prosody rate="slow">, ,</prosody></speak>',
    ],
)
def test_text_with_no_letter_or_digit_has_nothing_to_say(text: str) -> None:
    assert code_of(text) == "empty_text"


@pytest.mark.parametrize("text", ["42", "Ж", "你好", "١٢", "x!"])
def test_one_letter_or_digit_in_any_script_is_speakable(text: str) -> None:
    assert prepare_text(text, max_chars=100) == [Speech(text)]


def test_pieces_of_only_punctuation_are_not_sent_to_the_engine() -> None:
    ssml = '<speak>Hello there. <break time="1s"/> ... !!! <break time="1s"/>Bye.</speak>'
    segments = prepare_text(ssml, max_chars=500)
    assert segments == [Speech("Hello there."), Pause(1.0), Pause(1.0), Speech("Bye.")]


def test_text_over_the_limit_is_refused_with_the_limit_in_the_message() -> None:
    with pytest.raises(ServiceError) as raised:
        prepare_text("a" * 101, max_chars=100)
    assert raised.value.status_code == 413
    assert raised.value.code == "text_too_long"
    assert "100" in raised.value.message


def test_control_characters_are_stripped() -> None:
    assert strip_control_characters("Hi\x00 there\x1b[31m\u200b!\nBye") == "Hi there[31m! Bye"


def test_the_first_sentence_is_cut_at_clauses_so_audio_can_start_early() -> None:
    pieces = split_for_streaming(
        "Thanks for calling Acme Dental, this is Ava, your virtual assistant. How can I help you today? Bye."
    )
    assert pieces == [
        "Thanks for calling Acme Dental,",
        "this is Ava, your virtual assistant.",
        "How can I help you today?",
        "Bye.",
    ]


def test_short_clauses_are_not_split_off() -> None:
    assert split_for_streaming("Hi, Bob. Yes.") == ["Hi, Bob.", "Yes."]


def test_ssml_subset_becomes_speech_and_pauses() -> None:
    segments = prepare_text(
        '<speak><p><s>Hello.</s><break time="300ms"/>Call <sub alias="Doctor">Dr.</sub> Smith '
        '<prosody rate="slow">very slowly</prosody><emphasis>now</emphasis>.</p>'
        '<break time="2s"/></speak>',
        max_chars=5000,
    )
    assert segments == [
        Speech("Hello."),
        Pause(0.3),
        Speech("Call Doctor Smith"),
        Speech("very slowly", rate=0.75),
        Speech("now."),
        Pause(2.0),
    ]


def test_prosody_percentages_and_break_strengths() -> None:
    segments = prepare_text(
        '<speak><prosody rate="150%">quick</prosody><break strength="strong"/>end</speak>', max_chars=5000
    )
    assert segments == [Speech("quick", rate=1.5), Pause(0.75), Speech("end")]


@pytest.mark.parametrize(
    "document",
    [
        "<speak>unclosed",
        "<speak><p>bad</s></speak>",
        '<speak><break time="soon"/></speak>',
        '<speak><prosody rate="warp">x</prosody></speak>',
        "<speaking>not ssml</speaking>",
    ],
)
def test_malformed_ssml_is_a_400(document: str) -> None:
    assert code_of(document) == "invalid_ssml"


def test_entity_expansion_is_refused() -> None:
    billion_laughs = (
        '<?xml version="1.0"?><!DOCTYPE speak [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
        "<speak>&lol2;</speak>"
    )
    assert code_of(billion_laughs) == "invalid_ssml"
    assert code_of("<speak><!DOCTYPE x [<!ENTITY a 'b'>]>&a;</speak>") == "invalid_ssml"


def test_a_doctype_before_speak_is_a_document_never_spoken_as_text() -> None:
    document = "<!DOCTYPE speak>\n<speak>Hello <break time='1ms'/>there.</speak>"
    segments = prepare_text(document, max_chars=1000)
    assert [segment.text for segment in segments if isinstance(segment, Speech)] == ["Hello", "there."]


@pytest.mark.parametrize(
    "document",
    [
        '<!doctype speak SYSTEM "speak.dtd">\n<speak>Hello there.</speak>',  # XML's DOCTYPE is upper case
        "  <!DOCTYPE html><p>Hello</p>",
        "<SPEAK>Hello</speak>",
        '<?XML version="1.0"?><speak>Hello there.</speak>',
    ],
)
def test_markup_that_opens_like_a_document_is_parsed_and_refused_never_spoken_as_text(document: str) -> None:
    assert code_of(document) == "invalid_ssml"


def test_external_entities_are_refused() -> None:
    document = (
        '<speak xmlns="http://www.w3.org/2001/10/synthesis"><!DOCTYPE x SYSTEM "file:///etc/passwd"></speak>'
    )
    assert code_of(document) == "invalid_ssml"


def nested_ssml(depth: int) -> str:
    """`depth` elements in all: <speak> and depth - 1 nested <p>."""
    return "<speak>" + "<p>" * (depth - 1) + "Deep inside." + "</p>" * (depth - 1) + "</speak>"


def test_ssml_nested_up_to_the_limit_is_spoken() -> None:
    assert prepare_text(nested_ssml(MAX_SSML_DEPTH), max_chars=5000) == [Speech("Deep inside.")]


@pytest.mark.parametrize("depth", [33, 300, 1200])
def test_ssml_nested_deeper_than_the_limit_is_a_400_not_a_crash(depth: int) -> None:
    with pytest.raises(ServiceError) as raised:
        prepare_text(nested_ssml(depth), max_chars=50_000)
    assert (raised.value.status_code, raised.value.code) == (400, "invalid_ssml")
    assert "nest" in raised.value.message


def test_the_ssml_depth_limit_is_configurable_and_keeps_its_code() -> None:
    limits = SsmlLimits(max_depth=5)
    assert prepare_text(nested_ssml(5), max_chars=5000, ssml=limits) == [Speech("Deep inside.")]
    with pytest.raises(ServiceError) as raised:
        prepare_text(nested_ssml(6), max_chars=5000, ssml=limits)
    assert (raised.value.status_code, raised.value.code) == (400, "invalid_ssml")


# --- output bounded by input ---

# Issue 17's flood: 4,967 characters (5.5 KB as JSON), 2,600 s (43 minutes) of silence.
BREAK_FLOOD = "<speak>Hold on." + '<break time="10s"/>' * 260 + "</speak>"


def budget(speed: float = 1.0, max_audio_seconds: float = 600, max_breaks: float = 30) -> OutputBudget:
    return OutputBudget(speed=speed, max_audio_seconds=max_audio_seconds, max_break_seconds_total=max_breaks)


def test_a_single_break_is_cut_to_the_per_break_limit() -> None:
    document = '<speak>Hold on.<break time="60s"/>Back.<break time="1500ms"/></speak>'
    assert prepare_text(document, max_chars=5000, ssml=SsmlLimits(max_break_seconds=4)) == [
        Speech("Hold on."),
        Pause(4.0),
        Speech("Back."),
        Pause(1.5),
    ]


def test_a_break_flood_overdraws_the_total_break_limit() -> None:
    segments = prepare_text(BREAK_FLOOD, max_chars=5000)
    with pytest.raises(ServiceError) as raised:
        budget().spend(segments)
    assert (raised.value.status_code, raised.value.code) == (400, "ssml_break_too_long")
    assert "30 s" in raised.value.message


def test_breaks_up_to_the_total_limit_pass() -> None:
    segments = prepare_text(
        '<speak>One.<break time="10s"/>Two.' + '<break time="10s"/>' * 2 + "</speak>", max_chars=500
    )
    budget().spend(segments)  # exactly 30 s: within the limit


def test_an_utterance_spends_its_budget_piece_by_piece() -> None:
    piece = prepare_text('<speak>Wait.<break time="10s"/><break time="10s"/></speak>', max_chars=500)
    spending = budget()
    spending.spend(piece)
    with pytest.raises(ServiceError) as raised:
        spending.spend(piece)
    assert raised.value.code == "ssml_break_too_long"


def test_nested_prosody_rates_multiply_only_within_the_speed_range() -> None:
    slowest = "<speak>" + '<prosody rate="25%">' * 3 + "Hi." + "</prosody>" * 3 + "</speak>"
    fastest = '<speak><prosody rate="400%"><prosody rate="x-fast">Hi.</prosody></prosody></speak>'
    assert prepare_text(slowest, max_chars=5000) == [Speech("Hi.", rate=0.25)]
    assert prepare_text(fastest, max_chars=5000) == [Speech("Hi.", rate=4.0)]


@pytest.mark.parametrize(
    ("speed", "rate", "spoken_at"),
    [(0.25, 0.25, 0.25), (0.5, 0.75, 0.375), (4.0, 1.75, 4.0), (1.0, 1.0, 1.0)],
)
def test_an_engine_speaks_at_speed_times_rate_clamped_to_the_speed_range(
    speed: float, rate: float, spoken_at: float
) -> None:
    segment = Speech("Hi.", rate=rate)
    assert effective_rate(speed, rate) == spoken_at
    assert SpeechJob(segments=[segment], speed=speed).rate_of(segment) == spoken_at


def test_the_estimate_counts_characters_at_the_effective_speed_plus_breaks() -> None:
    segments: list[Segment] = [Speech("x" * 250), Pause(2.0), Speech("y" * 125, rate=0.5)]
    # 250 characters at 25 a second, 2 s, 125 characters at 25 a second at half speed
    assert estimated_audio_seconds(segments, 1.0) == pytest.approx(10 + 2 + 10)
    assert estimated_audio_seconds(segments, 0.25) == pytest.approx(40 + 2 + 20)


def test_a_text_whose_estimate_is_over_the_limit_is_refused() -> None:
    text = "Please hold while I look that up for you. " * 95  # about 4,000 characters
    segments = prepare_text(text, max_chars=5000)
    budget(speed=1.0).spend(segments)  # about 160 s by the estimate
    with pytest.raises(ServiceError) as raised:
        budget(speed=0.25).spend(segments)  # about 640 s
    assert (raised.value.status_code, raised.value.code) == (400, "audio_too_long")
    assert raised.value.details == {"limit": 600}


def test_the_first_chunk_is_the_first_few_words_marked_to_join_the_rest() -> None:
    segments = prepare_text(
        "I can see your file here and your last cleaning was in March. See you soon.",
        max_chars=500,
        first_chunk_words=5,
    )
    assert segments[:2] == [
        Speech("I can see your file", continues=True),
        Speech("here and your last cleaning was in March."),
    ]
    assert segments[2:] == [Speech("See you soon.")]


@pytest.mark.parametrize(
    "text",
    [
        "I can see your file here, and your last cleaning was in March.",  # six: not worth it
        "Yes, of course.",
        "One two three four five six seven.",  # two words would be left: not worth a cut
    ],
)
def test_a_first_clause_hardly_longer_than_the_first_chunk_is_not_cut(text: str) -> None:
    segments = prepare_text(text, max_chars=500, first_chunk_words=5)
    assert not any(isinstance(segment, Speech) and segment.continues for segment in segments)


def test_a_first_clause_of_the_first_chunks_length_is_cut_where_it_ends() -> None:
    text = "Thanks for calling Acme Dental, this is Ava."
    segments = prepare_text(text, max_chars=500, first_chunk_words=5)
    assert segments == [Speech("Thanks for calling Acme Dental,", continues=True), Speech("this is Ava.")]


def test_the_quick_opening_is_the_first_speech_after_a_leading_break_and_keeps_its_rate() -> None:
    ssml = (
        '<speak><break time="300ms"/>'
        '<prosody rate="slow">One two three four five six seven eight nine.</prosody></speak>'
    )
    segments = prepare_text(ssml, max_chars=500, first_chunk_words=4)
    assert segments == [
        Pause(0.3),
        Speech("One two three four", 0.75, continues=True),
        Speech("five six seven eight nine.", 0.75),
    ]


def test_without_first_chunk_words_the_first_clause_is_the_first_chunk() -> None:
    segments = prepare_text("I can see your file here and your last cleaning was in March.", max_chars=500)
    assert segments == [Speech("I can see your file here and your last cleaning was in March.")]
