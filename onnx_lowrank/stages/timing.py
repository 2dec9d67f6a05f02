"""Measure whether the compressed model is actually faster in onnxruntime on this CPU.

A factorized layer is not automatically faster (unaligned ranks and grouped convs can lose ORT's blocked kernels),
so the claim is measured, not derived from MAC counts. The two models are timed interleaved — one run of the
original, one of the compressed, round after round — rather than one after the other: CPU frequency, thermal state
and background load drift over seconds, and interleaving exposes both models to the same drift, so the ratio stays
honest even when the absolute times do not. ORT's worker threads would keep spinning ~50 ms after a run and steal a
core from the other model; the sessions stop them at the end of each run instead (`runtime.session`),
which is also faster than pausing between runs (measured: a pause lets the next run start cold, 2-4x slower on a
small conv). Medians discard the occasional preempted run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from onnx_lowrank.graph import runtime
from onnx_lowrank.errors import InputDataError, InvalidOptionError
from onnx_lowrank.graph.runtime import RuntimeSettings

__all__ = ["LatencyComparison", "measure_latency_ratio", "model_latency"]

PAUSE_S = 0.0
"""Seconds to sleep after each timed run (none needed: timing sessions stop spinning at the end of a run)."""


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
    threads: int | None = 2,
    pause_s: float = PAUSE_S,
    settings: RuntimeSettings | None = None,
) -> LatencyComparison:
    """Time both models interleaved for `repeats` rounds after `warmup` untimed rounds (at least one); return the
    medians.

    Round i runs feed i mod len(feeds) on the original, then on the compressed model. Sessions are created once,
    with `settings` (default: `threads` intra-op threads, full ORT optimizations on the CPU), as a deployment would.
    """
    if not feeds:
        raise InputDataError("No samples to time on; give at least one feed (random inputs or an .npz)")
    if int(repeats) != repeats or repeats < 1:
        raise InvalidOptionError(f"The 'repeats' parameter must be an integer >= 1. Got {repeats!r} instead.")
    if int(warmup) != warmup or warmup < 0:
        raise InvalidOptionError(f"The 'warmup' parameter must be an integer >= 0. Got {warmup!r} instead.")
    if threads is not None and (int(threads) != threads or threads < 1):
        raise InvalidOptionError(f"The 'threads' parameter must be an integer >= 1. Got {threads!r} instead.")
    if pause_s < 0:
        raise InvalidOptionError(f"The 'pause_s' parameter must be >= 0 seconds. Got {pause_s!r} instead.")

    settings = settings or RuntimeSettings(threads=None if threads is None else int(threads))
    sessions = (runtime.session(original, settings=settings),
                runtime.session(compressed, settings=settings))
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


def model_latency(model: onnx.ModelProto, feed: Mapping[str, np.ndarray], settings: RuntimeSettings,
                  repeats: int = 15, warmup: int = 3) -> float:
    """Median milliseconds of one run of `model` on `feed`, after `warmup` untimed runs: the whole-model time the
    latency cost model starts from."""
    sess = runtime.session(model, settings=settings)
    for _ in range(max(1, warmup)):
        runtime.run(sess, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)
