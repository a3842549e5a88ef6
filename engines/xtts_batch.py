"""The XTTS step loop: every running request advances one audio token per step, together.

One worker thread owns the model. Each step it:

1. drops the requests whose consumer went away (their KV-cache slot is freed)
   and runs any one-off calls (voice conditioning);
2. picks at most `max_batch` requests to run: those whose buffer has room (a
   slow consumer's request sits out until it reads; the others go on), a
   request that has not delivered its first chunk first (by arrival), then the
   smallest playback deadline (when its first chunk was delivered plus the
   seconds of audio delivered since: the caller nearest to running dry);
3. starts the requests that have no segment under way: a pause becomes silence,
   a text segment is prefilled (its own conditioning prefix into its own cache
   slot; the segments starting in one step in one padded batch, or each alone in
   exact mode), which gives its first token;
4. advances all the others by one token in one batched GPT step
   (engines/xtts_gpt.py): each row with its own cache, length and position;
5. turns every `stream_chunk_size` tokens (and a segment's end) into audio the
   way coqui's `inference_stream` does: the vocoder (HiFi-GAN) re-decodes the
   segment's latents so far and the new part is cross-faded onto the last
   (`Xtts.handle_chunks`). Requests whose latents have the same length are
   decoded in one vocoder call; in exact mode (greedy decoding) each request is
   decoded alone, because a batched transposed convolution rounds differently
   from a single one on the CPU (measured), and exactness is that mode's point.

A request joins and leaves only at step boundaries. An exception in a request's
own work (its text, its prefill, its vocoder call) fails that request alone; if a
batched step fails, its rows are retried one by one so that only the failing one
fails. Chunks travel to the event loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from engines.base import SpeechJob, silence_chunk
from engines.capacity import ThroughputMeter
from engines.errors import EngineFailure, EngineOverloaded
from engines.scheduler import DONE, ChunkStream
from engines.text import MAX_SEGMENT_CHARS, Pause, Segment, bounded_speech
from engines.xtts_gpt import Row, XttsStepModel

logger = logging.getLogger(__name__)
T = TypeVar("T")
# coqui's `inference_stream` default: samples cross-faded between consecutive chunks.
OVERLAP_SAMPLES = 1024


@dataclass
class _Decoding:
    """One text segment under way: its cache slot, tokens, latents and the audio sent so far."""

    slot: int
    length: int  # positions in its cache
    length_scale: float
    tokens: list[int] = field(default_factory=list)
    latents: list[Any] = field(default_factory=list)
    pending: int = 0  # tokens not yet turned into audio
    finished: bool = False
    wav_prev: Any = None
    wav_overlap: Any = None
    decoded: tuple[int, Any] | None = None  # (latent count, waveform) of its last vocoder call


class BatchedStream(ChunkStream):
    """One request in the step loop; its consumer iterates `chunks()` on the event loop."""

    def __init__(
        self,
        batcher: XttsBatcher,
        job: SpeechJob,
        conditioning: tuple[Any, Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(batcher, loop, next(batcher._arrivals))
        self.job = job
        self.segments: deque[Segment] = deque(job.segments)
        self.gpt_cond_latent, self.speaker_embedding = conditioning
        self.decoding: _Decoding | None = None


@dataclass
class _Call:
    function: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


class XttsBatcher:
    """Owns the model's thread; `submit` requests and `run` one-off calls from the event loop."""

    def __init__(
        self,
        model: Any,
        step_model: XttsStepModel,
        *,
        sample_rate: int,
        max_batch: int,
        max_streams: int,
        stream_chunk_size: int,
        max_audio_tokens: int | None,
        max_buffered: int = 4,
        meter: ThroughputMeter | None = None,
        on_step: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self._on_step = on_step  # after each step: admission may grant a waiter now
        # The engine's capacity (engines/capacity.py): each step's wall time against the audio
        # it made. Most steps make none (audio comes every `stream_chunk_size` tokens), so their
        # time is carried to the next step that does.
        self._meter = meter
        self._unmetered_seconds = 0.0
        self._step_audio_seconds = 0.0
        self.step_model = step_model
        self.sample_rate = sample_rate
        self.max_batch = max_batch
        self.max_streams = max_streams
        self.stream_chunk_size = stream_chunk_size
        self.max_new_tokens = min(max_audio_tokens or step_model.max_new_tokens, step_model.max_new_tokens)
        self.max_buffered = max_buffered
        self.batched_vocoder = not step_model.exact
        # Counters (read by benchmarks and health): tokens decoded, batched steps, rows in them.
        self.tokens_generated = 0
        self.decode_steps = 0
        self.decode_rows = 0
        self.largest_batch = 0
        self.decode_seconds = 0.0  # time in batched GPT steps (the vocoder and prefills apart)
        self._streams: list[BatchedStream] = []
        self._calls: list[_Call] = []
        self._condition = threading.Condition()
        self._arrivals = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="xtts-batcher", daemon=True)
        self._thread.start()

    @property
    def active_jobs(self) -> int:
        return len(self._streams)

    def submit(self, job: SpeechJob, conditioning: tuple[Any, Any]) -> BatchedStream:
        """Queue a request; raises EngineOverloaded past the backstop. Call on the event loop."""
        stream = BatchedStream(self, job, conditioning, asyncio.get_running_loop())
        with self._condition:
            if len(self._streams) >= self.max_streams:
                raise EngineOverloaded(retry_after_s=max(1, len(self._streams) // 4))
            self._streams.append(stream)
            self._condition.notify()
        return stream

    async def run(self, function: Callable[[], T]) -> T:
        """Run one call on the model's thread, between two steps."""
        loop = asyncio.get_running_loop()
        call = _Call(function, loop, loop.create_future())
        with self._condition:
            self._calls.append(call)
            self._condition.notify()
        return await call.future  # type: ignore[no-any-return]

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout=10)

    # --- event-loop side -------------------------------------------------------------

    def _cancel(self, stream: BatchedStream) -> None:
        with self._condition:
            stream.cancelled = True
            self._condition.notify()

    def _taken(self, stream: BatchedStream) -> None:
        with self._condition:
            stream.buffered -= 1
            if stream.buffered == self.max_buffered - 1:
                self._condition.notify()

    # --- the model's thread ----------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._condition:
                    while True:
                        if self._stopping:
                            return
                        for stream in [stream for stream in self._streams if stream.cancelled]:
                            self._remove(stream)
                        calls, self._calls = self._calls, []
                        chosen = self._choose()
                        if calls or chosen:
                            break
                        self._condition.wait()
                for call in calls:
                    self._call(call)
                if chosen:
                    self._step(chosen)

    def _choose(self) -> list[BatchedStream]:
        """Who runs this step. Called with the lock held."""
        runnable = [stream for stream in self._streams if stream.buffered < self.max_buffered]
        return sorted(runnable, key=BatchedStream.priority)[: self.max_batch]

    def _remove(self, stream: BatchedStream) -> None:
        """Drop a request and free its cache slot. Called with the lock held."""
        if stream in self._streams:
            self._streams.remove(stream)
        if stream.decoding is not None:
            self.step_model.pool.release(stream.decoding.slot)
            stream.decoding = None

    def _call(self, call: _Call) -> None:
        def settle(future: asyncio.Future[Any], outcome: Any, failed: bool) -> None:
            if future.cancelled():
                return
            if failed:
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        try:
            outcome, failed = call.function(), False
        except Exception as exc:
            logger.exception("A call on the XTTS thread failed")
            outcome, failed = exc, True
        with contextlib.suppress(RuntimeError):  # RuntimeError: the caller's loop is gone
            call.loop.call_soon_threadsafe(settle, call.future, outcome, failed)

    def _step(self, chosen: list[BatchedStream]) -> None:
        started = time.perf_counter()
        self._step_audio_seconds = 0.0
        self._advance_batch(chosen)
        self._unmetered_seconds += time.perf_counter() - started
        if self._meter is not None and self._step_audio_seconds > 0:
            self._meter.observe(self._unmetered_seconds, self._step_audio_seconds)
            self._unmetered_seconds = 0.0
        if self._on_step is not None:
            self._on_step()

    def _advance_batch(self, chosen: list[BatchedStream]) -> None:
        emissions: list[tuple[BatchedStream, bool]] = []
        running: list[BatchedStream] = []
        starting: list[tuple[BatchedStream, Any]] = []
        for stream in chosen:
            if stream.decoding is not None:
                running.append(stream)
                continue
            try:
                prefix = self._start_next_segment(stream)
            except Exception as exc:
                self._fail(stream, exc)
                continue
            if prefix is not None:
                starting.append((stream, prefix))
        if starting:
            self._prefill(starting, emissions)
        if running:
            self._decode(running, emissions)
        self._emit(emissions)

    def _start_next_segment(self, stream: BatchedStream) -> Any:
        """Deliver pauses up to the next text segment; its prefix, with a cache slot taken for it.

        None when the request has no segment left (it is finished).
        """
        while stream.segments:
            segment = stream.segments.popleft()
            if isinstance(segment, Pause):
                self._deliver_audio(stream, silence_chunk(segment.seconds, self.sample_rate), computed=False)
                continue
            model, step = self.model, self.step_model
            language = stream.job.language.split("-")[0]
            # One segment is one GPT pass, bounded by the model's text and audio tokens: a longer
            # one is cut (at its language's character limit, coqui's own, then in halves while
            # its tokens are too many) and its runs spoken in turn.
            limit = model.tokenizer.char_limits.get(language, MAX_SEGMENT_CHARS)
            if len(segment.text) > limit and len(runs := bounded_speech(segment, limit)) > 1:
                stream.segments.extendleft(reversed(runs))
                continue
            tokens = model.tokenizer.encode(segment.text.strip().lower(), lang=language)
            if len(tokens) >= model.args.gpt_max_text_tokens:
                runs = bounded_speech(segment, max(len(segment.text) // 2, 1))
                if len(runs) > 1:
                    stream.segments.extendleft(reversed(runs))
                    continue
                raise EngineFailure(f"A text segment is too long for XTTS ({len(tokens)} tokens).")
            text_tokens = torch.tensor([tokens], dtype=torch.int32, device=step.device)
            prefix = step.prefix(stream.gpt_cond_latent.to(step.device), text_tokens)
            positions = prefix.shape[1]
            stream.decoding = _Decoding(
                slot=step.pool.acquire(positions + self.max_new_tokens + 1),
                length=positions,
                length_scale=1.0 / max(stream.job.rate_of(segment), 0.05),
            )
            return prefix
        self._finish(stream, DONE)
        return None

    def _prefill(
        self, starting: list[tuple[BatchedStream, Any]], emissions: list[tuple[BatchedStream, bool]]
    ) -> None:
        """Run the new segments' prefixes (together where the step model may); their first tokens."""
        step = self.step_model
        try:
            items = []
            for stream, prefix in starting:
                assert stream.decoding is not None
                items.append((stream.decoding.slot, prefix))
            latents, logits = step.prefill(items)
            rows = [self._row(stream.decoding) for stream, _prefix in starting if stream.decoding]
            tokens = step.next_tokens(rows, logits)
        except Exception as exc:
            if len(starting) == 1:
                self._fail(starting[0][0], exc)
                return
            logger.warning("A batched XTTS prefill failed (%s); retrying one by one", exc)
            for item in starting:
                self._prefill([item], emissions)
            return
        for index, (stream, _prefix) in enumerate(starting):
            self._advance(stream, tokens[index], latents[index], emissions)

    def _row(self, decoding: _Decoding) -> Row:
        return Row(
            slot=decoding.slot,
            length=decoding.length,
            token=decoding.tokens[-1] if decoding.tokens else -1,
            audio_index=len(decoding.tokens),
        )

    def _decode(self, streams: list[BatchedStream], emissions: list[tuple[BatchedStream, bool]]) -> None:
        rows = []
        for stream in streams:
            assert stream.decoding is not None
            rows.append(self._row(stream.decoding))
        started = time.perf_counter()
        try:
            latents, logits = self.step_model.decode(rows)
            tokens = self.step_model.next_tokens(rows, logits)
        except Exception as exc:
            if len(streams) == 1:
                self._fail(streams[0], exc)
                return
            logger.warning("A batched XTTS step failed (%s); retrying its %d rows one by one", exc, len(rows))
            for stream in streams:
                self._decode([stream], emissions)
            return
        self.decode_seconds += time.perf_counter() - started
        self.decode_steps += 1
        self.decode_rows += len(rows)
        self.largest_batch = max(self.largest_batch, len(rows))
        for index, stream in enumerate(streams):
            assert stream.decoding is not None
            stream.decoding.length += 1
            self._advance(stream, tokens[index], latents[index], emissions)

    def _advance(
        self, stream: BatchedStream, token: int, latent: Any, emissions: list[tuple[BatchedStream, bool]]
    ) -> None:
        """Record one generated token and its latent, and when audio is due, as coqui's stream does."""
        decoding = stream.decoding
        assert decoding is not None
        self.tokens_generated += 1
        decoding.tokens.append(token)
        decoding.latents.append(latent)
        decoding.pending += 1
        decoding.finished = token == self.step_model.stop_token or len(decoding.tokens) >= self.max_new_tokens
        if decoding.pending >= self.stream_chunk_size:
            emissions.append((stream, False))
            decoding.pending = 0
        if decoding.finished:
            emissions.append((stream, True))

    def _emit(self, emissions: list[tuple[BatchedStream, bool]]) -> None:
        """Vocode what is due (several requests per call where allowed) and deliver the chunks."""
        due: dict[int, BatchedStream] = {}
        for stream, _final in emissions:
            decoding = stream.decoding
            if decoding is not None and (
                decoding.decoded is None or decoding.decoded[0] != len(decoding.latents)
            ):
                due[id(stream)] = stream
        self._vocode(list(due.values()))
        for stream, final in emissions:
            decoding = stream.decoding
            if decoding is None or decoding.decoded is None:
                continue  # failed in the vocoder
            try:
                chunk, decoding.wav_prev, decoding.wav_overlap = self.model.handle_chunks(
                    decoding.decoded[1].clone(),
                    decoding.wav_prev,
                    decoding.wav_overlap,
                    OVERLAP_SAMPLES,
                    is_final=final,
                )
                audio = chunk.detach().float().cpu().numpy().astype(np.float32)
            except Exception as exc:
                self._fail(stream, exc)
                continue
            self._deliver_audio(stream, audio)
            if final:
                with self._condition:
                    self.step_model.pool.release(decoding.slot)
                    stream.decoding = None
                if not stream.segments:
                    self._finish(stream, DONE)

    def _vocode(self, streams: Sequence[BatchedStream]) -> None:
        inputs: dict[int, Any] = {}
        for stream in streams:
            decoding = stream.decoding
            assert decoding is not None
            latents = torch.stack(decoding.latents)[None].float()  # [1, n, d]
            if decoding.length_scale != 1.0:
                latents = F.interpolate(
                    latents.transpose(1, 2), scale_factor=decoding.length_scale, mode="linear"
                ).transpose(1, 2)
            inputs[id(stream)] = latents
        groups: dict[int, list[BatchedStream]] = {}
        for stream in streams:
            # Same length, same call: no padding, so each row's audio is its own.
            key = inputs[id(stream)].shape[1] if self.batched_vocoder else id(stream)
            groups.setdefault(key, []).append(stream)
        for group in groups.values():
            try:
                self._vocode_group(group, inputs)
            except Exception as exc:
                if len(group) == 1:
                    self._fail(group[0], exc)
                    continue
                logger.warning("A batched vocoder call failed (%s); retrying one by one", exc)
                for stream in group:
                    try:
                        self._vocode_group([stream], inputs)
                    except Exception as single:
                        self._fail(stream, single)

    def _vocode_group(self, group: list[BatchedStream], inputs: dict[int, Any]) -> None:
        device = self.step_model.device
        latents = torch.cat([inputs[id(stream)] for stream in group]).to(device)
        speakers = torch.cat([stream.speaker_embedding.to(device) for stream in group])
        waves = self.model.hifigan_decoder(latents, g=speakers)  # [G, 1, samples]
        for stream, wave in zip(group, waves, strict=True):
            assert stream.decoding is not None
            stream.decoding.decoded = (len(stream.decoding.latents), wave.squeeze())

    def _deliver_audio(self, stream: BatchedStream, audio: np.ndarray, *, computed: bool = True) -> None:
        stream.delivered(len(audio) / self.sample_rate)
        if computed:  # a break's silence costs nothing: metered, it would inflate capacity
            self._step_audio_seconds += len(audio) / self.sample_rate
        self._deliver(stream, audio)

    def _deliver(self, stream: BatchedStream, item: Any) -> None:
        with self._condition:
            stream.buffered += 1
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is gone
            self._cancel(stream)

    def _fail(self, stream: BatchedStream, exc: BaseException) -> None:
        logger.error("An XTTS request failed: %s", exc, exc_info=exc)
        self._finish(stream, exc)

    def _finish(self, stream: BatchedStream, final: Any) -> None:
        with self._condition:
            self._remove(stream)
        self._deliver(stream, final)
