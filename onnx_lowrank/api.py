"""The Python API: `analyze`, `plan`, `apply`, and `compress`, which runs the three in turn.

Each function checks its keywords once (`options.checked`), builds the settings (`settings`) and a Context
(`pipeline.prepare`), and hands them to the stages through `pipeline`; nothing below validates again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import onnx

from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.graph.inputs import samples_from
from onnx_lowrank.graph.load import load_model
from onnx_lowrank.graph.runtime import DEFAULT_PROVIDER
from onnx_lowrank.math.projection import DEFAULT_SHRINKAGE
from onnx_lowrank.options import checked
from onnx_lowrank.pipeline import (Context, ModelLike, Progress, SampleSource, ShapeSpecs, finish_plan, prepare,
                                   run_analysis, run_apply, run_quantize, deploy_int8)
from onnx_lowrank.plan import Plan
from onnx_lowrank.settings import AnalysisSettings, CachePath, SpeedSettings
from onnx_lowrank.stages.allocate import allocate, smallest_budget
from onnx_lowrank.stages.analyze import OUTPUT_MEASURE, Analysis
from onnx_lowrank.stages.judge import choose_plan
from onnx_lowrank.stages.report import Report
from onnx_lowrank.stages.search import search_budget

__all__ = ["analyze", "plan", "apply", "compress"]


@checked
def analyze(
    model: ModelLike,
    *,
    input_shapes: ShapeSpecs = None,
    inputs: SampleSource = None,
    calibration: SampleSource = None,
    weight_only: bool = False,
    shrinkage: float = DEFAULT_SHRINKAGE,
    exclude: str | None = None,
    max_groups: int = 8,
    rank_multiple: int = 1,
    method: str | None = None,
    allow_slower: bool = False,
    threads: int | None = None,
    provider: str = DEFAULT_PROVIDER,
    latency_cache: CachePath = True,
    timer: object | None = None,
    progress: Progress | None = None,
) -> Analysis:
    """Find the factorizable layers and every candidate (k, rank) with its error and costs.

    With `calibration` (an .npz, a folder of .npz, or a list of feed dicts) every layer is decomposed on its real
    inputs and errors are relative output errors; `inputs` alone calibrates too unless `weight_only`. FLOPs are
    counted, and latencies measured, when every input shape is known (static in the model, from `input_shapes` such
    as ``{"images": (1, 3, 320, 320)}`` or ``["images:1x3x320x320"]``, or from the first sample). Latencies are
    measured in onnxruntime with `threads` and `provider` (cached in `latency_cache`; `timer`, a
    `stages.timing.Timer`, replaces the measurement), and only candidates faster than their dense layer are kept,
    unless `allow_slower`. With `method` eliminate or both (the default with calibration data), the layers whose
    output channels can be cut get width candidates too (`channel_sets`, `math.elimination`). The Analysis keeps
    the model, samples and settings, so `plan(analysis, budget)` needs nothing else.
    """
    settings = AnalysisSettings(method, shrinkage, exclude, max_groups, rank_multiple, weight_only)
    speed = SpeedSettings.of(allow_slower, None, threads, provider, latency_cache, timer)
    context = prepare(model, inputs, input_shapes, False, calibration, settings, speed)
    return run_analysis(context, progress)


@checked
def plan(
    analysis: Analysis,
    budget: float,
    *,
    metric: str = "params",
    allocator: str | None = None,
    model: ModelLike | None = None,
    calibration: SampleSource = None,
) -> Plan:
    """Choose (k, rank) per layer so the model keeps `budget` of its params or FLOPs.

    `allocator` is one of `alds`, `uniform`, `energy` (see `stages.allocate`), or `auto`: each of those is built and
    run on the calibration samples and the plan whose outputs move least wins. The default is `auto` for a
    calibrated analysis and `alds` otherwise. The model and samples are the analysis' own; `model` and
    `calibration` replace them.
    """
    return finish_plan(_choose(analysis, budget, metric, allocator, model, calibration), analysis)


def _choose(analysis: Analysis, budget: float, metric: str, allocator: str | None, model: ModelLike | None = None,
            calibration: SampleSource = None, weight_only_plans: bool = True) -> Plan:
    chosen = _default_allocator(analysis, allocator)
    if chosen != "auto":
        return allocate(analysis, budget, metric=metric, allocator=chosen)
    context: Context | None = analysis.context
    proto = load_model(model) if model is not None else None if context is None else context.model
    if calibration is not None and proto is not None:
        samples = samples_from(calibration, proto)
    else:
        samples = None if context is None else context.calibration
    if proto is None or samples is None:
        raise InvalidOptionError("The auto allocator compares plans end to end on the calibration samples: this "
                                 "analysis has none; pass model= and calibration=.")
    speed, feed = (None, None) if context is None else (context.speed, context.timing_feed)
    return choose_plan(proto, analysis, budget, metric, samples, speed, weight_only_plans, feed)


def _default_allocator(analysis: Analysis, allocator: str | None) -> str:
    if allocator is None:
        return "auto" if analysis.measure == OUTPUT_MEASURE else "alds"
    if allocator == "auto" and analysis.measure != OUTPUT_MEASURE:
        few = None if analysis.context is None else analysis.context.few_samples
        if few is not None:
            raise InvalidOptionError(f"The auto allocator needs at least 4 calibration samples ({few} given, too few "
                                     "to tell a data-aware plan from an overfitted one): give more, or choose "
                                     "--allocator alds.")
        raise InvalidOptionError("The auto allocator needs calibration data (--calibration or --inputs).")
    return allocator


@checked
def apply(
    model: ModelLike,
    plan: Plan,
    *,
    inputs: SampleSource = None,
    input_shapes: ShapeSpecs = None,
    verify: bool = True,
    analysis: Analysis | None = None,
    calibration: SampleSource = None,
    weight_only: bool = False,
    refit: bool = False,
    threads: int | None = None,
    provider: str = DEFAULT_PROVIDER,
    timer: object | None = None,
    quantize: str | None = None,
    upgrade_opset: bool = False,
) -> tuple[onnx.ModelProto, Report]:
    """Rewrite the layers `plan` names into their factorized or narrowed form; check the result in onnxruntime
    unless told not to. With `quantize` (and `upgrade_opset`), as `compress`: the result is quantized by
    onnxruntime, compared with the original quantized the same way, and ours + int8 is what is returned.

    Returns the new ModelProto (the input is not modified) and a Report. Pass the `analysis` the plan came from to
    reuse its decompositions, calibration and latency costs; without it the model is analysed again (on
    `calibration` if given, or on `inputs` unless `weight_only`; layers are not timed) with the settings the plan
    recorded, so the same model and samples give the same bytes; a plan whose settings are weight-only (the auto
    judge chose the weights alone, or calibration had too few samples) is written from the weights alone, with or
    without `analysis`. A plan made for another model is refused. `refit`
    (or a plan made with refit) re-fits every decoder on the calibration samples (see `stages.refit`).
    Verification also times both models with `threads` and `provider`.
    """
    start = time.perf_counter()
    if analysis is not None:  # analysed already: its settings are the ones that count
        recorded = AnalysisSettings() if analysis.context is None else analysis.context.settings
    else:
        recorded = plan.settings or _version1_settings(plan)
    settings = replace(recorded, weight_only=weight_only or recorded.weight_only)
    speed = SpeedSettings.of(True, None, threads, provider, False, timer)
    context = prepare(model, inputs, input_shapes, verify, calibration, settings, speed,
                      few_samples_fallback=False)  # the plan's settings say whether it is weight-only
    if plan.model is not None and plan.model != context.fingerprint:
        raise InvalidOptionError(f"The plan was made for another model (fingerprint {plan.model}, this one "
                                 f"{context.fingerprint}): apply it to the model it was planned on, or plan again.")
    seconds = {"load": time.perf_counter() - start}
    if analysis is not None:  # in-sample only if the given analysis was calibrated on the very samples verified on
        same = bool(analysis.calibration_key) and context.feeds is not None and (
            analysis.calibration_key == context.feeds.key)
        context = replace(context, in_sample=same)
    else:
        start = time.perf_counter()
        analysis = run_analysis(context)
        seconds["analyze"] = time.perf_counter() - start
    if quantize is None:
        return run_apply(context, plan, verify, analysis, seconds, refit or bool(plan.refit))
    start = time.perf_counter()
    context, alone = deploy_int8(context, quantize, upgrade_opset)  # a quantized input is refused here
    seconds["int8 alone"] = time.perf_counter() - start
    compressed, report = run_apply(context, plan, verify, analysis, seconds, refit or bool(plan.refit))
    start = time.perf_counter()
    compressed, report = run_quantize(context, compressed, report, alone, verify)
    seconds["quantize"] = time.perf_counter() - start
    return compressed, report


def _version1_settings(plan: Plan) -> AnalysisSettings:
    """How a version 1 plan (no recorded settings) is analysed again: up to its largest k, with the defaults, and
    narrowing if it narrows."""
    return AnalysisSettings(method="both" if plan.widths else "lowrank",
                            max_groups=max((k for k, _ in plan.layers.values()), default=1))


@checked
def compress(
    model: ModelLike,
    budget: float | None = None,
    *,
    metric: str = "params",
    allocator: str | None = None,
    calibration: SampleSource = None,
    weight_only: bool = False,
    refit: bool = False,
    shrinkage: float = DEFAULT_SHRINKAGE,
    target_error: float | None = None,
    evaluate: Callable[[onnx.ModelProto], float] | None = None,
    min_score: float | None = None,
    rank_multiple: int = 1,
    max_groups: int = 8,
    method: str | None = None,
    exclude: str | None = None,
    inputs: SampleSource = None,
    input_shapes: ShapeSpecs = None,
    verify: bool = True,
    allow_slower: bool = False,
    threads: int | None = None,
    provider: str = DEFAULT_PROVIDER,
    latency_cache: CachePath = True,
    timer: object | None = None,
    quantize: str | None = None,
    upgrade_opset: bool = False,
    progress: Progress | None = None,
) -> tuple[onnx.ModelProto, Report]:
    """Compress `model`: analyze, plan, apply, verify. Returns the compressed ModelProto and a Report.

    Give either a `budget` (the fraction in (0, 1] of the model's `metric` to keep: params, flops, or latency,
    its measured time in onnxruntime) or a target: `target_error` (the smallest model whose verified relative
    output error on `inputs` stays <= it) or `evaluate` (model -> score, higher is better) with `min_score` (the
    smallest model scoring at least that). A target is met by searching the budget with verification in the loop;
    the report lists the steps.

    With `calibration` (or `inputs`, unless `weight_only`) every layer is decomposed on its real inputs (see
    `math.projection`), the default allocator is `auto` and the default `method` is `both` for every metric (layers
    are narrowed or factorized); with fewer than 4 independent calibration samples (rows of a batch count) no plan
    can be checked on samples that did not fit it, so the compression is weight-only and the report says so
    (unless `method` eliminate or both, or `refit`, asks for data). Every layer is timed in onnxruntime with the
    deployment's `threads` and `provider`
    (cached in `latency_cache`, see `stages.latency_cache`; `timer` replaces the measurement), and a layer is only
    factorized into a form measured faster than it, unless `allow_slower`. Verification times both models and
    reports the speedup. The report's plan records the settings, so `apply(model, report.plan, ...)` with the same
    samples writes the same model.

    With `quantize` ("int8": static QDQ calibrated on the calibration samples; "int8-dynamic") the model is planned
    for its int8 form (`pipeline.deploy_int8`: layers, the latency budget and the never-slower check timed
    quantized, against int8 alone; the `auto` judge and a target checked on the quantized models), the compressed
    model is quantized by onnxruntime (`stages.quantize`), and so is the original, the same way: the model returned
    is ours + int8, verified on `inputs`, and the report compares the original, int8 alone and ours + int8 in size,
    measured time and output error (`report.deployment`). `upgrade_opset` converts a model below opset 13 first,
    for per-channel weights.
    """
    targeted = target_error is not None or evaluate is not None or min_score is not None
    if targeted == (budget is not None):
        raise InvalidOptionError("Give either a budget or a target (target_error, or evaluate with min_score).")
    if (evaluate is None) != (min_score is None):
        raise InvalidOptionError("evaluate and min_score go together: the search keeps models scoring >= min_score.")
    if target_error is not None and evaluate is not None:
        raise InvalidOptionError("Give target_error or evaluate with min_score, not both.")
    total_start = time.perf_counter()
    start = time.perf_counter()
    settings = AnalysisSettings(method, shrinkage, exclude, max_groups, rank_multiple, weight_only,
                                int8=quantize is not None)
    speed = SpeedSettings.of(allow_slower, metric, threads, provider, latency_cache, timer)
    context = prepare(model, inputs, input_shapes, verify or target_error is not None, calibration, settings, speed,
                      need_shapes=metric != "params",  # flops and latency need shapes: say so now
                      few_samples_fallback=not refit)  # refit fits the decoders on the samples, however few
    seconds = {"load": time.perf_counter() - start}
    alone = None
    if quantize is not None:  # a quantized input is refused here, before any work
        start = time.perf_counter()
        context, alone = deploy_int8(context, quantize, upgrade_opset)
        seconds["int8 alone"] = time.perf_counter() - start
    start = time.perf_counter()
    analysis = run_analysis(context, progress)
    seconds["analyze"] = time.perf_counter() - start
    start = time.perf_counter()

    def make_plan(fraction: float) -> Plan:
        return finish_plan(_choose(analysis, fraction, metric, allocator, weight_only_plans=not refit), analysis,
                           refit)  # a weight-only plan has no data to refit its decoders on

    if not targeted:
        chosen = make_plan(budget)
        seconds["plan"] = time.perf_counter() - start
        compressed, report = run_apply(context, chosen, verify, analysis, seconds, refit, progress=progress)
    else:
        chosen_allocator = _default_allocator(analysis, allocator)
        low = smallest_budget(analysis, metric, "alds" if chosen_allocator == "auto" else chosen_allocator)

        def written(candidate: Plan):  # with --quantize, the target is checked on ours + int8, as deployed
            compressed, report = run_apply(context, candidate, target_error is not None, analysis, {}, refit,
                                           time_models=False)
            if alone is None:
                return compressed, report
            return run_quantize(context, compressed, report, alone, target_error is not None, time_models=False)

        empty = finish_plan(Plan(layers={}, allocator=chosen_allocator, metric=metric, budget=1.0, threshold=0.0),
                            analysis, refit)
        best, steps, goal = search_budget(make_plan, written, low, empty, metric, target_error, evaluate, min_score,
                                          progress)
        seconds["search"] = time.perf_counter() - start
        compressed, report = run_apply(context, best, verify, analysis, seconds, refit, progress=progress)
        report = replace(report, search=steps, search_goal=goal)
    if alone is not None:
        start = time.perf_counter()
        compressed, report = run_quantize(context, compressed, report, alone, verify, progress)
        seconds["quantize"] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - total_start
    return compressed, report
