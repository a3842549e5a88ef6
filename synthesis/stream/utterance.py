"""One utterance of a stream: its text arrives in pieces, each spoken as soon as it is
ready; its audio, through one encoder, is one continuous stream of labelled frames (or
Twilio messages). Whatever fails, the utterance ends through its owner with one outcome.

An utterance is a request of its own, with one request's limits: its text (MAX_TEXT_CHARS),
its SSML breaks and its estimated audio (an OutputBudget, spent as each piece becomes
ready, so that the piece that overdraws is refused before its audio is made), and the
audio actually made (encoded_audio, over the utterance's one encoder)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from django.conf import settings

from core.errors import ServiceError
from engines import EngineSlot
from engines.text import Segment
from synthesis.admission import service_error_for
from synthesis.audio import AudioEncoder
from synthesis.services import SynthesisSetup, encoded_audio, output_budget, text_segments
from synthesis.stream.flow import TransportFlow
from synthesis.stream.protocol import ProtocolError, frame_pieces, labelled_frame, ready_pieces
from synthesis.stream.twilio import TWILIO, TwilioFramer
from usage.quotas import quota_estimate
from usage.recorder import UsageMeter

logger = logging.getLogger(__name__)


class UtteranceOwner(Protocol):
    """What an utterance needs of its connection: the socket, and where its outcome goes."""

    flow: TransportFlow

    async def send(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None: ...

    async def send_event(self, kind: str, context_id: str | None, **fields: Any) -> None: ...

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
    ) -> None:
        self.owner = owner
        self.context_id = context_id
        self.setup = setup
        self.meter = meter
        self.twilio = twilio
        self.buffer = ""
        self.chars = 0
        self.ended = False
        self.encoder = AudioEncoder(setup.spec, setup.engine.sample_rate, streaming=True)
        self.budget = output_budget(setup.speed)
        self.pieces: asyncio.Queue[list[Segment] | None] = asyncio.Queue()
        self.started_audio = False
        self.opened = False  # a piece has been segmented (only the first gets a quick opening)
        # The utterance's hold on the engine, from its first piece to its end: its pieces
        # are one stream to keep real-time, admitted once (engines/capacity.py).
        self.slot: EngineSlot | None = None
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
        ready, self.buffer = ready_pieces(self.buffer + text, final=final)
        for piece in ready:
            if piece.strip():
                self._add_piece(piece)

    def _add_piece(self, piece: str) -> None:
        try:
            segments = text_segments(piece, opening=not self.opened)
            self.budget.spend(segments)
            if (reservation := self.meter.quota_reservation) is not None:
                reservation.grow(quota_estimate(segments, self.setup.speed))
        except ServiceError as exc:
            if exc.code == "empty_text":  # a piece of only punctuation or markup
                return
            raise ProtocolError(exc.code, exc.message, self.context_id, abort=True) from exc
        self.opened = True
        self.pieces.put_nowait(segments)

    def end(self) -> None:
        self.add_text("", final=True)
        self.ended = True
        self.pieces.put_nowait(None)

    async def _run(self) -> None:
        spoken = False
        try:
            while (segments := await self.pieces.get()) is not None:
                spoken = True
                if self.slot is None:
                    self.slot = await self.setup.engine.reserve(self.setup.owner)
                plan = self.setup.plan_segments(segments, slot=self.slot)
                # The same engine -> encoder loop as HTTP; one encoder for the whole utterance.
                audio = encoded_audio(plan, self.encoder)
                try:
                    async for data in audio:
                        await self._send_audio(data)
                finally:
                    await audio.aclose()  # type: ignore[attr-defined]
            if not spoken:
                # Every piece was only punctuation or markup (each skipped as it came): the
                # utterance as a whole had nothing to say, as an HTTP request with its text would.
                raise ServiceError(
                    400,
                    "empty_text",
                    "The utterance had nothing to say: it needs at least one letter or digit.",
                )
            await self._send_audio(self.encoder.finish(), final=True)
        except Exception as exc:
            # Whatever failed (text, engine, encoder, the transport), the utterance ends
            # here with its error event and usage row; the connection stays.
            error = service_error_for(exc, request_id=self.request_id)
            self._release_slot()
            await self.owner.utterance_failed(self, error.status_code, error.code, error.message)
        else:
            self._release_slot()
            await self.owner.utterance_finished(self)
        finally:
            self._release_slot()  # cancelled (stop): the slot goes back all the same

    def _release_slot(self) -> None:
        if self.slot is not None:
            self.slot.release()
            self.slot = None

    async def _send_audio(self, data: bytes, *, final: bool = False) -> None:
        if not data and not (final and self.twilio is not None):
            return
        # A slow reader: wait here, so the engine (whose queue is bounded) waits too.
        await self.owner.flow.writable()
        if not self.started_audio and data:
            self.started_audio = True
            await self.owner.send_event(
                "audio_start",
                self.context_id,
                request_id=self.request_id,
                format=TWILIO if self.twilio else self.setup.spec.format.value,
                sample_rate=self.setup.spec.sample_rate,
            )
        # An engine chunk can be larger than the server sends in one message: cut it.
        pieces = list(frame_pieces(data)) or [b""]
        for index, piece in enumerate(pieces):
            if self.twilio is not None:
                message = self.twilio.media(piece, final=final and index == len(pieces) - 1)
                if message is not None:
                    await self.owner.send(text_data=message)
            else:
                await self.owner.send(bytes_data=labelled_frame(self.context_id, piece))
            self.meter.audio_sent(len(piece), self.encoder.duration_s)

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
