"""How a stream's text, arriving in pieces, becomes pieces ready to speak (ready_pieces):
every way of cutting a text into messages gives pieces the text parser accepts, and an
SSML document is never cut apart."""

from __future__ import annotations

import pytest

from engines.text import Pause, Speech, prepare_text
from synthesis.stream.protocol import ready_pieces

SSML = (
    '<speak>First sentence here. <break time="200ms"/>'
    'Second one, <prosody rate="slow">slowly.</prosody></speak>'
)
MIXED = f"Hello there. {SSML} And plain text after it. "


def spoken(messages: list[str], *, eager: bool = False) -> list[str]:
    """The pieces an utterance speaks for `messages`, then `end` (as Utterance.add_text);
    `eager`: each message that ends a sentence is spoken at once (the dialects' auto mode)."""
    buffer, pieces = "", list[str]()
    for message in [*messages, None]:
        ends_sentence = eager and (message or "").rstrip().endswith((".", "!", "?"))
        ready, buffer = ready_pieces(buffer + (message or ""), final=message is None, eager=ends_sentence)
        pieces.extend(piece for piece in ready if piece.strip())
    return pieces


def every_two_way_cut(text: str) -> list[list[str]]:
    return [[text[:cut], text[cut:]] for cut in range(1, len(text))]


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("messages", [[SSML], [MIXED], *every_two_way_cut(MIXED)])
def test_any_cut_of_text_and_ssml_gives_pieces_the_parser_accepts(messages: list[str], eager: bool) -> None:
    pieces = spoken(messages, eager=eager)
    segments = [segment for piece in pieces for segment in prepare_text(piece, max_chars=5000)]
    # The document is one piece: its break and its slow prosody survive, its text is spoken.
    assert Pause(0.2) in segments
    assert Speech("slowly.", 0.75) in segments
    assert any(piece.strip().startswith("<speak") and piece.strip().endswith("</speak>") for piece in pieces)


def test_plain_text_is_ready_clause_by_clause_and_a_document_only_once_closed() -> None:
    assert ready_pieces("One. Two") == (["One. "], "Two")
    assert ready_pieces("<speak>One. Two. ") == ([], "<speak>One. Two. ")
    assert ready_pieces("Before. <speak>One.") == (["Before. "], "<speak>One.")
    assert ready_pieces("<speak>One.</speak> After. Still") == (["<speak>One.</speak>", " After. "], "Still")
    assert ready_pieces("A <speak>B</speak> C", final=True) == (["A ", "<speak>B</speak>", " C"], "")


def test_text_that_merely_mentions_a_speak_like_tag_is_not_held_as_a_document() -> None:
    assert ready_pieces("Tap the <speaker> icon. Then") == (["Tap the <speaker> icon. "], "Then")
    assert ready_pieces("<SPEAK>One.") == ([], "<SPEAK>One.")  # a real opening, in capitals


def test_eager_mode_speaks_a_finished_sentence_at_once_but_never_half_a_document() -> None:
    assert ready_pieces("Hello there.", eager=True) == (["Hello there."], "")
    assert ready_pieces("<speak>First sentence.", eager=True) == ([], "<speak>First sentence.")
