"""The voice-agent frameworks' own plugins against Daphne, over loopback only: Pipecat's
ElevenLabsTTSService and CartesiaTTSService in a pipeline (LLM text frames in, audio frames
out at the requested rate, word timestamps, an interruption that stops the audio), LiveKit's
ElevenLabs plugin `stream()`, and the official `elevenlabs` SDK's streaming call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from django.conf import settings
from elevenlabs.client import ElevenLabs
from elevenlabs.core.api_error import ApiError
from livekit.agents.types import USERDATA_TIMED_TRANSCRIPT
from livekit.plugins import elevenlabs as livekit_elevenlabs
from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
    TTSTextFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.cartesia.tts import CartesiaTTSService
from pipecat.services.elevenlabs.tts import ElevenLabsTTSService
from pipecat.workers.runner import WorkerRunner

from tests.support.servers import ServiceEnv, daphne_server
from tests.support.tenants import committed_tenant
from tests.support.waiting import async_wait_until, wait_until
from usage.models import UsageLog

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

UNLIMITED = {"rate_limit_minute": 0, "rate_limit_hour": 0, "quota_minutes": 0, "max_concurrent_streams": 0}
# An LLM's reply as it streams: token-sized pieces.
REPLY = ["Thanks", " for", " calling.", " Your", " table", " is", " booked", " for", " eight."]
LONG_REPLY = [f" Sentence number {n} of an answer the caller will not wait for." for n in range(25)]


@pytest.fixture(scope="module")
def server(service_env: ServiceEnv) -> Iterator[str]:
    with daphne_server(service_env(REDIS_URL=settings.REDIS_URL)) as base_url:
        yield base_url


def _rows(django_db_blocker: Any, tenant: Any) -> list[tuple[str, int, str]]:
    with django_db_blocker.unblock():
        rows = UsageLog.objects.filter(tenant=tenant)
        return sorted((row.endpoint, row.status_code, row.error_code or "") for row in rows)


class Recorder(FrameProcessor):
    """The end of the pipeline: every frame that reaches it, with when it arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[tuple[float, Frame]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.frames.append((time.monotonic(), frame))
        await self.push_frame(frame, direction)

    def of(self, kind: type[Frame]) -> list[Any]:
        return [frame for _, frame in self.frames if isinstance(frame, kind)]


Script = Callable[[PipelineWorker, Recorder], Awaitable[None]]


def run_pipeline(service: FrameProcessor, script: Script) -> Recorder:
    """Run `service` in a pipeline, drive it with `script`, then end it."""
    recorder = Recorder()

    async def main() -> None:
        worker = PipelineWorker(Pipeline([service, recorder]), cancel_on_idle_timeout=False)
        started = asyncio.Event()

        @worker.event_handler("on_pipeline_started")  # type: ignore[untyped-decorator]
        async def on_started(_worker: Any, _frame: Any) -> None:
            started.set()

        async def drive() -> None:
            await asyncio.wait_for(started.wait(), 30)
            try:
                await script(worker, recorder)
            finally:
                await worker.queue_frame(EndFrame())

        runner = WorkerRunner()
        await runner.add_workers(worker)
        await asyncio.wait_for(asyncio.gather(runner.run(), drive()), 240)

    asyncio.run(main())
    return recorder


async def _reply(worker: PipelineWorker, pieces: list[str]) -> None:
    await worker.queue_frame(LLMFullResponseStartFrame())
    for piece in pieces:
        await worker.queue_frame(LLMTextFrame(piece))
    await worker.queue_frame(LLMFullResponseEndFrame())


async def _speaks_a_reply(worker: PipelineWorker, recorder: Recorder) -> None:
    await _reply(worker, REPLY)
    await async_wait_until(lambda: recorder.of(TTSStoppedFrame), what="the reply's end", timeout_s=120)
    # Word frames follow the audio's playback clock: wait for the last one.
    await async_wait_until(lambda: len(recorder.of(TTSTextFrame)) >= 9, what="every word", timeout_s=60)


async def _interrupts_a_reply(worker: PipelineWorker, recorder: Recorder) -> None:
    await _reply(worker, LONG_REPLY)
    await async_wait_until(lambda: recorder.of(TTSAudioRawFrame), what="the first audio", timeout_s=120)
    recorder.interrupted_at = time.monotonic()  # type: ignore[attr-defined]
    await worker.queue_frame(InterruptionFrame())


def _check_reply(recorder: Recorder, sample_rate: int) -> None:
    audio = recorder.of(TTSAudioRawFrame)
    assert audio, "no audio frames"
    assert {frame.sample_rate for frame in audio} == {sample_rate}
    seconds = sum(len(frame.audio) for frame in audio) / 2 / sample_rate
    assert 1.0 < seconds < 10.0
    words = [frame.text.strip() for frame in recorder.of(TTSTextFrame)]
    assert words == ["Thanks", "for", "calling.", "Your", "table", "is", "booked", "for", "eight."]
    stamps = [frame.pts for frame in recorder.of(TTSTextFrame)]
    assert stamps == sorted(stamps), "word timestamps out of order"


def _check_interrupted(recorder: Recorder, django_db_blocker: Any, tenant: Any, endpoint: str) -> None:
    # The server stops the context (its row says so, once the interruption reached it),
    # and no audio reaches the pipeline's end after the interruption has passed through it.
    wait_until(
        lambda: _rows(django_db_blocker, tenant) == [(endpoint, 200, "cancelled")],
        what="the interrupted context's row",
    )
    interruption = next(at for at, frame in recorder.frames if isinstance(frame, InterruptionFrame))
    late = [
        frame for at, frame in recorder.frames if at > interruption and isinstance(frame, TTSAudioRawFrame)
    ]
    assert late == []
    heard = sum(len(frame.audio) for frame in recorder.of(TTSAudioRawFrame)) / 2 / 16000
    assert heard < 25 * 2, "the whole reply was played"


# --- Pipecat ---


@pytest.mark.django_db(transaction=True)
def test_pipecat_elevenlabs_service_speaks_streamed_text_with_word_timestamps(
    server: str, django_db_blocker: Any
) -> None:
    with committed_tenant(django_db_blocker, "pipecat-el", **UNLIMITED) as (tenant, issued):
        url = server.replace("http://", "ws://")
        service = ElevenLabsTTSService(
            api_key=issued.plaintext,
            url=url,
            sample_rate=16000,
            settings=ElevenLabsTTSService.Settings(voice="joe"),
        )
        recorder = run_pipeline(service, _speaks_a_reply)
        _check_reply(recorder, 16000)
        expected = [("elevenlabs-multi-stream", 200, "")]
        wait_until(lambda: _rows(django_db_blocker, tenant) == expected, what="one row for the reply")


@pytest.mark.django_db(transaction=True)
def test_pipecat_elevenlabs_service_interrupted_mid_utterance_stops(
    server: str, django_db_blocker: Any
) -> None:
    with committed_tenant(django_db_blocker, "pipecat-el-int", **UNLIMITED) as (tenant, issued):
        url = server.replace("http://", "ws://")
        service = ElevenLabsTTSService(
            api_key=issued.plaintext,
            url=url,
            sample_rate=16000,
            settings=ElevenLabsTTSService.Settings(voice="joe"),
        )
        recorder = run_pipeline(service, _interrupts_a_reply)
        _check_interrupted(recorder, django_db_blocker, tenant, "elevenlabs-multi-stream")


@pytest.mark.django_db(transaction=True)
def test_pipecat_cartesia_service_speaks_streamed_text_with_word_timestamps(
    server: str, django_db_blocker: Any
) -> None:
    with committed_tenant(django_db_blocker, "pipecat-cartesia", **UNLIMITED) as (tenant, issued):
        url = server.replace("http://", "ws://") + "/tts/websocket"
        service = CartesiaTTSService(
            api_key=issued.plaintext,
            url=url,
            sample_rate=16000,
            settings=CartesiaTTSService.Settings(voice="joe"),
        )
        recorder = run_pipeline(service, _speaks_a_reply)
        _check_reply(recorder, 16000)
        expected = [("cartesia-websocket", 200, "")]
        wait_until(lambda: _rows(django_db_blocker, tenant) == expected, what="one row for the reply")


@pytest.mark.django_db(transaction=True)
def test_pipecat_cartesia_service_interrupted_mid_utterance_stops(
    server: str, django_db_blocker: Any
) -> None:
    with committed_tenant(django_db_blocker, "pipecat-cartesia-int", **UNLIMITED) as (tenant, issued):
        url = server.replace("http://", "ws://") + "/tts/websocket"
        service = CartesiaTTSService(
            api_key=issued.plaintext,
            url=url,
            sample_rate=16000,
            settings=CartesiaTTSService.Settings(voice="joe"),
        )
        recorder = run_pipeline(service, _interrupts_a_reply)
        _check_interrupted(recorder, django_db_blocker, tenant, "cartesia-websocket")


# --- LiveKit Agents ---


@pytest.mark.django_db(transaction=True)
def test_livekit_elevenlabs_plugin_streams_pushed_text_with_alignment(
    server: str, django_db_blocker: Any
) -> None:
    with committed_tenant(django_db_blocker, "livekit-el", **UNLIMITED) as (tenant, issued):

        async def main() -> tuple[int, float, list[Any]]:
            async with aiohttp.ClientSession() as session:
                tts = livekit_elevenlabs.TTS(
                    api_key=issued.plaintext,
                    base_url=f"{server}/v1",
                    voice_id="joe",
                    encoding="pcm_16000",
                    http_session=session,
                )
                stream = tts.stream()
                for piece in REPLY:
                    stream.push_text(piece)
                stream.end_input()
                rates, samples, timed = set(), 0, []
                async with asyncio.timeout(120):
                    async for event in stream:
                        rates.add(event.frame.sample_rate)
                        samples += event.frame.samples_per_channel
                        timed += event.frame.userdata.get(USERDATA_TIMED_TRANSCRIPT, [])
                await stream.aclose()
                await tts.aclose()
                [rate] = rates
                return rate, samples / rate, timed

        rate, seconds, timed = asyncio.run(main())
        assert rate == 16000
        assert 1.0 < seconds < 10.0
        words = "".join(str(word) for word in timed).split()
        assert words == ["Thanks", "for", "calling.", "Your", "table", "is", "booked", "for", "eight."]
        starts = [word.start_time for word in timed]
        assert starts == sorted(starts)
        assert timed[-1].end_time <= seconds + 0.01
        expected = [("elevenlabs-multi-stream", 200, "")]
        wait_until(lambda: _rows(django_db_blocker, tenant) == expected, what="one row for the reply")


# --- The official ElevenLabs SDK ---


@pytest.mark.django_db(transaction=True)
def test_elevenlabs_sdk_streams_speech_and_raises_its_own_errors(server: str, django_db_blocker: Any) -> None:
    with committed_tenant(django_db_blocker, "el-sdk", **UNLIMITED) as (tenant, issued):
        client = ElevenLabs(api_key=issued.plaintext, base_url=server)
        chunks = list(
            client.text_to_speech.stream(
                voice_id="joe",
                text="Thanks for calling. Your table is booked for eight.",
                model_id="eleven_flash_v2_5",
                output_format="pcm_22050",
            )
        )
        assert len(chunks) > 1, "the audio came in one piece, not streamed"
        assert 1.0 < len(b"".join(chunks)) / 2 / 22050 < 10.0

        with pytest.raises(ApiError) as unknown:
            b"".join(client.text_to_speech.stream(voice_id="nobody", text="Hello."))
        assert unknown.value.status_code == 404
        assert unknown.value.body["detail"]["status"] == "voice_not_found"
        with pytest.raises(ApiError) as bad_key:
            b"".join(
                ElevenLabs(api_key="nope", base_url=server).text_to_speech.stream(voice_id="joe", text="Hi.")
            )
        assert bad_key.value.status_code == 401

        expected = sorted([("elevenlabs-tts", 200, ""), ("elevenlabs-tts", 404, "voice_not_found")])
        wait_until(lambda: _rows(django_db_blocker, tenant) == expected, what="a row per request")
