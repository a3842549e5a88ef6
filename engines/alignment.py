"""Character timings of spoken text: which character is heard when, for the dialects that
report them (ElevenLabs' `alignment`, Cartesia's word `timestamps`).

Neither engine reports where its characters fall in its audio as it streams, so the
timings are estimated, and are always consistent with the audio actually sent: every
character of a piece of text is placed inside that piece's audio, in order, each taking a
share of it in proportion to its weight (a letter or digit counts 1, a space or mark less).

- Piper renders one whole sentence per chunk: each chunk takes the next sentence of the
  piece (`sentences`), so sentence boundaries are exact where our sentence ends are
  espeak's, and times within a sentence are proportional. (The WebSocket stream also sends
  each sentence to the engine as a piece of its own, so one piece is one chunk.)
- XTTS streams a sentence in several chunks. Each chunk's audio takes the characters an
  estimated speaking rate says it holds; whatever the estimate left over when the piece
  ends takes the tail of its last chunk (0 ms long when the estimate was short).

Times are milliseconds from the start of the context's (utterance's) audio.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

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


def chunks_are_sentences(engine_name: str) -> bool:
    """Whether the engine renders each sentence as one chunk (Piper), so that a piece of one
    sentence is one chunk and its characters' span is exact."""
    return engine_name == "piper"


def sentences(text: str) -> list[str]:
    """`text` cut after each sentence end (the whitespace stays with the sentence before it)."""
    pieces: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    if start < len(text):
        pieces.append(text[start:])
    return [piece for piece in pieces if piece]


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

    def advance(self, audio_end_s: float) -> CharTimings:
        if not self._pending or audio_end_s <= self._placed_until_s:
            return CharTimings()
        if self.whole_pieces:
            # The next sentence, whole (the last chunk the engine makes takes the rest).
            return self._place(len(self._sentences.pop(0)) if self._sentences else 0, audio_end_s)
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

    def _place(self, count: int, end_s: float) -> CharTimings:
        if count == 0:
            return CharTimings()
        placed, self._pending = self._pending[:count], self._pending[count:]
        timings = spread(placed, self._placed_until_s, end_s)
        self._placed_weight += sum(char_weight(char) for char in placed)
        self._placed_until_s = end_s
        return timings
