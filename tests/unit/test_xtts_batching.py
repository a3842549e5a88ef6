"""Batched XTTS decoding (engines/xtts_batch.py, engines/xtts_gpt.py) on the tiny random checkpoint."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from engines import EngineFailure, SpeechJob
from engines.base import AudioChunk
from engines.text import Pause, Speech
from engines.xtts import XttsEngine
from engines.xtts_batch import BatchedStream, XttsBatcher
from engines.xtts_gpt import KvPool, Sampling, XttsStepModel
from tests.support.waiting import async_wait_until
from tests.support.xtts import loaded_tiny_xtts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Mixed lengths: prefixes (text tokens) from 2 to 20-odd, one to three segments, a pause.
SCRIPTS: list[list[Speech | Pause]] = [
    [Speech("Hi.")],
    [Speech("Caller number one wants to talk about something much longer than that.")],
    [Speech("A medium sentence."), Speech("And a second one, a little longer.")],
    [Speech("Yes"), Pause(0.2), Speech("No.")],
    [Speech("Another caller with a question about the bill.")],
    [Speech("Okay then."), Speech("Bye."), Speech("See you.")],
]


@pytest.fixture(scope="module")
def engine(xtts_checkpoint: Path) -> Iterator[XttsEngine]:
    with loaded_tiny_xtts(xtts_checkpoint, max_active_jobs=24, max_batch=8) as engine:
        yield engine


def job_for(engine: XttsEngine, index: int) -> SpeechJob:
    voices = engine.builtin_voices()
    speed = 1.25 if index == 4 else 1.0  # one request with its latents stretched for the vocoder
    return SpeechJob(segments=SCRIPTS[index % len(SCRIPTS)], voice=voices[index % len(voices)], speed=speed)


async def collect(stream: AsyncIterator[AudioChunk]) -> np.ndarray:
    return np.concatenate([chunk.samples async for chunk in stream])


async def alone(engine: XttsEngine, count: int) -> list[np.ndarray]:
    return [await collect(engine.stream(job_for(engine, index))) for index in range(count)]


def assert_same_audio(got: list[np.ndarray], expected: list[np.ndarray]) -> None:
    for index, (audio, reference) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_array_equal(audio, reference, err_msg=f"request {index} differs")


async def test_greedy_audio_is_exactly_the_same_batched_as_alone(engine: XttsEngine) -> None:
    expected = await alone(engine, len(SCRIPTS))
    assert len({audio.tobytes() for audio in expected}) == len(SCRIPTS)  # a mix-up would show
    batcher = engine.scheduler
    largest_before = batcher.largest_batch
    together = await asyncio.gather(
        *(collect(engine.stream(job_for(engine, index))) for index in range(len(SCRIPTS)))
    )
    assert_same_audio(list(together), expected)
    assert batcher.largest_batch >= 4 > largest_before  # they really were decoded together


async def test_requests_that_join_and_leave_mid_stream_keep_their_exact_audio(engine: XttsEngine) -> None:
    expected = await alone(engine, len(SCRIPTS))
    results: dict[int, np.ndarray] = {}
    first_chunks: set[int] = set()

    async def run(index: int) -> None:
        chunks = []
        async for chunk in engine.stream(job_for(engine, index)):
            chunks.append(chunk.samples)
            first_chunks.add(index)
        results[index] = np.concatenate(chunks)

    early = [asyncio.create_task(run(index)) for index in (1, 2, 5)]
    await async_wait_until(lambda: len(first_chunks) >= 2, what="the early requests' first chunks")
    late = [asyncio.create_task(run(index)) for index in (0, 3, 4)]
    await asyncio.gather(*early, *late)
    assert_same_audio([results[index] for index in range(len(SCRIPTS))], expected)


async def test_greedy_audio_matches_coquis_own_stream_to_rounding(engine: XttsEngine) -> None:
    job = job_for(engine, 1)
    ours = await collect(engine.stream(job))
    gpt_cond_latent, speaker_embedding = engine._latents_for(job)
    text = job.segments[0]
    assert isinstance(text, Speech)
    with torch.inference_mode():
        reference = np.concatenate(
            [
                chunk.numpy()
                for chunk in engine._model.inference_stream(
                    text.text,
                    "en",
                    gpt_cond_latent,
                    speaker_embedding,
                    stream_chunk_size=engine.stream_chunk_size,
                    top_k=1,
                    max_new_tokens=engine.max_audio_tokens,
                )
            ]
        )
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, atol=1e-6)


async def test_a_small_batch_takes_turns_and_stays_exact(xtts_checkpoint: Path) -> None:
    with loaded_tiny_xtts(xtts_checkpoint, max_batch=2) as small:
        expected = await alone(small, 5)
        together = await asyncio.gather(*(collect(small.stream(job_for(small, index))) for index in range(5)))
        assert_same_audio(list(together), expected)
        assert small.scheduler.largest_batch == 2


def test_who_runs_first_no_first_chunk_by_arrival_then_the_nearest_playback_deadline(
    engine: XttsEngine,
) -> None:
    loop = asyncio.new_event_loop()
    try:
        streams = [BatchedStream(engine.scheduler, job_for(engine, 0), (None, None), loop) for _ in range(5)]
    finally:
        loop.close()
    streams[0].first_delivery, streams[0].audio_delivered = 100.0, 5.0  # runs dry at 105
    streams[1].first_delivery, streams[1].audio_delivered = 101.0, 1.0  # runs dry at 102
    streams[4].first_delivery, streams[4].audio_delivered = 90.0, 20.0  # runs dry at 110
    # streams 2 and 3 have no first chunk yet: they go first, the earlier arrival first.
    order = sorted(streams, key=BatchedStream.priority)
    assert [streams.index(stream) for stream in order] == [2, 3, 1, 0, 4]


async def test_a_cancelled_request_leaves_at_the_next_step_and_frees_its_cache(engine: XttsEngine) -> None:
    job = SpeechJob(segments=[Speech("A long story. " * 6)], voice=engine.default_voice())
    stream = engine.stream(job)
    await anext(stream)
    assert engine.scheduler.step_model.pool.in_use == 1
    await stream.aclose()  # type: ignore[attr-defined]
    await async_wait_until(
        lambda: engine.scheduler.active_jobs == 0 and engine.scheduler.step_model.pool.in_use == 0,
        what="the cancelled request to be dropped and its slot freed",
    )


def broken_conditioning(engine: XttsEngine, *, bad_latents: bool) -> bytes:
    gpt_cond_latent, speaker_embedding = engine._latents_for(job_for(engine, 0))
    if bad_latents:
        gpt_cond_latent = torch.zeros(1, 4, 7)  # the wrong width: its prefill fails
    else:
        speaker_embedding = torch.zeros(1, 3, 1)  # the wrong size: its vocoder call fails
    buffer = io.BytesIO()
    torch.save({"gpt_cond_latent": gpt_cond_latent, "speaker_embedding": speaker_embedding}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("bad_latents", [True, False], ids=["prefill-fails", "vocoder-fails"])
async def test_a_failing_request_fails_alone(engine: XttsEngine, bad_latents: bool) -> None:
    expected = await alone(engine, 3)
    broken = SpeechJob(
        segments=[Speech("This one breaks.")],
        conditioning=broken_conditioning(engine, bad_latents=bad_latents),
    )
    outcomes = await asyncio.gather(
        *(collect(engine.stream(job_for(engine, index))) for index in range(3)),
        collect(engine.stream(broken)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[3], EngineFailure)
    assert_same_audio(list(outcomes[:3]), expected)  # type: ignore[arg-type]
    await async_wait_until(
        lambda: engine.scheduler.step_model.pool.in_use == 0, what="every slot to be freed"
    )


async def test_a_slow_consumer_sits_out_without_stalling_the_others(xtts_checkpoint: Path) -> None:
    with loaded_tiny_xtts(xtts_checkpoint, stream_chunk_size=2, max_audio_tokens=16) as small:
        batcher = small.scheduler
        expected = await alone(small, 4)
        slow = small.stream(job_for(small, 0))
        first = (await anext(slow)).samples
        others = await asyncio.gather(
            *(collect(small.stream(job_for(small, index))) for index in range(1, 4))
        )
        assert_same_audio(list(others), expected[1:])
        (slow_stream,) = batcher._streams  # still there, its buffer full, not decoding
        assert slow_stream.buffered <= batcher.max_buffered + 1
        assert slow_stream.decoding is not None
        assert len(slow_stream.decoding.tokens) < 16  # paused part way
        rest = await collect(slow)
        np.testing.assert_array_equal(np.concatenate([first, rest]), expected[0])


async def test_fast_mode_batches_attention_and_the_vocoder_and_agrees_to_rounding(
    xtts_checkpoint: Path,
) -> None:
    with loaded_tiny_xtts(xtts_checkpoint) as small:
        expected = await alone(small, 4)
        small.scheduler.stop()
        fast = XttsBatcher(
            small._model,
            XttsStepModel(small._model.gpt, sampling=Sampling(top_k=1), exact=False),
            sample_rate=small.sample_rate,
            max_batch=8,
            max_streams=16,
            stream_chunk_size=small.stream_chunk_size,
            max_audio_tokens=small.max_audio_tokens,
        )
        small._scheduler = fast
        vocoded: list[int] = []
        vocode_group = fast._vocode_group

        def counting(group: list[BatchedStream], inputs: dict[int, object]) -> None:
            vocoded.append(len(group))
            vocode_group(group, inputs)

        fast._vocode_group = counting  # type: ignore[method-assign]
        together = await asyncio.gather(*(collect(small.stream(job_for(small, index))) for index in range(4)))
        for index, audio in enumerate(together):
            assert audio.shape == expected[index].shape
            np.testing.assert_allclose(audio, expected[index], atol=1e-5, err_msg=f"request {index}")
        assert fast.largest_batch == 4
        assert max(vocoded) > 1  # requests in step decoded by one vocoder call


def test_the_cache_pool_grows_without_losing_what_its_slots_hold() -> None:
    pool = KvPool(layers=2, heads=2, head_dim=3, vocab=5, dtype=torch.float32, device="cpu")
    first = pool.acquire(10)
    pool.keys[1][first, :, :10] = 7.0
    pool.seen[first, 4] = True
    taken = [pool.acquire(10) for _ in range(3)]  # the first four slots
    grown = pool.acquire(500)  # more slots and more room
    assert pool.slots == 8
    assert pool.capacity >= 500
    assert len({first, grown, *taken}) == 5
    assert bool((pool.keys[1][first, :, :10] == 7.0).all())
    assert bool(pool.seen[first, 4])
    pool.release(grown)
    assert pool.acquire(20) == grown
    assert pool.in_use == 5
