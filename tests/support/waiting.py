"""Bounded waits for tests: poll a condition until it holds or a generous deadline passes.

The deadline is a safety net, not a speed target: it is long enough for a loaded
machine, and a wait that runs out fails with what it was waiting for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

DEFAULT_TIMEOUT_S = 30.0


def wait_until(
    condition: Callable[[], object],
    *,
    what: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    interval: float = 0.05,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval)


async def async_wait_until(
    condition: Callable[[], object],
    *,
    what: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    interval: float = 0.01,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(interval)
