"""The XTTS engine on a real, randomly initialised tiny checkpoint (no GPU here)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from engines import EngineConfigurationError, EngineOverloaded, SpeechJob
from engines.text import Pause, Speech, prepare_text
from engines.xtts import XttsEngine
from tests.support.waiting import async_wait_until
from tests.support.xtts import loaded_tiny_xtts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(xtts_checkpoint: Path) -> Iterator[XttsEngine]:
    with loaded_tiny_xtts(xtts_checkpoint, max_active_jobs=24) as engine:
        yield engine


async def collect(engine: XttsEngine, job: SpeechJob) -> list[np.ndarray]:
    return [chunk.samples async for chunk in engine.stream(job)]


def job_for(engine: XttsEngine, index: int) -> SpeechJob:
    voices = engine.builtin_voices()
    return SpeechJob(
        segments=prepare_text(f"Caller number {index} wants to talk.", max_chars=5000),
        voice=voices[index % len(voices)],
        language="en",
    )


def test_engine_reports_itself_and_its_builtin_voices(engine: XttsEngine) -> None:
    info = engine.info()
    assert info["name"] == "xtts"
    assert info["device"] == "cpu"
    assert info["sample_rate"] == 24000
    assert info["loaded"] is True
    assert [voice.voice_id for voice in engine.builtin_voices()] == ["ana-florence", "claribel-dervla"]
    assert engine.model_identity.startswith("xtts:")


async def test_stream_yields_audio_chunks_and_pauses_as_silence(engine: XttsEngine) -> None:
    job = SpeechJob(segments=[Speech("Hello."), Pause(0.5), Speech("Bye.")], voice=engine.default_voice())
    chunks = await collect(engine, job)
    assert len(chunks) >= 3
    assert all(chunk.dtype == np.float32 and chunk.ndim == 1 for chunk in chunks)
    silence = [chunk for chunk in chunks if len(chunk) == 12000 and not chunk.any()]
    assert len(silence) == 1


@pytest.mark.timeout(600)
async def test_twenty_concurrent_requests_get_exactly_their_own_audio(engine: XttsEngine) -> None:
    alone = [np.concatenate(await collect(engine, job_for(engine, index))) for index in range(20)]
    together = await asyncio.gather(*(collect(engine, job_for(engine, index)) for index in range(20)))
    for index, chunks in enumerate(together):
        np.testing.assert_array_equal(
            np.concatenate(chunks), alone[index], err_msg=f"request {index} differs"
        )
    # The requests differ from each other, so a mix-up would have shown.
    assert len({audio.tobytes() for audio in alone}) > 1


@pytest.mark.timeout(300)
async def test_a_new_request_gets_its_first_chunk_before_running_ones_finish(engine: XttsEngine) -> None:
    events: list[tuple[str, float]] = []

    async def run(name: str, job: SpeechJob) -> None:
        async for _chunk in engine.stream(job):
            events.append((name, time.monotonic()))
        events.append((f"{name}:done", time.monotonic()))

    long_text = "This caller talks for a while. " * 3
    running = [
        asyncio.create_task(
            run(
                f"long{index}",
                SpeechJob(segments=prepare_text(long_text, max_chars=5000), voice=engine.default_voice()),
            )
        )
        for index in range(4)
    ]
    await async_wait_until(
        lambda: sum(1 for name, _ in events if name.startswith("long")) >= 4,
        what="the first chunk of each long request",
    )
    await run("late", job_for(engine, 1))
    await asyncio.gather(*running)
    late_first = next(at for name, at in events if name == "late")
    long_done = [at for name, at in events if name.startswith("long") and name.endswith(":done")]
    assert late_first < min(long_done)


async def test_a_cancelled_request_stops_generating(engine: XttsEngine) -> None:
    job = SpeechJob(segments=prepare_text("Long story. " * 10, max_chars=5000), voice=engine.default_voice())
    stream = engine.stream(job)
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    await async_wait_until(lambda: engine.scheduler.active_jobs == 0, what="the cancelled job to stop")


async def test_more_requests_than_the_queue_bound_are_refused(xtts_checkpoint: Path) -> None:
    with loaded_tiny_xtts(
        xtts_checkpoint, max_active_jobs=2, stream_chunk_size=2, max_audio_tokens=40
    ) as small:
        streams = [small.stream(job_for(small, index)) for index in range(2)]
        for stream in streams:
            await anext(stream)
        with pytest.raises(EngineOverloaded) as refused:
            await anext(small.stream(job_for(small, 3)))
        assert refused.value.retry_after_s >= 1
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]


async def test_conditioning_is_computed_on_the_model_thread_and_usable(engine: XttsEngine) -> None:
    rng = np.random.default_rng(1)
    reference = (0.1 * rng.standard_normal(22050 * 4)).astype(np.float32)
    conditioning = await engine.compute_conditioning(reference, 22050)
    job = SpeechJob(segments=[Speech("Cloned hello.")], conditioning=conditioning)
    assert sum(len(chunk) for chunk in await collect(engine, job)) > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"checkpoint_dir": ""}, "needs XTTS_MODEL_PATH"),
        ({"checkpoint_dir": "/nonexistent/xtts"}, "is not a directory"),
    ],
)
def test_misconfiguration_is_a_clear_error(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(EngineConfigurationError, match=message):
        XttsEngine(checkpoint_dir=kwargs["checkpoint_dir"])


def test_an_unavailable_device_is_a_clear_error_at_load(xtts_checkpoint: Path) -> None:
    engine = XttsEngine(checkpoint_dir=str(xtts_checkpoint), device="cuda:0")
    with pytest.raises(EngineConfigurationError, match="CUDA is not available"):
        engine.load()
    with pytest.raises(EngineConfigurationError, match="not a torch device"):
        XttsEngine(checkpoint_dir=str(xtts_checkpoint), device="toaster").load()


def test_a_checkpoint_dir_missing_files_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EngineConfigurationError, match=r"lacks model\.pth, vocab\.json"):
        XttsEngine(checkpoint_dir=str(tmp_path))


async def test_a_segment_without_punctuation_is_spoken_in_runs_within_the_languages_limit(
    engine: XttsEngine,
) -> None:
    # A caller of the engine that skips prepare_text still cannot hand XTTS one giant GPT pass.
    tokenizer = engine.scheduler.model.tokenizer
    encoded: list[str] = []
    encode = tokenizer.encode

    def spy(text: str, lang: str) -> object:
        encoded.append(text)
        return encode(text, lang=lang)

    text = " ".join(["hello"] * 300) + " " + "a" * 700
    tokenizer.encode = spy
    try:
        job = SpeechJob(segments=[Speech(text)], voice=engine.default_voice(), language="en")
        chunks = await collect(engine, job)
    finally:
        del tokenizer.encode
    assert chunks
    limit = tokenizer.char_limits["en"]
    assert len(encoded) >= len(text) // limit
    assert all(len(piece) <= limit for piece in encoded)
    assert "".join(piece.replace(" ", "") for piece in encoded) == text.replace(" ", "")
