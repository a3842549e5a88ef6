"""Process life: the engine warmed at start-up, and draining on SIGTERM.

Readiness (GET /v1/ready) reads both: a pod is ready once its engine has done
one real synthesis, and stops being ready the moment it starts draining.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from engines import SpeechEngine, SpeechJob
from engines.text import prepare_text

logger = logging.getLogger(__name__)


class Lifecycle:
    def __init__(self) -> None:
        self.warm = False
        self.warm_up_seconds: float | None = None
        self.draining = False


lifecycle = Lifecycle()


def engine_warm_up(engine: SpeechEngine) -> None:
    """One short synthesis, so that the first caller does not pay for lazy
    initialisation (ONNX sessions, CUDA kernels). Runs in its own thread with its
    own event loop, so it works whether or not the importer has a loop running."""

    async def speak() -> None:
        voice = engine.default_voice()
        job = SpeechJob(segments=prepare_text("Ready.", max_chars=100), voice=voice, language=voice.language)
        async for _chunk in engine.stream(job):
            pass

    started = time.monotonic()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(speak())
        except BaseException as exc:  # reported below, in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="engine-warm-up")
    thread.start()
    thread.join()
    if failure:
        logger.error("The engine's warm-up synthesis failed: %s", failure[0])
        return
    lifecycle.warm = True
    lifecycle.warm_up_seconds = round(time.monotonic() - started, 3)
    logger.info("Engine warmed up in %.2f s.", lifecycle.warm_up_seconds)
