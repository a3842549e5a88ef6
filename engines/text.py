"""From a request's text (plain or a small SSML subset) to speakable segments.

The output is a flat list of `Speech` (text plus a rate multiplier) and
`Pause` (silence) segments. Speech is cut at sentence and clause boundaries so
that the engine can start on the first clause instead of the whole text.

SSML subset: <speak>, <p>, <s>, <break time="500ms|1.5s" strength="...">,
<sub alias="...">, <prosody rate="x-slow|slow|medium|fast|x-fast|NN%">. Other
tags are dropped and their text kept. Parsed with defusedxml: no entity
expansion, no external entities.

Output is bounded by input (`SsmlLimits`, `OutputBudget`): a break is at most so long, a
request's breaks add up to at most so long, nested prosody rates multiply only within the
range of `speed` (and the engine clamps speed times rate to that range too), and a
request's estimated audio is at most so long. A few kilobytes of text can then no longer
ask for hours of audio.

Work per engine pass is bounded too, however the text is punctuated: an engine renders a
segment in one pass (Piper holds all of its audio in memory, about 10 MB a second; XTTS one
GPT pass), so a sentence without punctuation is cut into runs of at most
MAX_SEGMENT_CHARS (`bounded_runs`: at a clause mark if one lies near the middle, else
between words, never after a word like "the", and a word longer than the bound at a mark
inside it or, failing that, anywhere). The runs are the same whether cut from the raw
text or from its normalised form, so that character timings (engines/alignment.py) and
segments agree on where they lie.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from xml.etree.ElementTree import Element

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from core.errors import ServiceError

# Defaults of the SSML limits (settings SSML_MAX_DEPTH, SSML_MAX_BREAK_SECONDS).
MAX_BREAK_SECONDS = 10.0
# Real SSML nests a handful of elements deep; the walker recurses per level, so a
# document nested hundreds deep would exhaust the stack instead of being refused.
MAX_SSML_DEPTH = 32
# The range of a request's `speed`, and of speed times any SSML prosody rate.
MIN_RATE = 0.25
MAX_RATE = 4.0
# Faster than our voices speak at speed 1 (Piper's voice reads English prose at about 19
# characters a second, digits at about 4), so that the estimate of a text's audio errs
# short: a request is not refused for audio it would not have made; the encoder's count of
# what is made is the backstop.
ESTIMATE_CHARS_PER_SECOND = 25.0


@dataclass(frozen=True)
class Speech:
    text: str
    rate: float = 1.0
    # The next segment goes on with this one's sentence (a quick first chunk was cut off
    # it): an engine joins the two without the pause it puts at an utterance's ends.
    continues: bool = False


@dataclass(frozen=True)
class Pause:
    seconds: float


Segment = Speech | Pause


@dataclass(frozen=True)
class SsmlLimits:
    max_depth: int = MAX_SSML_DEPTH
    # A longer <break> is cut to this (as SSML processors do with what they cannot honour).
    max_break_seconds: float = MAX_BREAK_SECONDS


DEFAULT_SSML_LIMITS = SsmlLimits()


def effective_rate(speed: float, rate: float) -> float:
    """How fast a segment is spoken: the request's speed times its SSML rate, held to the
    range `speed` itself has (nested <prosody> would otherwise multiply without bound)."""
    return min(max(speed * rate, MIN_RATE), MAX_RATE)


def break_seconds(segments: list[Segment]) -> float:
    return sum(segment.seconds for segment in segments if isinstance(segment, Pause))


def estimated_audio_seconds(
    segments: list[Segment], speed: float, *, chars_per_second: float = ESTIMATE_CHARS_PER_SECOND
) -> float:
    """An estimate of the audio segments make at `speed`: short by default (see
    ESTIMATE_CHARS_PER_SECOND); a caller that must err long passes a lower rate."""
    seconds = 0.0
    for segment in segments:
        if isinstance(segment, Pause):
            seconds += segment.seconds
        else:
            seconds += len(segment.text) / chars_per_second / effective_rate(speed, segment.rate)
    return seconds


@dataclass
class OutputBudget:
    """What one request may make: its breaks in all, and its audio by estimate. A request
    spends it once with its whole text; a WebSocket utterance piece by piece, as its text
    arrives. Refusals are 400s before the audio of the piece that overdraws is made."""

    speed: float
    max_audio_seconds: float
    max_break_seconds_total: float
    spent_audio_seconds: float = 0.0
    spent_break_seconds: float = 0.0

    def spend(self, segments: list[Segment]) -> None:
        self.spent_break_seconds += break_seconds(segments)
        if self.spent_break_seconds > self.max_break_seconds_total:
            raise ServiceError(
                400,
                "ssml_break_too_long",
                f"The SSML breaks add up to {self.spent_break_seconds:g} s; "
                f"the limit is {self.max_break_seconds_total:g} s per request.",
                details={"limit": self.max_break_seconds_total},
            )
        self.spent_audio_seconds += estimated_audio_seconds(segments, self.speed)
        if self.spent_audio_seconds > self.max_audio_seconds:
            raise ServiceError(
                400,
                "audio_too_long",
                f"This would make at least {self.spent_audio_seconds:.0f} s of audio; "
                f"the limit is {self.max_audio_seconds:g} s per request.",
                details={"limit": self.max_audio_seconds},
            )


_BREAK_STRENGTHS = {"none": 0.0, "x-weak": 0.1, "weak": 0.25, "medium": 0.4, "strong": 0.75, "x-strong": 1.2}
_RATE_WORDS = {"x-slow": 0.5, "slow": 0.75, "medium": 1.0, "default": 1.0, "fast": 1.25, "x-fast": 1.75}

# Sentence ends: . ! ? … (and CJK full stops) followed by space or end.
# Where an SSML document starts: its root, an XML declaration, or a DOCTYPE (refused as
# invalid_ssml by the parser, never spoken as text), in any case.
SSML_START = re.compile(r"<(?:speak\b|\?xml\b|!doctype\b)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])[\"')\]]*\s+")  # noqa: RUF001  (full-width stops are real)
# Clause boundaries inside a long sentence.
_CLAUSE_END = re.compile(r"(?<=[,;:—–])\s+")  # noqa: RUF001  (em and en dashes)
# A first clause shorter than this is not worth its own engine call.
MIN_CLAUSE_CHARS = 20
# The longest segment an engine renders in one pass: about 35 words, 10 s of speech, 100 MB of
# Piper's working memory (a render's memory grows with its audio: 600 characters took 330 MB,
# 5,000 took 17 GB). coqui's XTTS cuts English at 250 (its tokenizer's char_limits).
MAX_SEGMENT_CHARS = 200
# A quick first chunk is not cut when fewer words than this would remain for the second.
MIN_WORDS_AFTER_CUT = 3


def strip_control_characters(text: str) -> str:
    """Drop control and format characters, keeping newlines and tabs as spaces."""
    cleaned = []
    for char in text:
        if char in "\n\r\t":
            cleaned.append(" ")
        elif unicodedata.category(char) in {"Cc", "Cf", "Cs", "Co", "Cn"}:
            continue
        else:
            cleaned.append(char)
    return "".join(cleaned)


def is_speakable(text: str) -> bool:
    """Whether `text` has something to say: a letter or a digit, in any script. Punctuation,
    symbols and emoji alone make no speech (an engine answers them with silence or noise)."""
    return any(char.isalnum() for char in text)


def normalise_whitespace(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# A run does not end on one of these: the word belongs with what follows it.
_LEADING_WORDS = frozenset(
    re.split(
        r"\s+",
        "a an the and or but nor so yet of to in on at by for with from into onto than that as if "
        "is are was were be my your our their his her its this these those",
    )
)


def _is_mark(char: str) -> bool:
    """Punctuation a phrase may end on (a comma, a stop, a slash, a closing bracket); not an
    opening bracket or quote."""
    return unicodedata.category(char) in {"Po", "Pd", "Pe", "Pf"}


@dataclass(frozen=True)
class _Atom:
    """A piece of text no cut goes inside: a word and the whitespace after it, or a part of a
    word longer than a run. `length` counts each run of whitespace as one character."""

    end: int  # offset just past it in the text
    length: int
    spaced: bool  # whitespace follows it
    rank: int  # how good a cut after it is: 2 after a mark, 1 after a word, 0 otherwise


def _word_parts(word: str, limit: int) -> list[str]:
    """A word longer than `limit` in parts of at most `limit`: each cut after a mark in the
    second half of its share ("/" in a URL, a full-width comma in Chinese), else at its share (parts of
    about equal length), and never before a combining mark (it belongs to the letter before)."""
    parts = []
    while len(word) > limit:
        share = -(-len(word) // -(-len(word) // limit))  # its length over the parts it needs
        cut = next((i for i in range(share, share // 2, -1) if _is_mark(word[i - 1])), share)
        while cut > 1 and unicodedata.combining(word[cut]):
            cut -= 1
        parts.append(word[:cut])
        word = word[cut:]
    parts.append(word)
    return parts


def _atoms(text: str, limit: int) -> list[_Atom]:
    atoms: list[_Atom] = []
    for match in re.finditer(r"\S+", text):
        word = match.group()
        spaced = match.end() < len(text)  # what follows a \S+ match is whitespace
        after = re.match(r"\s*", text[match.end() :])
        end = match.end() + (len(after.group()) if after else 0)
        offset = match.start()
        parts = _word_parts(word, limit)
        for index, part in enumerate(parts):
            offset += len(part)
            last = index == len(parts) - 1
            if _is_mark(part[-1]):
                rank = 2
            elif last and spaced and part.lower() not in _LEADING_WORDS:
                rank = 1
            else:
                rank = 0
            atoms.append(
                _Atom(
                    end if last else offset, len(part) + (1 if last and spaced else 0), last and spaced, rank
                )
            )
    return atoms


def bounded_runs(text: str, limit: int = MAX_SEGMENT_CHARS) -> list[str]:
    """`text` in consecutive runs (joined, they are `text`) of at most `limit` characters
    each, whitespace runs counted as one and not counting the whitespace a run ends with.
    Text within the bound is one run. A longer one is cut into about equal runs (so no run
    is a stub of a word or two), each cut at a clause mark if one lies past half of its
    share, else after a word that does not lead into the next, else after any word, else
    (one word longer than the bound: "aaaa...", a URL, Chinese without spaces) inside it."""
    atoms = _atoms(text, limit)
    runs: list[str] = []
    start = first = 0  # the run's offset in the text, and its first atom
    while first < len(atoms):
        remaining = sum(atom.length for atom in atoms[first:]) - (1 if atoms[-1].spaced else 0)
        if remaining <= limit:
            break
        target = remaining / -(-remaining // limit)  # remaining over the number of runs it needs
        best, best_key = first, (-1, 0.0)
        length = 0
        for index in range(first, len(atoms)):
            atom = atoms[index]
            run_length = length + atom.length - (1 if atom.spaced else 0)
            if run_length > limit:
                break
            length += atom.length
            rank = atom.rank if run_length >= target / 2 else 0
            key = (rank, -abs(run_length - target))
            if key > best_key:
                best, best_key = index, key
        runs.append(text[start : atoms[best].end])
        start, first = atoms[best].end, best + 1
    if start < len(text) or not runs:
        runs.append(text[start:])
    return runs


def ends_a_phrase(text: str) -> bool:
    """Whether `text` ends on a mark (a stop, a comma): speech pauses there of itself."""
    stripped = text.rstrip()
    return bool(stripped) and _is_mark(stripped[-1])


def split_for_streaming(text: str) -> list[str]:
    """Sentences, each cut into bounded runs (`bounded_runs`), the first run cut at clause
    boundaries too (so that audio can start early)."""
    sentences = [part.strip() for part in _SENTENCE_END.split(text) if part.strip()]
    pieces: list[str] = []
    for index, sentence in enumerate(sentences):
        for number, run in enumerate(run.strip() for run in bounded_runs(sentence)):
            if index == 0 and number == 0:
                pieces.extend(_merge_short(_CLAUSE_END.split(run)))
            elif run:
                pieces.append(run)
    return pieces


def bounded_speech(segment: Speech, limit: int = MAX_SEGMENT_CHARS) -> list[Speech]:
    """`segment` in runs of at most `limit` characters, each but the last marked to join the
    next (Speech.continues) unless it ends on a mark; for an engine whose own bound is lower."""
    runs = [run.strip() for run in bounded_runs(segment.text, limit)]
    runs = [run for run in runs if run]
    return [
        Speech(run, segment.rate, segment.continues if index == len(runs) - 1 else not ends_a_phrase(run))
        for index, run in enumerate(runs)
    ]


def _merge_short(clauses: list[str]) -> list[str]:
    merged: list[str] = []
    for clause in (c.strip() for c in clauses):
        if not clause:
            continue
        if merged and len(merged[-1]) < MIN_CLAUSE_CHARS:
            merged[-1] = f"{merged[-1]} {clause}"
        else:
            merged.append(clause)
    if len(merged) > 1 and len(merged[-1]) < MIN_CLAUSE_CHARS:
        last = merged.pop()
        merged[-1] = f"{merged[-1]} {last}"
    return merged


def _parse_duration(value: str, max_seconds: float) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s)\s*", value)
    if not match:
        raise ServiceError(400, "invalid_ssml", f'<break time="{value}"> must look like "500ms" or "1.5s".')
    amount = float(match.group(1))
    return min(amount / 1000 if match.group(2) == "ms" else amount, max_seconds)


def _parse_rate(value: str) -> float:
    value = value.strip().lower()
    if value in _RATE_WORDS:
        return _RATE_WORDS[value]
    match = re.fullmatch(r"(\d+(?:\.\d+)?)%", value)
    if not match:
        raise ServiceError(
            400, "invalid_ssml", f'<prosody rate="{value}"> must be a word like "slow" or a percentage.'
        )
    return min(max(float(match.group(1)) / 100, MIN_RATE), MAX_RATE)


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1].lower()


class _SsmlWalker:
    def __init__(self, limits: SsmlLimits) -> None:
        self.limits = limits
        self.segments: list[Segment] = []
        self._text: list[str] = []
        self._rate = 1.0
        self._depth = 0

    def _flush_text(self) -> None:
        text = normalise_whitespace("".join(self._text))
        self._text = []
        if text:
            self.segments.append(Speech(text, self._rate))

    def _pause(self, seconds: float) -> None:
        self._flush_text()
        if seconds > 0:
            self.segments.append(Pause(seconds))

    def walk(self, element: Element) -> None:
        self._depth += 1
        try:
            if self._depth > self.limits.max_depth:
                raise ServiceError(
                    400, "invalid_ssml", f"SSML may nest elements at most {self.limits.max_depth} deep."
                )
            self._walk(element)
        finally:
            self._depth -= 1

    def _walk(self, element: Element) -> None:
        name = _local_name(element.tag)
        if name == "break":
            strength = element.get("strength", "medium")
            self._pause(
                _parse_duration(element.get("time", ""), self.limits.max_break_seconds)
                if element.get("time")
                else _BREAK_STRENGTHS.get(strength, 0.4)
            )
        elif name == "sub":
            self._text.append(element.get("alias", element.text or ""))
        elif name == "prosody" and element.get("rate"):
            self._flush_text()
            # Held to the range at every level, so that the product stays a number.
            outer = self._rate
            self._rate = effective_rate(outer, _parse_rate(element.get("rate", "")))
            self._children(element)
            self._flush_text()
            self._rate = outer
        elif name in {"p", "s"}:
            self._flush_text()
            self._children(element)
            self._flush_text()
        else:  # <speak> and any unsupported tag: keep the text
            self._children(element)
        if element.tail:
            self._text.append(element.tail)

    def _children(self, element: Element) -> None:
        if element.text:
            self._text.append(element.text)
        for child in element:
            self.walk(child)

    def finish(self) -> list[Segment]:
        self._flush_text()
        return self.segments


def parse_ssml(document: str, limits: SsmlLimits) -> list[Segment]:
    try:
        root = SafeET.fromstring(document)
    except DefusedXmlException:
        raise ServiceError(400, "invalid_ssml", "SSML may not declare entities or DTDs.") from None
    except SafeET.ParseError as exc:
        raise ServiceError(400, "invalid_ssml", f"The SSML is not well-formed XML: {exc}.") from None
    if _local_name(root.tag) != "speak":
        raise ServiceError(400, "invalid_ssml", "SSML must have <speak> as its root element.")
    walker = _SsmlWalker(limits)
    walker.walk(root)
    return walker.finish()


def with_quick_opening(segments: list[Segment], words: int) -> list[Segment]:
    """The first speech cut after its first `words` words, so that first audio costs the
    engine a fraction of a second even under load; left whole when its first clause is
    hardly longer (fewer than MIN_WORDS_AFTER_CUT words would follow) or `words` is 0.
    The cut is marked (Speech.continues) for the engine to join the halves smoothly."""
    for index, segment in enumerate(segments):
        if not isinstance(segment, Speech):
            continue  # a break before any speech: the first chunk is the first speech after it
        parts = segment.text.split(" ")
        if words <= 0 or len(parts) < words + MIN_WORDS_AFTER_CUT:
            return segments
        head, tail = " ".join(parts[:words]), " ".join(parts[words:])
        if not (is_speakable(head) and is_speakable(tail)):
            return segments
        cut = [Speech(head, segment.rate, continues=True), Speech(tail, segment.rate, segment.continues)]
        return [*segments[:index], *cut, *segments[index + 1 :]]
    return segments


def is_ssml_document(text: str) -> bool:
    """Whether a whole text is markup. One that opens like `<speaking>` is too (refused,
    not read aloud); in a stream only a real opening starts a document ("the <speaker> icon"
    is text)."""
    stripped = text.strip()
    return SSML_START.match(stripped) is not None or stripped[:6].lower() == "<speak"


def prepare_text(
    raw: str,
    *,
    max_chars: int,
    ssml: SsmlLimits = DEFAULT_SSML_LIMITS,
    first_chunk_words: int = 0,
) -> list[Segment]:
    """Validate and split a request's text; raises ServiceError with a stable code.
    With `first_chunk_words`, the first chunk is at most that many words (with_quick_opening)."""
    if len(raw) > max_chars:
        raise ServiceError(
            413,
            "text_too_long",
            f"The text has {len(raw)} characters; the limit is {max_chars}.",
            details={"limit": max_chars},
        )
    text = strip_control_characters(raw)
    if not text.strip():
        raise ServiceError(400, "empty_text", "The text is empty.")
    stripped = text.strip()
    parsed = parse_ssml(stripped, ssml) if is_ssml_document(text) else [Speech(normalise_whitespace(text))]
    segments: list[Segment] = []
    for segment in parsed:
        if isinstance(segment, Speech):
            # A piece of only punctuation ("...", "!!!" between breaks) is not sent to the engine.
            # A piece cut off mid-phrase (a long run without marks) is joined to the next one.
            pieces = [piece for piece in split_for_streaming(segment.text) if is_speakable(piece)]
            segments.extend(
                Speech(piece, segment.rate, continues=index < len(pieces) - 1 and not ends_a_phrase(piece))
                for index, piece in enumerate(pieces)
            )
        else:
            segments.append(segment)
    if not any(isinstance(segment, Speech) for segment in segments):
        raise ServiceError(
            400, "empty_text", "The text has nothing to say: it needs at least one letter or digit."
        )
    return with_quick_opening(segments, first_chunk_words)
