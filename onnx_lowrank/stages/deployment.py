"""The deployed int8 form against its alternatives: the original, int8 alone and ours + int8, measured side by side.

A user deploying int8 compares with onnxruntime's quantization of the original (`stages.quantize`), so that is what
the report puts ours next to: each model's file size, its measured time against the original's and how far its
outputs moved on the verification samples. The four models (original, ours in float, int8 alone, ours + int8) are
timed interleaved, `timing.MEASUREMENTS` times with fresh sessions, as a whole-model comparison is; ours + int8 against
int8 alone gets its bounds from the spread of those measurements (`noise.ratio_bounds`), so "faster than int8 alone"
is a claim beyond noise, or not made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from onnx_lowrank.graph.inputs import Samples
from onnx_lowrank.math.noise import geometric_mean, ratio_bounds
from onnx_lowrank.stages.latency_cache import model_key
from onnx_lowrank.stages.layer_timing import open_cache
from onnx_lowrank.stages.quantize import RANGES, Quantization, quantize, quantize_each
from onnx_lowrank.stages.timing import BLOCK_SECONDS, MEASUREMENT_ROUNDS, MEASUREMENTS, timer_of
from onnx_lowrank.stages.verify import verify_many

__all__ = ["DeployedModel", "Deployment", "Int8Alone", "choose_activations", "choose_ranges", "compare_deployed",
           "ACTIVATION_ROUNDS"]

ACTIVATION_ROUNDS = 20
"""Interleaved rounds timing the original quantized with uint8 against int8 activations (medians)."""


@dataclass(frozen=True, eq=False)
class Int8Alone:
    """The alternative ours is judged against, settled before planning: the recipe with its activation type
    measured (`choose_activations`) and its activations' ranges (`choose_ranges`), the original quantized by it, and
    the notes a user should read about it."""

    quantization: Quantization
    model: onnx.ModelProto
    activation_ms: Mapping[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    range_errors: Mapping[str, float] = field(default_factory=dict)  # int8 alone's output error per `RANGES` method


@dataclass(frozen=True)
class DeployedModel:
    """One row of the comparison."""

    label: str  # "original", "ours (float)", "int8 alone", "ours + int8"
    size_bytes: int  # serialized, weights included
    latency_ratio: float | None = None  # measured, of the original's time (None: not timed)
    error: float | None = None  # worst relative L2 against the original on the verification samples

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Deployment:
    """What int8 deployment gives, with low rank and without: the report's comparison table and its verdict."""

    quantization: Quantization
    models: tuple[DeployedModel, ...]  # original, ours (float), int8 alone, ours + int8
    against_int8: tuple[float, float, float] | None = None  # ours + int8 / int8 alone time: ratio, lower, upper
    activation_ms: Mapping[str, float] = field(default_factory=dict)  # int8 alone per activation type, when measured
    notes: tuple[str, ...] = ()
    range_errors: Mapping[str, float] = field(default_factory=dict)  # int8 alone per ranges method, calibration rows

    def model(self, label: str) -> DeployedModel:
        return next(m for m in self.models if m.label == label)

    @property
    def verdict(self) -> str:
        """One line: what low rank adds on top of int8 alone at this budget, or that it adds nothing."""
        alone, ours = self.model("int8 alone"), self.model("ours + int8")
        size = ours.size_bytes / alone.size_bytes if alone.size_bytes else 1.0
        errors = ("" if ours.error is None or alone.error is None else
                  f", output error {ours.error:.3g} against {alone.error:.3g}")
        if self.against_int8 is None:
            return f"Ours + int8: {size:.2f}x the size of int8 alone{errors} (not timed)."
        ratio, lower, upper = self.against_int8
        if upper < 1.0:
            return f"Ours + int8: {size:.2f}x the size and {ratio:.2f}x the time of int8 alone{errors}."
        if lower > 1.0:
            return (f"int8 alone is faster at this budget: ours + int8 measured {ratio:.3f}x its time (slower beyond "
                    f"noise; the factorized layers' int8 forms were not timed), {size:.2f}x its size{errors}.")
        if size < 0.99:
            return (f"int8 alone is as fast at this budget (ours + int8 measured {ratio:.3f}x its time, not faster "
                    f"beyond noise); low rank adds only size: {size:.2f}x{errors}.")
        return (f"int8 alone is as good at this budget: low rank adds nothing here (ours + int8 {size:.2f}x its size, "
                f"{ratio:.3f}x its time{errors}).")

    def to_dict(self) -> dict[str, object]:
        return {"quantization": self.quantization.to_dict(), "models": [m.to_dict() for m in self.models],
                "against_int8_alone": None if self.against_int8 is None else
                dict(zip(("time_ratio", "lower", "upper"), self.against_int8)),
                "activation_ms": dict(self.activation_ms), "range_errors": dict(self.range_errors),
                "verdict": self.verdict, "notes": list(self.notes)}


def choose_activations(original: onnx.ModelProto, quantization: Quantization, calibration: Samples,
                       feed: Mapping[str, np.ndarray] | None, speed) -> tuple[Quantization, onnx.ModelProto, dict]:
    """Static QDQ: the original quantized with uint8 and with int8 activations, timed interleaved with the
    deployment's settings (cached by the models' bytes), and the faster kept: (the recipe with its activations,
    int8 alone, {activations: ms}). Untimed (no sample to time on, or no `speed.measure`): uint8, onnxruntime's
    fast path on x86 (its default int8 activations measured 2.5x slower than float32 on YOLOv8n)."""
    if quantization.mode != "static":
        return quantization, quantize(original, quantization, calibration), {}
    kinds = ("uint8", "int8")
    models = quantize_each(original, quantization, calibration, kinds)
    if feed is None or not speed.measure:
        return quantization, models["uint8"], {}
    shapes = {name: np.shape(value) for name, value in feed.items()}
    cache = open_cache(speed.cache)
    keys = [model_key(models[kind], shapes, speed.runtime) for kind in kinds]
    keys = [None if key is None else key + "/int8-activations" for key in keys]
    times = [None if key is None else cache.get(key) for key in keys]
    if any(ms is None for ms in times):
        timed = timer_of(speed).time([models[kind] for kind in kinds], [[feed]] * len(kinds), ACTIVATION_ROUNDS,
                                     block_s=BLOCK_SECONDS)
        times = list(timed.medians)
        for key, ms in zip(keys, times):
            if key is not None:
                cache.put(key, ms)
        cache.save()
    measured = dict(zip(kinds, times))
    chosen = min(kinds, key=lambda kind: measured[kind])  # ties: uint8, listed first
    return replace(quantization, activations=chosen), models[chosen], measured


def choose_ranges(original: onnx.ModelProto, quantization: Quantization, calibration: Samples | None,
                  alone: onnx.ModelProto) -> tuple[Quantization, onnx.ModelProto, dict[str, float]]:
    """Static QDQ: the original quantized with each way of calibrating the activations' ranges (`quantize.RANGES`;
    `alone` is it with the recipe's own), and the one whose outputs moved least from the original's on the
    calibration samples kept (worst relative L2; ties: the first listed, min-max): (the recipe with its ranges,
    int8 alone, {ranges: error}). On the rows that set the ranges: a clipped range clips them too, so the error
    weighs clipping against coarser steps (on PP-OCRv4 rec, YOLOv8n and det it ranked the methods as their task
    metrics on the evaluation split did)."""
    if quantization.mode != "static" or calibration is None:
        return quantization, alone, {}
    models = {quantization.ranges: alone}
    for ranges in RANGES:
        if ranges not in models:
            models[ranges] = quantize(original, replace(quantization, ranges=ranges), calibration)
    checks = verify_many(original, list(models.values()), calibration)
    errors = {ranges: check.worst_relative_l2 for ranges, check in zip(models, checks)}
    chosen = min(RANGES, key=lambda ranges: math.inf if math.isnan(errors[ranges]) else errors[ranges])
    return replace(quantization, ranges=chosen), models[chosen], {ranges: errors[ranges] for ranges in RANGES}


def compare_deployed(original: onnx.ModelProto, ours: onnx.ModelProto, alone: onnx.ModelProto,
                     ours_int8: onnx.ModelProto, quantization: Quantization, samples: Samples | None,
                     feed: Mapping[str, np.ndarray] | None, speed, activation_ms: Mapping[str, float] | None = None,
                     notes: Sequence[str] = (), range_errors: Mapping[str, float] | None = None
                     ) -> tuple[Deployment, object | None]:
    """The four models compared: sizes, errors on `samples` (None: not verified) and times on `feed` (None or not
    `speed.measure`: not timed). Returns the Deployment and the verification of ours + int8 (what is written)."""
    labels = ("original", "ours (float)", "int8 alone", "ours + int8")
    models = (original, ours, alone, ours_int8)
    errors: list[float | None] = [None] * 4
    written_check = None
    if samples is not None:
        checks = verify_many(original, models[1:], samples)
        errors[1:] = [check.worst_relative_l2 for check in checks]
        written_check = checks[-1]
    ratios: list[float | None] = [None] * 4
    against = None
    if feed is not None and speed.measure:
        medians = _timed(models, feed, speed)
        ratios = [geometric_mean([m / o for m, o in zip(runs, medians[0])]) for runs in medians]
        pairs = [a / b for a, b in zip(medians[3], medians[2]) if b > 0]
        lower, upper = ratio_bounds(pairs)
        against = (geometric_mean(pairs), lower, upper)
    rows = tuple(DeployedModel(label, len(model.SerializeToString()), ratio, error)
                 for label, model, ratio, error in zip(labels, models, ratios, errors))
    return (Deployment(quantization, rows, against, dict(activation_ms or {}), tuple(notes), dict(range_errors or {})),
            written_check)


def _timed(models: Sequence[onnx.ModelProto], feed: Mapping[str, np.ndarray], speed) -> list[list[float]]:
    """Per model, its median ms in each of `MEASUREMENTS` interleaved measurements with fresh sessions, each model
    in the form it is given (the float ones in float, whatever form the planning timed in)."""
    timer = timer_of(replace(speed, deployed=None))
    medians: list[list[float]] = [[] for _ in models]
    for _ in range(MEASUREMENTS):
        timings = timer.time(list(models), [[feed]] * len(models), MEASUREMENT_ROUNDS, block_s=BLOCK_SECONDS)
        for runs, ms in zip(medians, timings.medians):
            runs.append(ms)
    return medians
