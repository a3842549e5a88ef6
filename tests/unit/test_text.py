from __future__ import annotations

import pytest

from core.errors import ServiceError
from engines.text import Pause, Speech, prepare_text, split_for_streaming, strip_control_characters


def code_of(text: str, max_chars: int = 5000) -> str:
    with pytest.raises(ServiceError) as raised:
        prepare_text(text, max_chars=max_chars)
    return raised.value.code


@pytest.mark.parametrize("text", ["", "   ", "\n\t ", "\x00\x07\u200b"])
def test_empty_or_invisible_text_is_refused(text: str) -> None:
    assert code_of(text) == "empty_text"


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


def test_external_entities_are_refused() -> None:
    document = (
        '<speak xmlns="http://www.w3.org/2001/10/synthesis"><!DOCTYPE x SYSTEM "file:///etc/passwd"></speak>'
    )
    assert code_of(document) == "invalid_ssml"


def nested_ssml(depth: int) -> str:
    """`depth` elements in all: <speak> and depth - 1 nested <p>."""
    return "<speak>" + "<p>" * (depth - 1) + "Deep inside." + "</p>" * (depth - 1) + "</speak>"


def test_ssml_nested_up_to_the_limit_is_spoken() -> None:
    from engines.text import MAX_SSML_DEPTH

    assert prepare_text(nested_ssml(MAX_SSML_DEPTH), max_chars=5000) == [Speech("Deep inside.")]


@pytest.mark.parametrize("depth", [33, 300, 1200])
def test_ssml_nested_deeper_than_the_limit_is_a_400_not_a_crash(depth: int) -> None:
    with pytest.raises(ServiceError) as raised:
        prepare_text(nested_ssml(depth), max_chars=50_000)
    assert (raised.value.status_code, raised.value.code) == (400, "invalid_ssml")
    assert "nest" in raised.value.message
