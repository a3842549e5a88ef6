"""Pitch-preserving time-stretching, for engines whose own speed control misses the mark.

Piper's `length_scale` does not scale its output's length by the factor asked for: measured
on the bundled voice (issue #18), speed 4 made audio only 1.8x shorter, speed 0.25 only 3.1x
longer, and even 0.8 and 1.25 missed by up to 16% (each phoneme lasts a whole number of
frames, at least one, and the duration noise is drawn after the scale). A client that asks
for speed 2 must get half the duration, so such an engine renders at its natural pace and
stretches the result here.

The stretch is FFmpeg's `atempo` filter (WSOLA: pitch kept, length exact to a few
milliseconds), through PyAV, which the service already ships for AAC: no new package and
no system binary. One `atempo` blends samples only for factors in [0.5, 2]; beyond that it
drops them, so a larger change is a chain of stages within that range (4 = 2 x 2).
A `TempoStretch` takes chunks as they come and gives back what is ready, so a streamed
segment can be stretched as it is made; `finish` returns the rest.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

# What one atempo stage stretches by without dropping samples.
_STAGE_MIN = 0.5
_STAGE_MAX = 2.0
# Rates this close to 1 are spoken as made: no filter, no latency, bit-identical audio.
_UNITY_TOLERANCE = 1e-6


def needs_stretch(rate: float) -> bool:
    return abs(rate - 1.0) > _UNITY_TOLERANCE


def tempo_stages(rate: float) -> list[float]:
    """`rate` as a product of factors that one atempo each handles well."""
    stages: list[float] = []
    while rate > _STAGE_MAX:
        stages.append(_STAGE_MAX)
        rate /= _STAGE_MAX
    while rate < _STAGE_MIN:
        stages.append(_STAGE_MIN)
        rate /= _STAGE_MIN
    stages.append(rate)
    return stages


class TempoStretch:
    """Float32 mono audio made `rate` times faster (shorter for rate > 1), pitch kept.

    One per stretch of continuous speech (a segment): the filter keeps a little audio back
    to overlap with what comes next, which `finish` flushes."""

    def __init__(self, rate: float, sample_rate: int) -> None:
        self.rate = rate
        self.sample_rate = sample_rate
        self._graph = av.filter.Graph()
        source = self._graph.add_abuffer(
            format="flt", sample_rate=sample_rate, layout="mono", time_base=Fraction(1, sample_rate)
        )
        previous = source
        for stage in tempo_stages(rate):
            tempo = self._graph.add("atempo", f"{stage:.6f}")
            previous.link_to(tempo)
            previous = tempo
        sink = self._graph.add("abuffersink")
        previous.link_to(sink)
        self._graph.configure()
        self._pts = 0
        self._finished = False

    def push(self, samples: np.ndarray) -> np.ndarray:
        if not len(samples):
            return np.zeros(0, dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1), format="flt", layout="mono"
        )
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        self._pts += len(samples)
        self._graph.push(frame)
        return self._drain()

    def finish(self) -> np.ndarray:
        if self._finished:
            return np.zeros(0, dtype=np.float32)
        self._finished = True
        self._graph.push(None)
        return self._drain()

    def _drain(self) -> np.ndarray:
        parts: list[np.ndarray] = []
        while True:
            try:
                frame = self._graph.pull()
            except (av.error.BlockingIOError, av.error.EOFError):
                break
            parts.append(frame.to_ndarray().reshape(-1))
        if not parts:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)


def stretched(samples: np.ndarray, rate: float, sample_rate: int) -> np.ndarray:
    """A whole piece of audio at `rate` (itself when the rate is 1)."""
    if not needs_stretch(rate) or not len(samples):
        return samples
    stretch = TempoStretch(rate, sample_rate)
    head = stretch.push(samples)
    # Overlapping windows can add up a hair past full scale at a peak.
    whole: np.ndarray = np.clip(np.concatenate([head, stretch.finish()]), -1.0, 1.0)
    return whole
