"""Compress one model at several budgets and allocators, and measure each result: the fidelity/size/speed frontier.

The model is analysed once; every (allocator, budget) cell is planned, applied, verified on the same samples, and
timed against the original interleaved in one process (see `latency`), so the cells are comparable with each other.
An optional `evaluate` hook adds task metrics (the benchmark runner scores detections or recognised text with it).

With `quantize` every cell is ours + int8 (`pipeline.deploy_int8`: planned, timed and guarded in the int8 form) and
the frontier starts with int8 alone, the original quantized the same way: sizes and times are then fractions of
int8 alone's, output errors and task metrics still against the original.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from onnx_lowrank import api
from onnx_lowrank.errors import BudgetError, SlowerModelError
from onnx_lowrank.graph.inputs import Samples, parse_shape_specs, random_feeds, resolve_shapes
from onnx_lowrank.graph.runtime import DEFAULT_PROVIDER
from onnx_lowrank.math.projection import DEFAULT_SHRINKAGE
from onnx_lowrank.options import checked
from onnx_lowrank.pipeline import deploy_int8, keep_speed_promise, prepare, run_analysis, run_apply
from onnx_lowrank.settings import AnalysisSettings, CachePath, SpeedSettings
from onnx_lowrank.stages.quantize import as_deployed
from onnx_lowrank.stages.report import nothing_to_compress
from onnx_lowrank.stages.timing import MEASUREMENT_ROUNDS, compare_models
from onnx_lowrank.stages.verify import verify

__all__ = ["SweepPoint", "Sweep", "sweep"]


@dataclass(frozen=True)
class SweepPoint:
    allocator: str
    budget: float
    params_ratio: float
    flops_ratio: float | None
    latency_ratio: float | None  # compressed / original median time; None when not measured
    predicted_latency_ratio: float | None  # what the latency cost model predicted; None without measured layers
    output_error: float  # worst relative L2 over the model's outputs
    top1_agreement: float | None  # lowest over outputs that are score vectors
    max_layer_error: float  # error of the worst factorized layer (spectral, or output error with calibration)
    layers_factorized: int
    tool_seconds: float  # analyze + plan + apply: what one `compress --no-verify` costs
    task: Mapping[str, float] = field(default_factory=dict)  # from the evaluate hook
    never_slower: bool | None = None  # guarded: measured faster than the original beyond noise (the check's word)
    size_ratio: float | None = None  # file size / the original's (int8 alone's with quantize)

    def to_dict(self) -> dict:
        return {**asdict(self), "task": dict(self.task)}


@dataclass(frozen=True)
class Sweep:
    points: tuple[SweepPoint, ...]
    unreachable: tuple[tuple[str, float, str], ...]  # (allocator, budget, why)
    analysis_seconds: float
    samples: str  # where the samples came from: an --inputs path or "random"
    calibration: str | None = None  # where the calibration samples came from; None: weight-only
    measure: str = "spectral"  # what layer errors measure
    message: str | None = None  # why nothing could be compressed, when nothing could
    guarded: bool = False  # only candidates measured faster than their dense layer were kept
    deployed: Mapping[str, object] | None = None  # the int8 recipe (`Quantization.to_dict`) with quantize

    def to_dict(self) -> dict:
        return {
            "points": [p.to_dict() for p in self.points],
            "unreachable": [list(u) for u in self.unreachable],
            "analysis_seconds": self.analysis_seconds,
            "samples": self.samples,
            "calibration": self.calibration,
            "measure": self.measure,
            "message": self.message,
            "guarded": self.guarded,
            "deployed": None if self.deployed is None else dict(self.deployed),
        }


@checked
def sweep(
    model: str | os.PathLike | onnx.ModelProto,
    budgets: Sequence[float] = (0.9, 0.8, 0.7, 0.6, 0.5),
    *,
    allocators: Sequence[str] | None = None,
    metric: str = "params",
    inputs: str | os.PathLike | Sequence[Mapping[str, np.ndarray]] | None = None,
    calibration: str | os.PathLike | Sequence[Mapping[str, np.ndarray]] | None = None,
    weight_only: bool = False,
    shrinkage: float = DEFAULT_SHRINKAGE,
    refit: bool = False,
    input_shapes: Sequence[str] | Mapping[str, Sequence[int]] | None = None,
    rank_multiple: int = 1,
    max_groups: int = 8,
    method: str | None = None,
    exclude: str | None = None,
    latency: bool = True,
    latency_repeats: int = MEASUREMENT_ROUNDS,
    allow_slower: bool = False,
    threads: int | None = None,
    provider: str = DEFAULT_PROVIDER,
    latency_cache: CachePath = True,
    timer: object | None = None,
    evaluate: Callable[[onnx.ModelProto], Mapping[str, float]] | None = None,
    quantize: str | None = None,
    upgrade_opset: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Sweep:
    """Measure every (allocator, budget) cell. `inputs` and `calibration` may also be lists of feed dicts (the
    benchmark's splits). With calibration data (or `inputs`, unless `weight_only`) the analysis is data-aware and
    the default allocators are `auto`; otherwise `alds`. `quantize`, `upgrade_opset`: as `compress`'s; the first
    point is then int8 alone."""
    settings = AnalysisSettings(method, shrinkage, exclude, max_groups, rank_multiple, weight_only,
                                int8=quantize is not None)
    speed = SpeedSettings.of(allow_slower, metric, threads, provider, latency_cache, timer)  # compress's rule
    start = time.perf_counter()
    context = prepare(model, inputs, input_shapes, False, calibration, settings, speed)
    alone = None
    if quantize is not None:  # a quantized input is refused here, before any work
        context, alone = deploy_int8(context, quantize, upgrade_opset)
    recipe = None if alone is None else alone.quantization
    proto, feeds, calibration_samples = context.model, context.feeds, context.calibration
    speed = context.speed  # with quantize: every model timed in its int8 form
    analysis = run_analysis(context)
    analysis_seconds = time.perf_counter() - start
    if allocators is None:
        allocators = ("auto",) if calibration_samples is not None else ("alds",)
    if feeds is None and analysis.layers:  # random samples, made only when some cell can change the model
        random_shapes = resolve_shapes(proto, parse_shape_specs(input_shapes))
        feeds = Samples.given(random_feeds(proto, random_shapes, count=2, seed=0), "random")

    points, unreachable = [], []
    reference_size = len(proto.SerializeToString()) if alone is None else len(alone.model.SerializeToString())
    if alone is not None and feeds is not None:
        points.append(_int8_alone(proto, alone.model, feeds, reference_size, evaluate))
    for allocator in allocators:
        for budget in budgets:
            if progress is not None:
                progress(f"{allocator} {budget:g}")
            start = time.perf_counter()
            try:
                plan = api.plan(analysis, budget, metric=metric, allocator=allocator)
            except BudgetError as exc:
                unreachable.append((allocator, float(budget), str(exc)))
                continue
            compressed, report = run_apply(context, plan, False, analysis, {}, refit, time_models=False)
            tool_seconds = analysis_seconds + time.perf_counter() - start
            output_error, top1, timing = 0.0, None, None  # nothing factorized: the original, nothing to measure
            promise, deployed = None, None
            if report.factorized or report.narrowed:
                # with quantize the float model is timed (the timer quantizes both it and the original), and
                # ours + int8 is what is verified, measured and scored
                deployed = as_deployed(compressed, recipe, calibration_samples)
                check = verify(proto, deployed, feeds)
                output_error, top1 = check.worst_relative_l2, check.lowest_top1_agreement
                timing = compare_models(proto, compressed, [context.timing_feed()], speed,
                                        rounds=latency_repeats) if latency else None  # as compress times it
                if timing is not None and analysis.guarded:  # the promise compress keeps, kept here too
                    try:
                        kept, compressed, timing, speed_check = keep_speed_promise(context, analysis, plan,
                                                                                   compressed, timing, refit)
                    except SlowerModelError as exc:  # slower whatever was taken out: compress writes nothing either
                        unreachable.append((allocator, float(budget), str(exc)))
                        continue
                    promise = speed_check.kept
                    if kept is not plan:  # changes were taken out: the point describes the model written
                        plan = kept
                        _, report = run_apply(context, plan, False, analysis, {}, refit, time_models=False)
                        deployed = as_deployed(compressed, recipe, calibration_samples)
                        check = verify(proto, deployed, feeds)
                        output_error, top1 = check.worst_relative_l2, check.lowest_top1_agreement
            compressed = deployed if deployed is not None else as_deployed(compressed, recipe, calibration_samples)
            points.append(
                SweepPoint(
                    allocator=allocator if allocator != "auto" else f"auto:{plan.allocator}",
                    budget=float(budget),
                    params_ratio=report.params_ratio,
                    flops_ratio=report.flops_ratio,
                    latency_ratio=None if timing is None else timing.ratio,
                    predicted_latency_ratio=report.ratio("latency"),
                    output_error=output_error,
                    top1_agreement=top1,
                    max_layer_error=max([r.error for r in report.factorized] + [r.error for r in report.narrowed],
                                        default=0.0),
                    layers_factorized=len(report.factorized) + len(report.narrowed),
                    tool_seconds=tool_seconds,
                    task=dict(evaluate(compressed)) if evaluate is not None else {},
                    never_slower=promise,
                    size_ratio=len(compressed.SerializeToString()) / reference_size,
                )
            )
    return Sweep(points=tuple(points), unreachable=tuple(unreachable), analysis_seconds=analysis_seconds,
                 samples="random" if feeds is None else feeds.source, calibration=analysis.calibration,
                 measure=analysis.measure,
                 message=None if analysis.layers else nothing_to_compress(analysis.skipped), guarded=analysis.guarded,
                 deployed=None if recipe is None else recipe.to_dict())


def _int8_alone(original: onnx.ModelProto, alone: onnx.ModelProto, feeds: Samples, size: int,
                evaluate: Callable[[onnx.ModelProto], Mapping[str, float]] | None) -> SweepPoint:
    """The frontier's reference point with quantize: the original quantized alone (budget 1, time 1 by definition)."""
    check = verify(original, alone, feeds)
    return SweepPoint(allocator="int8 alone", budget=1.0, params_ratio=1.0, flops_ratio=None, latency_ratio=1.0,
                      predicted_latency_ratio=None, output_error=check.worst_relative_l2,
                      top1_agreement=check.lowest_top1_agreement, max_layer_error=0.0,
                      layers_factorized=0, tool_seconds=0.0,
                      task=dict(evaluate(alone)) if evaluate is not None else {}, size_ratio=len(
                          alone.SerializeToString()) / size)
