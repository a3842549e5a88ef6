"""Character timings of spoken text: which character is heard when, for the dialects that
report them (ElevenLabs' `alignment`, Cartesia's word `timestamps`).

Neither engine reports where its characters fall in its audio as it streams, so the
timings are estimated, and are always consistent with the audio actually sent: every
character of a piece of text is placed inside that piece's audio, in order, each taking a
share of it in proportion to its weight (a letter or digit counts 1, a space or mark less).

- Piper renders one whole sentence per chunk: each chunk takes the next sentence of the
  piece (`sentences`), so sentence boundaries are exact where our sentence ends are
  espeak's. (The WebSocket stream also sends each sentence to the engine as a piece of its
  own, so one piece is one chunk.) Within a sentence, Piper's own phoneme durations place
  each word (`piper_word_spans`, carried by the chunk itself: engines.base.AudioChunk)
  when its words are the text's (a number read as two words is not: that sentence falls
  back to proportions).
- XTTS streams a sentence in several chunks. Each chunk's audio takes the characters an
  estimated speaking rate says it holds; whatever the estimate left over when the piece
  ends takes the tail of its last chunk (0 ms long when the estimate was short).

Times are milliseconds from the start of the context's (utterance's) audio.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from engines.base import WordSpans
from engines.text import Segment, Speech, bounded_runs, is_ssml_document

# About 14 characters a second at speed 1 (English speech): the estimate XTTS's chunks use.
SECONDS_PER_WEIGHT = 1 / 14
_SENTENCE_END = re.compile(r"""(?<=[.!?\u2026\u3002\uff01\uff1f])["')\]]*\s+""")


def char_weight(char: str) -> float:
    if char.isalnum():
        return 1.0
    if char.isspace():
        return 0.5
    return 0.25


@dataclass
class CharTimings:
    """Characters with their start and duration (ms from the start of the context's audio)."""

    chars: list[str] = field(default_factory=list)
    starts_ms: list[int] = field(default_factory=list)
    durations_ms: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.chars)

    def extend(self, other: CharTimings) -> None:
        self.chars += other.chars
        self.starts_ms += other.starts_ms
        self.durations_ms += other.durations_ms

    def shifted(self, offset_ms: int) -> CharTimings:
        """The same timings with `offset_ms` taken off each start (times relative to a message)."""
        return CharTimings(
            list(self.chars), [max(0, start - offset_ms) for start in self.starts_ms], list(self.durations_ms)
        )


def spread(chars: str, start_s: float, end_s: float) -> CharTimings:
    """`chars` laid over [start_s, end_s] in proportion to their weights, in whole milliseconds
    that add up exactly (each start is the previous end)."""
    timings = CharTimings()
    if not chars:
        return timings
    weights = [char_weight(char) for char in chars]
    total = sum(weights)
    span = max(0.0, end_s - start_s)
    start_ms = round(start_s * 1000)
    so_far = 0.0
    for char, weight in zip(chars, weights, strict=True):
        so_far += weight
        end_ms = round((start_s + span * so_far / total) * 1000)
        timings.chars.append(char)
        timings.starts_ms.append(start_ms)
        timings.durations_ms.append(max(0, end_ms - start_ms))
        start_ms = end_ms
    return timings


def piper_word_spans(
    phonemes: Sequence[str], phoneme_id_samples: Sequence[int], id_map: Mapping[str, Sequence[int]]
) -> WordSpans | None:
    """Each word's span in a Piper sentence, from the samples of each phoneme id: the ids
    are BOS, then each phoneme's ids followed by PAD, then EOS (piper.phoneme_ids); words are
    the runs of phonemes between spaces. None when the ids do not line up."""
    pad = len(id_map.get("_", ()))
    total = float(sum(phoneme_id_samples))
    if total <= 0:
        return None
    index = len(id_map.get("^", ())) + pad
    position = float(sum(phoneme_id_samples[:index]))
    spans: WordSpans = []
    word_start: float | None = None
    for phoneme in phonemes:
        width = len(id_map.get(phoneme, ())) + pad
        if phoneme.isspace():
            if word_start is not None:
                spans.append((word_start / total, position / total))
                word_start = None
        elif word_start is None:
            word_start = position
        position += float(sum(phoneme_id_samples[index : index + width]))
        index += width
    if word_start is not None:
        spans.append((word_start / total, position / total))
    if index + len(id_map.get("$", ())) != len(phoneme_id_samples):
        return None
    return spans


def spoken_text(text: str, segments: Sequence[Segment]) -> str:
    """What a piece's timings spell: its text, or for an SSML document the words it speaks
    (its markup is never heard, so no time of the audio belongs to a tag), each run of
    speech followed by a space."""
    if not is_ssml_document(text):
        return text
    return "".join(f"{segment.text} " for segment in segments if isinstance(segment, Speech))


def chunks_are_sentences(engine_name: str) -> bool:
    """Whether the engine renders each sentence as one chunk (Piper), so that a piece of one
    sentence is one chunk and its characters' span is exact."""
    return engine_name == "piper"


def sentences(text: str) -> list[str]:
    """`text` cut after each sentence end (the whitespace stays with the sentence before it),
    and a long sentence into the runs the engine is given (engines.text.bounded_runs, which
    cuts the raw text where it cuts the normalised one)."""
    pieces: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return [run for piece in pieces if piece for run in bounded_runs(piece) if run]


class CharTimeline:
    """The character timings of one utterance, piece by piece, as its audio goes out.

    `begin(text)` when a piece of text goes to the engine; `advance(audio_end_s)` after each
    chunk of its audio is sent (the utterance's audio clock at the chunk's end), which returns
    the characters heard in that chunk; `finish(audio_end_s)` when the piece's audio has all
    been sent, which returns any characters not yet placed."""

    def __init__(self, *, whole_pieces: bool, speed: float = 1.0) -> None:
        # Each piece is one chunk (Piper, sentence by sentence): its first chunk takes it all.
        self.whole_pieces = whole_pieces
        self.speed = speed
        self._pending = ""
        self._sentences: list[str] = []
        self._piece_start_s = 0.0
        self._placed_until_s = 0.0
        self._placed_weight = 0.0

    def begin(self, text: str, audio_end_s: float) -> None:
        self._pending = text
        self._sentences = sentences(text)
        self._piece_start_s = audio_end_s
        self._placed_until_s = audio_end_s
        self._placed_weight = 0.0

    def advance(
        self, audio_end_s: float, words: WordSpans | None = None, text: str | None = None
    ) -> CharTimings:
        """`words`: the spans of the words this chunk speaks, when the engine knows them
        (an empty list: a chunk of silence, such as an SSML break); `text`: what it speaks,
        when the engine said (AudioChunk.text)."""
        if not self._pending:
            return CharTimings()
        if self.whole_pieces:
            if words is not None and not words:  # a pause: its time passes, no characters
                self._placed_until_s = max(self._placed_until_s, audio_end_s)
                return CharTimings()
            # Every chunk takes its own characters, even one whose audio the encoder still
            # holds (they are placed at the clock, 0 ms long), so later chunks keep theirs.
            end_s = max(audio_end_s, self._placed_until_s)
            count = self._spelled_by(text) if text else 0
            if count:
                self._sentences = sentences(self._pending[count:])
            else:
                count = self._next_chunk_chars(words)
            if words and count and (timed := self._by_words(count, end_s, words)):
                return timed
            return self._place(count, end_s)
        if audio_end_s <= self._placed_until_s:
            return CharTimings()
        # The weight of text this much audio holds at the estimated rate, less what is placed.
        heard = (audio_end_s - self._piece_start_s) * self.speed / SECONDS_PER_WEIGHT - self._placed_weight
        count, weight = 0, 0.0
        for char in self._pending:
            if weight + char_weight(char) > heard:
                break
            weight += char_weight(char)
            count += 1
        if count == 0:
            return CharTimings()
        return self._place(count, audio_end_s)

    def finish(self, audio_end_s: float) -> CharTimings:
        self._sentences = []
        if not self._pending:
            return CharTimings()
        return self._place(len(self._pending), max(audio_end_s, self._placed_until_s))

    def _spelled_by(self, text: str) -> int:
        """How many pending characters spell `text` (the chunk's own text, whose whitespace
        the engine may have normalised), with the whitespace after them; 0 when the pending
        text does not start with it."""
        wanted = "".join(text.split())
        matched = 0
        for index, char in enumerate(self._pending):
            if char.isspace():
                continue
            if matched == len(wanted):
                return index
            if char != wanted[matched]:
                return 0
            matched += 1
        return len(self._pending) if matched == len(wanted) else 0

    def _next_chunk_chars(self, words: WordSpans | None) -> int:
        """How many pending characters a whole-sentence engine's chunk speaks: the next
        sentence, or, when the engine said how many words the chunk holds and the sentence has
        more (a quick first chunk: the sentence's first words, then the rest), that many of its
        words and the spaces after them."""
        if not self._sentences:
            return 0
        sentence = self._sentences[0]
        if words:
            tokens = list(re.finditer(r"\S+\s*", sentence))
            if len(words) < len(tokens):
                head = tokens[len(words) - 1].end()
                self._sentences[0] = sentence[head:]
                return head
        self._sentences.pop(0)
        return len(sentence)

    def _by_words(self, count: int, end_s: float, words: WordSpans) -> CharTimings | None:
        """The first `count` pending characters over [placed, end_s], word by word where the
        engine's words are the text's; None where they are not."""
        text = self._pending[:count]
        tokens = list(re.finditer(r"\S+", text))
        if len(tokens) != len(words):
            return None
        start_s = self._placed_until_s
        span = end_s - start_s

        def at(fraction: float) -> float:
            return start_s + span * min(max(fraction, 0.0), 1.0)

        timings = CharTimings()
        cursor, cursor_s = 0, start_s
        for token, (word_start, word_end) in zip(tokens, words, strict=True):
            # The gap before a word (its spaces, the pause) runs up to where the word starts.
            timings.extend(spread(text[cursor : token.start()], cursor_s, max(cursor_s, at(word_start))))
            begin_s = max(cursor_s, at(word_start))
            cursor_s = max(begin_s, at(word_end))
            timings.extend(spread(token.group(), begin_s, cursor_s))
            cursor = token.end()
        timings.extend(spread(text[cursor:], cursor_s, end_s))
        self._pending = self._pending[count:]
        self._placed_weight += sum(char_weight(char) for char in text)
        self._placed_until_s = end_s
        return timings

    def _place(self, count: int, end_s: float) -> CharTimings:
        if count == 0:
            return CharTimings()
        placed, self._pending = self._pending[:count], self._pending[count:]
        timings = spread(placed, self._placed_until_s, end_s)
        self._placed_weight += sum(char_weight(char) for char in placed)
        self._placed_until_s = end_s
        return timings
