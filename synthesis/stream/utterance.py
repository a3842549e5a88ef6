"""One utterance of a stream: its text arrives in pieces, each spoken as soon as it is
ready; its audio, through one encoder, is one continuous stream, which its owner (the
connection, in its dialect: labelled frames, Twilio messages, ElevenLabs' or Cartesia's
JSON) sends on, with character timings when asked (engines.alignment). Whatever fails, the
utterance ends through its owner with one outcome.

An utterance is a request of its own, with one request's limits: its text (MAX_TEXT_CHARS),
its SSML breaks and its estimated audio (an OutputBudget, spent as each piece becomes
ready, so that the piece that overdraws is refused before its audio is made), the audio
actually made (encoded_audio, over the utterance's one encoder), and the tenant's monthly
quota: each piece's estimated audio is added to the utterance's reservation, checked
against everything the tenant holds on every process, just before that piece is spoken
(usage.quotas.quota_extend). So an utterance fed text past the quota ends there with
quota_exceeded, and all of a tenant's utterances together overshoot by at most one piece."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from django.conf import settings

from core.errors import ServiceError
from engines import EngineSlot
from engines.alignment import CharTimeline, CharTimings, chunks_are_sentences, sentences, spoken_text
from engines.text import Segment
from synthesis.admission import service_error_for
from synthesis.audio import AudioEncoder
from synthesis.services import AudioPart, SynthesisSetup, encoded_audio, output_budget, text_segments
from synthesis.stream.flow import TransportFlow
from synthesis.stream.protocol import ProtocolError, SocketClosed, ready_pieces
from synthesis.stream.twilio import TwilioFramer
from usage.quotas import quota_estimate, quota_extend
from usage.recorder import CLIENT_DISCONNECTED, UsageMeter

logger = logging.getLogger(__name__)


class UtteranceOwner(Protocol):
    """What an utterance needs of its connection: the socket's flow, where its audio goes
    (in the connection's dialect), and where its outcome goes."""

    flow: TransportFlow

    async def send_audio(
        self, utterance: Utterance, data: bytes, timings: CharTimings | None, *, final: bool
    ) -> None: ...

    async def utterance_finished(self, utterance: Utterance) -> None: ...

    async def utterance_failed(self, utterance: Utterance, status: int, code: str, message: str) -> None: ...


class Utterance:
    """One context: its text arrives in pieces; its audio is one continuous stream."""

    def __init__(
        self,
        owner: UtteranceOwner,
        context_id: str,
        setup: SynthesisSetup,
        meter: UsageMeter,
        twilio: TwilioFramer | None,
        *,
        eager: bool = False,
        timings: bool = False,
    ) -> None:
        self.owner = owner
        self.context_id = context_id
        self.setup = setup
        self.meter = meter
        self.twilio = twilio
        self.buffer = ""
        self.chars = 0
        self.ended = False
        self.finished = False  # ended with all its audio sent (not failed, not cancelled)
        self.encoder = AudioEncoder(setup.spec, setup.engine.sample_rate, streaming=True)
        self.budget = output_budget(setup.speed)
        # Each piece: its text (for character timings) and its segments.
        self.pieces: asyncio.Queue[tuple[str, list[Segment]] | None] = asyncio.Queue()
        self.started_audio = False  # the owner's: whether it has announced this audio
        self.opened = False  # a piece has been segmented (only the first gets a quick opening)
        # The utterance's hold on the engine, from its first piece to its end: its pieces
        # are one stream to keep real-time, admitted once (engines/capacity.py).
        self.slot: EngineSlot | None = None
        self.eager = eager
        self.queued = 0  # pieces of text queued for the engine so far
        self.timeline = (
            CharTimeline(whole_pieces=chunks_are_sentences(setup.engine.name), speed=setup.speed)
            if timings
            else None
        )
        # Seconds of audio sent so far (the encoder's clock at the end of the last chunk sent).
        self.sent_until_s = 0.0
        self.chunk_start_s = 0.0  # where the audio being sent starts on that clock
        self.task = asyncio.create_task(self._run(), name=f"utterance {context_id}")

    @property
    def request_id(self) -> str:
        return self.meter.request_id

    def add_text(self, text: str, *, final: bool = False) -> None:
        self.chars += len(text)
        self.meter.input_chars = self.chars
        if self.chars > settings.MAX_TEXT_CHARS:
            raise ProtocolError(
                "text_too_long",
                f"An utterance holds at most {settings.MAX_TEXT_CHARS} characters; this one is cancelled.",
                self.context_id,
                abort=True,
            )
        ready, self.buffer = ready_pieces(
            self.buffer + text, final=final, eager=self._sentence_complete(text)
        )
        for chunk in ready:
            if not chunk.strip():
                continue
            # With timings from an engine that renders whole sentences, each sentence is its
            # own piece, so that each piece's audio is one chunk (engines.alignment). Markup
            # (an SSML document, a piece of its own) stays whole.
            split = self.timeline is not None and self.timeline.whole_pieces and "<" not in chunk
            for piece in sentences(chunk) if split else [chunk]:
                self._queue(piece)

    def _sentence_complete(self, text: str) -> bool:
        """Eager mode: a message that ends a sentence is spoken without waiting for more."""
        return self.eager and text.rstrip()[-1:] in (".", "!", "?", "\u2026", "\u3002", "\uff01", "\uff1f")

    def _queue(self, piece: str) -> None:
        if not piece.strip():
            return
        try:
            segments = text_segments(piece, opening=not self.opened)
            self.budget.spend(segments)
        except ServiceError as exc:
            if exc.code == "empty_text":  # a piece of only punctuation or markup
                return
            raise ProtocolError(exc.code, exc.message, self.context_id, abort=True) from exc
        self.opened = True
        self.queued += 1
        self.pieces.put_nowait((piece, segments))

    def end(self) -> None:
        self.add_text("", final=True)
        self.ended = True
        self.pieces.put_nowait(None)

    async def _run(self) -> None:
        spoken = False
        try:
            while (piece := await self._next_piece()) is not None:
                spoken = True
                text, segments = piece
                # Its audio reserved against the quota before it is made (and before it
                # takes an engine slot): past the quota the utterance ends here, with
                # quota_exceeded, having sent the pieces before it.
                if (reservation := self.meter.quota_reservation) is not None:
                    await quota_extend(reservation, quota_estimate(segments, self.setup.speed))
                if self.slot is None:
                    self.slot = await self.setup.engine.reserve(self.setup.owner)
                plan = self.setup.plan_segments(segments, slot=self.slot)
                if self.timeline is not None:
                    self.timeline.begin(spoken_text(text, segments), self.sent_until_s)
                # The same engine -> encoder loop as HTTP; one encoder for the whole utterance.
                audio = encoded_audio(plan, self.encoder)
                try:
                    async for part in audio:
                        await self._send_part(part)
                finally:
                    await audio.aclose()  # type: ignore[attr-defined]
                if self.timeline is not None and (rest := self.timeline.finish(self.sent_until_s)):
                    await self._send_audio(b"", rest)
            if not spoken:
                # Every piece was only punctuation or markup (each skipped as it came): the
                # utterance as a whole had nothing to say, as an HTTP request with its text would.
                raise ServiceError(
                    400,
                    "empty_text",
                    "The utterance had nothing to say: it needs at least one letter or digit.",
                )
            await self._send_audio(self.encoder.finish(), final=True)
        except SocketClosed:
            # The client has gone: the utterance ends as a disconnect does (no one to tell).
            self._release_slot()
            await self.owner.utterance_failed(self, 200, CLIENT_DISCONNECTED, "The client disconnected.")
        except Exception as exc:
            # Whatever failed (text, engine, encoder), the utterance ends here with its
            # error event and usage row; the connection stays.
            error = service_error_for(exc, request_id=self.request_id)
            self._release_slot()
            await self.owner.utterance_failed(self, error.status_code, error.code, error.message)
        else:
            self._release_slot()
            await self.owner.utterance_finished(self)
        finally:
            self._release_slot()  # cancelled (stop): the slot goes back all the same

    async def _next_piece(self) -> tuple[str, list[Segment]] | None:
        """The next piece of text to speak (None: the end). While none comes for
        WS_UTTERANCE_IDLE_SLOT_SECONDS, the engine slot goes back: `_speak` takes one again
        for the next piece (which may then wait or be refused, as a new stream would)."""
        if self.slot is None or not self.pieces.empty():
            return await self.pieces.get()
        try:
            async with asyncio.timeout(settings.WS_UTTERANCE_IDLE_SLOT_SECONDS):
                return await self.pieces.get()
        except TimeoutError:
            self._release_slot()
            return await self.pieces.get()

    def _release_slot(self) -> None:
        if self.slot is not None:
            self.slot.release()
            self.slot = None

    async def _send_part(self, part: AudioPart) -> None:
        """One engine chunk's audio, with the characters it speaks (from the words the chunk
        carries, even when the encoder held all of its audio back)."""
        timings = None
        if self.timeline is not None:
            timings = self.timeline.advance(part.end_s, part.words, part.text)
        await self._send_audio(part.data, timings)

    async def _send_audio(
        self, data: bytes, timings: CharTimings | None = None, *, final: bool = False
    ) -> None:
        if not data and not timings and not (final and self.twilio is not None):
            return
        # A slow reader: wait here, so the engine (whose queue is bounded) waits too.
        await self.owner.flow.writable()
        self.chunk_start_s = self.sent_until_s
        if data:
            self.sent_until_s = self.encoder.duration_s
        await self.owner.send_audio(self, data, timings, final=final)
        self.meter.audio_sent(len(data), self.encoder.duration_s)

    async def stop(self) -> None:
        """Stop generating and sending: when this returns, no more audio of it goes out.
        Never raises: whatever the task ended with has been reported by the task."""
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("Utterance %s ended with an error while stopping", self.request_id)
