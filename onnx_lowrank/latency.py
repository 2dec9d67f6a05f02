"""Measure whether the compressed model is actually faster in onnxruntime on this CPU.

A factorized layer is not automatically faster (unaligned ranks and grouped convs can lose ORT's blocked kernels),
so the claim is measured, not derived from MAC counts. The two models are timed interleaved — one run of the
original, one of the compressed, round after round — rather than one after the other: CPU frequency, thermal state
and background load drift over seconds, and interleaving exposes both models to the same drift, so the ratio stays
honest even when the absolute times do not. A short pause follows every run because ORT's worker threads keep
spinning ~50 ms after a run and would steal a core from the next measurement. Medians discard the occasional
preempted run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from . import runtime
from .errors import InputDataError, InvalidOptionError

__all__ = ["LatencyComparison", "measure_latency_ratio"]

PAUSE_S = 0.12
"""Seconds to sleep after each timed run (ORT's spinning threads settle in ~50 ms)."""


@dataclass(frozen=True)
class LatencyComparison:
    """Median milliseconds per run of each model, and compressed / original (below 1 means faster)."""

    original_ms: float
    compressed_ms: float
    ratio: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def measure_latency_ratio(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    feeds: Sequence[Mapping[str, np.ndarray]],
    repeats: int = 30,
    warmup: int = 5,
    threads: int = 2,
    pause_s: float = PAUSE_S,
) -> LatencyComparison:
    """Time both models interleaved for `repeats` rounds after `warmup` untimed rounds (at least one); return the
    medians.

    Round i runs feed i mod len(feeds) on the original, pauses, runs it on the compressed model, pauses. Sessions
    are created once, with `threads` intra-op threads and full ORT optimizations, as a deployment would.
    """
    if not feeds:
        raise InputDataError("No samples to time on; give at least one feed (random inputs or an .npz)")
    if int(repeats) != repeats or repeats < 1:
        raise InvalidOptionError(f"The 'repeats' parameter must be an integer >= 1. Got {repeats!r} instead.")
    if int(warmup) != warmup or warmup < 0:
        raise InvalidOptionError(f"The 'warmup' parameter must be an integer >= 0. Got {warmup!r} instead.")
    if int(threads) != threads or threads < 1:
        raise InvalidOptionError(f"The 'threads' parameter must be an integer >= 1. Got {threads!r} instead.")
    if pause_s < 0:
        raise InvalidOptionError(f"The 'pause_s' parameter must be >= 0 seconds. Got {pause_s!r} instead.")

    sessions = (runtime.session(original, threads=int(threads)), runtime.session(compressed, threads=int(threads)))
    prepared = [dict(feed) for feed in feeds]
    for i in range(max(1, int(warmup))):  # at least one untimed round: it also checks the feeds
        for sess in sessions:
            runtime.run(sess, prepared[i % len(prepared)])
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(int(repeats)):
        feed = prepared[i % len(prepared)]
        for sess, samples in zip(sessions, times):
            start = time.perf_counter()
            sess.run(None, feed)  # warm-up already went through runtime.run, which turns bad feeds into errors
            samples.append((time.perf_counter() - start) * 1000.0)
            if pause_s:
                time.sleep(pause_s)
    original_ms, compressed_ms = statistics.median(times[0]), statistics.median(times[1])
    ratio = compressed_ms / original_ms if original_ms > 0 else float("nan")
    return LatencyComparison(original_ms, compressed_ms, ratio)
