"""Measure whether the compressed model is actually faster in onnxruntime on this CPU.

A factorized layer is not automatically faster (unaligned ranks and grouped convs can lose ORT's blocked kernels),
so the claim is measured, not derived from MAC counts. The two models are timed interleaved — one run of the
original, one of the compressed, round after round — rather than one after the other: CPU frequency, thermal state
and background load drift over seconds, and interleaving exposes both models to the same drift, so the ratio stays
honest even when the absolute times do not. ORT's worker threads would keep spinning ~50 ms after a run and steal a
core from the other model; the sessions stop them at the end of each run instead (`runtime.session`),
which is also faster than pausing between runs (measured: a pause lets the next run start cold, 2-4x slower on a
small conv). Medians discard the occasional preempted run.

Every measurement (layer variants, whole models, the judge's tied plans) goes through one `Timer`, so there is one
timing loop (`OnnxruntimeTimer`) and tests can put a scripted one in its place (`SpeedSettings.timer`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx

from onnx_lowrank.graph import runtime
from onnx_lowrank.errors import InputDataError, InvalidOptionError
from onnx_lowrank.graph.runtime import RuntimeSettings
from onnx_lowrank.stages.quantize import QuantizedTimer
from onnx_lowrank.math.noise import (EARLY_LEVEL, EARLY_MEASUREMENTS, NOISE_LEVEL, faster_beyond_noise, geometric_mean,
                                     ratio_bounds, slower_beyond_noise)

__all__ = ["Timer", "Timings", "OnnxruntimeTimer", "timer_of", "baseline_of", "LatencyComparison",
           "measure_latency_ratio", "model_latency", "compare_models", "SpeedCheck"]

Feed = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Timings:
    """Per model: the median milliseconds per run, and the milliseconds of every timed round (in round order)."""

    medians: tuple[float, ...]
    samples: tuple[tuple[float, ...], ...]


class Timer(Protocol):
    """Times several models interleaved: after `warmup` untimed rounds (at least one), `rounds` timed rounds, each
    running every model once, in order in even rounds and in reverse order in odd ones (no model always runs right
    after the same neighbour), round i on feed i mod len of that model's feeds (`feeds`: one sequence per model). `block_s` > 0: a model faster than that runs several times per round (at most MAX_REPEATS), the
    round's time divided by the count, so tiny layers are not timed at the clock's resolution."""

    def time(self, models: Sequence[onnx.ModelProto], feeds: Sequence[Sequence[Feed]], rounds: int,
             warmup: int = 1, block_s: float = 0.0) -> Timings: ...


MAX_REPEATS = 20
"""The most runs of one model per round when `block_s` asks for blocks."""


class OnnxruntimeTimer:
    """The `Timer` of this machine: onnxruntime sessions made with `settings`, timed with `time.perf_counter`."""

    def __init__(self, settings: RuntimeSettings):
        self.settings = settings

    def time(self, models: Sequence[onnx.ModelProto], feeds: Sequence[Sequence[Feed]], rounds: int,
             warmup: int = 1, block_s: float = 0.0) -> Timings:
        sessions = [runtime.session(model, settings=self.settings) for model in models]
        prepared = [[dict(feed) for feed in own] for own in feeds]
        for i in range(max(1, int(warmup))):  # at least one untimed round: it also checks the feeds
            for sess, own in zip(sessions, prepared):
                runtime.run(sess, own[i % len(own)])
        repeats = [1] * len(sessions)
        if block_s > 0:
            for index, (sess, own) in enumerate(zip(sessions, prepared)):
                start = time.perf_counter()
                sess.run(None, own[0])
                repeats[index] = max(1, min(MAX_REPEATS, math.ceil(block_s / max(time.perf_counter() - start,
                                                                                  1e-7))))
        samples: list[list[float]] = [[] for _ in sessions]
        runs = list(zip(sessions, prepared, repeats, samples))
        for i in range(int(rounds)):
            for sess, own, count, times in (runs if i % 2 == 0 else runs[::-1]):
                feed = own[i % len(own)]
                start = time.perf_counter()
                for _ in range(count):
                    sess.run(None, feed)  # the warm-up went through runtime.run, which turns bad feeds into errors
                times.append((time.perf_counter() - start) * 1000.0 / count)
        return Timings(tuple(statistics.median(times) for times in samples), tuple(map(tuple, samples)))


def timer_of(speed) -> Timer:
    """The timer `speed` (`settings.SpeedSettings`) names: its own, else onnxruntime with its session settings;
    timing the int8 form of every model when `speed.deployed` names one (`quantize.QuantizedTimer`)."""
    timer = speed.timer or OnnxruntimeTimer(speed.runtime)
    return timer if speed.deployed is None else QuantizedTimer(timer, speed.deployed)


def baseline_of(speed) -> str:
    """What a whole-model comparison under `speed` compares with: the original, or the original quantized the
    same way when the models are timed in their int8 form."""
    return "original" if speed.deployed is None else "int8 alone"


@dataclass(frozen=True)
class LatencyComparison:
    """Median milliseconds per run of each model, and compressed / original (below 1 means faster).

    `pair_ratios`: the ratio of each of several independent measurements (`compare_models`: each with sessions of
    its own; the times are then the geometric means of theirs), and "faster" or "slower" beyond noise is decided from
    their spread (`noise.ratio_bounds`), which includes the few percent by which two sessions of one model differ. A
    single measurement (`measure_latency_ratio`) decides from its per-round times (the sign test), which cannot see
    that difference. `level`: the one-sided level of those bounds (`compare_models` spends NOISE_LEVEL over two
    looks). `against`: what the "original" is: "original", or "int8 alone" when both were timed in their int8 form
    (`baseline_of`)."""

    original_ms: float
    compressed_ms: float
    ratio: float
    original_rounds: tuple[float, ...] = ()
    compressed_rounds: tuple[float, ...] = ()
    pair_ratios: tuple[float, ...] = ()
    level: float = NOISE_LEVEL
    against: str = "original"

    @property
    def baseline(self) -> str:
        """What was compared with, for a sentence: "the original" or "int8 alone"."""
        return "the original" if self.against == "original" else self.against

    @property
    def bounds(self) -> tuple[float, float] | None:
        """(lower, upper) one-sided `level` bounds around `ratio`, from the spread of the independent measurements'
        ratios (None with fewer than two)."""
        return ratio_bounds(self.pair_ratios, self.level) if len(self.pair_ratios) > 1 else None

    @property
    def faster(self) -> bool:
        """Measured faster than the original beyond noise."""
        if self.bounds is not None:
            return self.bounds[1] < 1.0
        return faster_beyond_noise(self.compressed_rounds, self.original_rounds)

    @property
    def slower(self) -> bool:
        """Measured slower than the original beyond noise."""
        if self.bounds is not None:
            return self.bounds[0] > 1.0
        return slower_beyond_noise(self.compressed_rounds, self.original_rounds)

    @property
    def slower_rounds(self) -> int:
        """Rounds in which the compressed model was not faster than the original."""
        return sum(1 for c, o in zip(self.compressed_rounds, self.original_rounds) if c >= o)

    def to_dict(self) -> dict[str, object]:
        bounds = self.bounds
        return {"original_ms": self.original_ms, "compressed_ms": self.compressed_ms, "ratio": self.ratio,
                "rounds": len(self.compressed_rounds), "rounds_not_faster": self.slower_rounds,
                "measurements": max(1, len(self.pair_ratios)),
                "ratio_bounds": None if bounds is None else list(bounds), "bounds_level": self.level,
                "faster_beyond_noise": self.faster, "slower_beyond_noise": self.slower, "against": self.against}


@dataclass(frozen=True)
class SpeedCheck:
    """The never-slower guard's whole-model check after writing (`pipeline.run_apply`): whether the written model
    was measured faster than the original beyond noise (`LatencyComparison.faster`), which planned layers (and
    narrowed sets) were taken out, least measured saving first, to get there, and, when it was not shown, why."""

    kept: bool  # measured faster beyond noise: the promise holds for this model, as measured
    dropped: tuple[str, ...] = ()  # taken out of the plan by the check, in the order they went
    note: str | None = None  # one plain sentence when the promise was not shown

    def to_dict(self) -> dict[str, object]:
        return {"kept": self.kept, "dropped": list(self.dropped), "note": self.note}


def measure_latency_ratio(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    feeds: Sequence[Feed],
    repeats: int = 30,
    warmup: int = 5,
    threads: int | None = None,
    settings: RuntimeSettings | None = None,
    timer: Timer | None = None,
) -> LatencyComparison:
    """Time both models interleaved for `repeats` rounds after `warmup` untimed rounds (at least one); return the
    medians.

    Round i runs feed i mod len(feeds) on the original, then on the compressed model. `timer` (default: onnxruntime
    with `settings`, else `threads` intra-op threads, full ORT optimizations on the CPU) does the timing.
    """
    if not feeds:
        raise InputDataError("No samples to time on; give at least one feed (random inputs or an .npz)")
    if int(repeats) != repeats or repeats < 1:
        raise InvalidOptionError(f"The 'repeats' parameter must be an integer >= 1. Got {repeats!r} instead.")
    if int(warmup) != warmup or warmup < 0:
        raise InvalidOptionError(f"The 'warmup' parameter must be an integer >= 0. Got {warmup!r} instead.")
    if threads is not None and (int(threads) != threads or threads < 1):
        raise InvalidOptionError(f"The 'threads' parameter must be an integer >= 1. Got {threads!r} instead.")
    timer = timer or OnnxruntimeTimer(settings or RuntimeSettings(threads=None if threads is None else int(threads)))
    timings = timer.time([original, compressed], [feeds, feeds], int(repeats), int(warmup))
    original_ms, compressed_ms = timings.medians
    ratio = compressed_ms / original_ms if original_ms > 0 else float("nan")
    return LatencyComparison(original_ms, compressed_ms, ratio, *map(tuple, timings.samples))


def model_latency(model: onnx.ModelProto, feed: Feed, settings: RuntimeSettings, repeats: int = 15, warmup: int = 3,
                  timer: Timer | None = None) -> float:
    """Median milliseconds of one run of `model` on `feed`, after `warmup` untimed runs: the whole-model time the
    latency cost model starts from."""
    return (timer or OnnxruntimeTimer(settings)).time([model], [[feed]], repeats, warmup).medians[0]


MEASUREMENTS = 5
"""Independent measurements in a whole-model comparison (`compare_models`), each with sessions of its own (at most:
a clear verdict stops after `noise.EARLY_MEASUREMENTS`)."""
MEASUREMENT_ROUNDS = 8
"""Interleaved rounds in each of them (their medians make one ratio)."""
BLOCK_SECONDS = 0.002
"""A model faster than this runs several times per timed round, so that a round of a 0.1 ms model is not decided by
the clock and the scheduler."""


def compare_models(original: onnx.ModelProto, compressed: onnx.ModelProto, feeds: Sequence[Feed], speed,
                   measurements: int = MEASUREMENTS, rounds: int = MEASUREMENT_ROUNDS,
                   stop_early: bool = True) -> LatencyComparison:
    """Both models timed interleaved with the deployment's settings and timer (`settings.SpeedSettings`), up to
    `measurements` times, each with fresh sessions: what verification, the never-slower check and the sweep
    report as the speedup: the geometric means of the measurements' medians (so the ratio is the geometric mean of
    their ratios, the centre of their bounds).

    Sequential: after `noise.EARLY_MEASUREMENTS` the comparison stops when the ratio is already faster or slower
    beyond noise at the stricter `noise.EARLY_LEVEL` (a 10% speedup is clear after 3 of YOLOv8n's 0.33 s
    measurements); otherwise all are taken and judged at the rest of NOISE_LEVEL, so the two looks together keep
    the chance of calling a no-difference pair faster (or slower) within NOISE_LEVEL. `stop_early=False` always
    takes every measurement, at NOISE_LEVEL (a benchmark's figures of equal precision in every cell)."""
    if not feeds:
        raise InputDataError("No samples to time on; give at least one feed (random inputs or an .npz)")
    timer = timer_of(speed)
    measurements = int(measurements)
    ratios, original_rounds, compressed_rounds, medians = [], [], [], ([], [])
    early = EARLY_MEASUREMENTS if stop_early and measurements > EARLY_MEASUREMENTS else None
    level = NOISE_LEVEL - EARLY_LEVEL if early is not None else NOISE_LEVEL
    for count in range(1, measurements + 1):
        timings = timer.time([original, compressed], [feeds, feeds], int(rounds), block_s=BLOCK_SECONDS)
        original_ms, compressed_ms = timings.medians
        medians[0].append(original_ms)
        medians[1].append(compressed_ms)
        ratios.append(compressed_ms / original_ms if original_ms > 0 else float("nan"))
        original_rounds += timings.samples[0]
        compressed_rounds += timings.samples[1]
        if count == early:
            lower, upper = ratio_bounds(ratios, EARLY_LEVEL)
            if upper < 1.0 or lower > 1.0:
                level = EARLY_LEVEL
                break
    original_ms, compressed_ms = geometric_mean(medians[0]), geometric_mean(medians[1])
    ratio = compressed_ms / original_ms if original_ms > 0 else float("nan")  # the geometric mean of the ratios
    return LatencyComparison(original_ms, compressed_ms, ratio, tuple(original_rounds), tuple(compressed_rounds),
                             tuple(ratios), level, baseline_of(speed))
