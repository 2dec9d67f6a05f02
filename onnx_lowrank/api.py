"""The Python API: `analyze`, `plan`, `apply`, and `compress`, which runs the three in turn.

Each stage is a module (discover, calibrate, analyze, allocate, select, refit, passes, verify, report); this one
only wires them together and times them.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import onnx

from onnx_lowrank.stages.allocate import allocate, plan_cost, smallest_budget
from onnx_lowrank.stages.analyze import (OUTPUT_MEASURE, Analysis, analyze_chains, analyze_layers, cuts_of, default_method,
                      factors_of, width_alignment)
from onnx_lowrank.stages.channel_sets import find_chains
from onnx_lowrank.stages.calibrate import calibrate
from onnx_lowrank.stages.cost_models import LatencyCost
from onnx_lowrank.stages.discover import Layer, discover
from onnx_lowrank.errors import InvalidModelError, InvalidOptionError
from onnx_lowrank.options import checked
from onnx_lowrank.graph.inputs import Samples, assumed_sizes_note, parse_shape_specs, random_feeds, resolve_shapes, samples_from
from onnx_lowrank.stages.timing import measure_latency_ratio
from onnx_lowrank.stages.latency_cache import LatencyCache, default_cache_path, model_key
from onnx_lowrank.stages.layer_timing import block_size, measure_layers, narrowing_grid, realized_fraction, realized_narrowing
from onnx_lowrank.graph.load import check_model, load_model
from onnx_lowrank.stages.parallel import single_threaded_blas
from onnx_lowrank.passes import eliminate_channels, factorize_layers
from onnx_lowrank.graph.constant_inputs import constant_initializer_inputs
from onnx_lowrank.plan import Plan
from onnx_lowrank.math.projection import DEFAULT_SHRINKAGE
from onnx_lowrank.stages.refit import refit_factors
from onnx_lowrank.stages import costs as cost
from onnx_lowrank.stages.report import LayerRow, NarrowedRow, Report, SearchStep, nothing_to_compress
from onnx_lowrank.graph.runtime import DEFAULT_PROVIDER, RuntimeSettings
from onnx_lowrank.stages.judge import choose_plan
from onnx_lowrank.graph.shapes import tensor_shapes
from onnx_lowrank.stages.verify import verify

__all__ = ["analyze", "plan", "apply", "compress"]

ModelLike = str | os.PathLike | onnx.ModelProto
ShapeSpecs = Mapping[str, Sequence[int]] | Sequence[str] | None
SampleSource = str | os.PathLike | Sequence[Mapping[str, np.ndarray]] | None
Progress = Callable[[str, int, int | None], None]
"""progress(stage, done, total): called as calibration samples, timed, analysed and applied layers, verification
samples and search steps complete (total None if unknown)."""
CachePath = str | os.PathLike | bool
"""Where measured latencies are cached: True for the default file (see `latency_cache`), False for none, or a path."""

_COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization")
_RANDOM_SAMPLES = 2
_SEARCH_RESOLUTION = 0.01
_TIMED_ROUNDS = 20  # interleaved rounds when verification times the original and the compressed model


@dataclass(frozen=True)
class _Speed:
    """How latency enters: the deployment's session settings, the cache file, whether layers are timed at all and
    whether the never-slower guard filters candidates."""

    settings: RuntimeSettings = RuntimeSettings()
    cache: CachePath = True
    measure: bool = False
    guard: bool = False

    @classmethod
    def of(cls, allow_slower: bool, metric: str | None, threads: int | None, provider: str, cache: CachePath) -> _Speed:
        settings = RuntimeSettings(threads=threads, provider=provider)
        return cls(settings, cache, measure=not allow_slower or metric == "latency", guard=not allow_slower)

    def open_cache(self) -> LatencyCache:
        if self.cache is True:
            return LatencyCache(default_cache_path())
        return LatencyCache(None if self.cache is False else self.cache)


@dataclass(frozen=True, eq=False)
class _Workspace:
    """A loaded model with what every stage may need: concrete shapes, samples to verify on, calibration samples."""

    model: onnx.ModelProto
    input_shapes: dict[str, tuple[int, ...]] | None  # None when some input dimension is unknown
    feeds: Samples | None  # verification samples
    calibration: Samples | None = None  # None: weight-only
    in_sample: bool = False  # verification and calibration use the same samples
    speed: _Speed = _Speed()
    notes: tuple[str, ...] = ()  # what was read differently from the file, in one line each
    random_verification: bool = False  # verify on random inputs at `input_shapes`, made when first needed
    needs_shapes: bool = False  # the metric counts FLOPs or time: tensor shapes must be measurable

    @cached_property
    def samples_to_verify(self) -> Samples:
        """The samples verification runs on: given ones, or random ones made now (a model that nothing changed
        never needs them: its inputs may be of a dtype no random data can be made for)."""
        if self.feeds is not None or not self.random_verification:
            return self.feeds
        return Samples.given(random_feeds(self.model, self.input_shapes, count=_RANDOM_SAMPLES, seed=0), "random")

    def timing_feed(self) -> dict[str, np.ndarray] | None:
        """One sample to time whole models on: the first verification or calibration sample, else random."""
        for samples in (self.feeds, self.calibration):
            if samples is not None:
                return next(iter(samples))
        if self.input_shapes is None:
            return None
        return random_feeds(self.model, self.input_shapes, count=1, seed=0)[0]

    def shapes_of(self, model: onnx.ModelProto) -> dict[str, tuple[int, ...]] | None:
        """Concrete shapes of every tensor the cost model reads, or None when the input shapes are unknown."""
        if self.input_shapes is None:
            return None
        names = {t for n in model.graph.node if n.op_type in _COUNTED_OPS for t in list(n.input[:2]) + list(n.output[:1])}
        constants = {t.name for t in model.graph.initializer}
        constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
        try:
            return tensor_shapes(model, self.input_shapes, sorted(names - constants - {""}))
        except InvalidModelError:  # onnxruntime cannot run the model (a custom op): FLOPs and times stay unknown
            if self.needs_shapes:
                raise
            return None


def _prepare(
    model: ModelLike,
    inputs: SampleSource,
    input_shapes: ShapeSpecs,
    need_feeds: bool,
    calibration: SampleSource = None,
    weight_only: bool = False,
    speed: _Speed = _Speed(),
    need_shapes: bool = False,
) -> _Workspace:
    """Load the model and settle its samples and input shapes. Shapes that cannot be settled are an error (naming
    every input that needs one) when verification needs feeds or the metric needs shapes, before any work."""
    proto, constant_inputs = constant_initializer_inputs(load_model(model))
    if weight_only and calibration is not None:
        raise InvalidOptionError("calibration data and weight_only contradict each other; give one or the other.")
    overrides = parse_shape_specs(input_shapes)
    feeds = samples_from(inputs, proto) if inputs is not None else None
    calibration_samples = samples_from(calibration, proto) if calibration is not None else None
    in_sample = False
    if calibration_samples is None and feeds is not None and not weight_only:
        calibration_samples, in_sample = feeds, True  # samples the user handed over should help, not only judge
    notes = _constant_inputs_note(constant_inputs)
    if feeds is not None:
        resolved = feeds.first_shapes()  # the first sample fixes the shapes FLOPs are counted at
    else:
        try:
            resolved = resolve_shapes(proto, overrides)
        except InvalidOptionError:
            # the sizes are needed only if something can be compressed: a model with nothing to compress is
            # written unchanged without them
            if calibration_samples is None and (need_feeds or need_shapes) and discover(proto).layers:
                raise
            resolved = calibration_samples.first_shapes() if calibration_samples is not None else None
        else:
            if calibration_samples is None:
                notes += tuple(filter(None, [assumed_sizes_note(proto, overrides)]))
        if need_feeds and calibration_samples is not None:
            feeds, in_sample = calibration_samples, True  # real samples judge better than random ones
    random_verification = need_feeds and feeds is None and resolved is not None
    return _Workspace(model=proto, input_shapes=resolved, feeds=feeds, calibration=calibration_samples,
                      in_sample=in_sample, speed=speed, notes=notes, random_verification=random_verification,
                      needs_shapes=need_shapes)


def _constant_inputs_note(names: Sequence[str]) -> tuple[str, ...]:
    if not names:
        return ()
    return (f"{len(names)} weight{'s are' if len(names) > 1 else ' is'} also listed as graph input"
            f"{'s' if len(names) > 1 else ''} (an old exporter convention, e.g. {names[0]!r}): read as constants, as "
            "onnxruntime does, and written as initializers only.",)


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
    progress: Progress | None = None,
) -> Analysis:
    """Find the factorizable layers and every candidate (k, rank) with its error and costs.

    With `calibration` (an .npz, a folder of .npz, or a list of feed dicts) every layer is decomposed on its real
    inputs and errors are relative output errors; `inputs` alone calibrates too unless `weight_only`. FLOPs are
    counted, and latencies measured, when every input shape is known (static in the model, from `input_shapes` such
    as ``{"images": (1, 3, 320, 320)}`` or ``["images:1x3x320x320"]``, or from the first sample). Latencies are
    measured in onnxruntime with `threads` and `provider` (cached in `latency_cache`), and only candidates faster
    than their dense layer are kept, unless `allow_slower`. With `method` eliminate or both (the default with
    calibration data), the layers whose output channels can be cut get width candidates too (`chains`,
    `elimination`).
    """
    speed = _Speed.of(allow_slower, None, threads, provider, latency_cache)
    workspace = _prepare(model, inputs, input_shapes, False, calibration, weight_only, speed)
    method = method or default_method(workspace.calibration is not None)
    return _analyze(workspace, exclude, max_groups, rank_multiple, shrinkage, progress, method)


def _analyze(workspace: _Workspace, exclude, max_groups, rank_multiple, shrinkage, progress,
             method: str = "lowrank") -> Analysis:
    # Many small decompositions: a second BLAS thread barely helps them and, when onnxruntime or another process
    # holds the other core, makes them many times slower (measured: 1.3 s with one thread, 14-59 s with two).
    if method != "lowrank" and workspace.calibration is None:
        raise InvalidOptionError(f"--method {method} needs calibration data (--calibration or --inputs): which "
                                 "channels the others reproduce is read from the activations.")
    with single_threaded_blas():
        return _analyze_serial(workspace, exclude, max_groups, rank_multiple, shrinkage, progress, method)


def _analyze_serial(workspace: _Workspace, exclude, max_groups, rank_multiple, shrinkage, progress,
                    method: str = "lowrank") -> Analysis:
    shapes = workspace.shapes_of(workspace.model)
    discovery = discover(workspace.model, shapes=shapes, exclude=exclude)
    chains = find_chains(workspace.model, discovery) if method != "lowrank" else None
    statistics = None if workspace.calibration is None else {}
    channel_statistics = {}
    if workspace.calibration is not None and discovery.layers:
        samples = workspace.calibration
        calibration = calibrate(  # the channels narrowing fits its folds on are read in the same pass
            workspace.model,
            discovery.layers,
            samples,
            tensors={} if chains is None else {name: c.window for c in chains.chains for name in c.fits},
            progress=None if progress is None else lambda done: progress("calibrating", done, samples.count),
        )
        statistics, channel_statistics = dict(calibration.layers), calibration.tensors
    latency = None
    timeable = shapes is not None and all(view.input_name in shapes for layer in discovery.layers
                                          for view in layer.views())
    if workspace.speed.measure and timeable and discovery.layers:
        latency = _measure_latency(workspace, discovery.layers, shapes, max_groups, progress,
                                   () if chains is None else chains.chains)
    total = len(discovery.layers)
    counter = iter(range(1, total + 1))
    analysis = analyze_layers(
        workspace.model,
        discovery,
        shapes,
        max_groups=max_groups,
        rank_multiple=rank_multiple,
        progress=None if progress is None else lambda layer: progress("analyzing", next(counter), total),
        statistics=statistics,
        shrinkage=shrinkage,
        calibration=None if workspace.calibration is None else workspace.calibration.source,
        calibration_key=() if workspace.calibration is None else workspace.calibration.key,
        latency=latency,
        guard=workspace.speed.guard and latency is not None,
    )
    if method == "lowrank":
        return replace(analysis, notes=workspace.notes)
    block = block_size() if latency is not None else 1  # the latency model's rank rounding, for widths
    narrowable, too_few = analyze_chains(chains.chains, statistics, channel_statistics, analysis.costs, block,
                                         guard=analysis.guarded)
    return replace(analysis, notes=workspace.notes, method=method, unnarrowed=chains.skipped + too_few,
                   chains=narrowable)


def _measure_latency(workspace: _Workspace, layers: Sequence[Layer], shapes, max_groups: int,
                     progress: Progress | None, chains: Sequence = ()) -> LatencyCost:
    """Time every layer's dense and factorized forms, and the narrowed forms of the layers `chains` may cut (or
    read them from the cache), the whole original model, and the fractions of the layers' savings a factorized and
    a narrowed model really deliver (`layer_timing.realized_fraction`, `realized_narrowing`).

    The whole-model numbers are cached with the layers' and measured again whenever a layer was: every part of the
    prediction then comes from the same period of this machine's speed.
    """
    speed = workspace.speed
    cache = speed.open_cache()
    block = block_size()
    narrowing: dict[str, tuple[list[int], list[int]]] = {}
    for chain in chains:
        grid = narrowing_grid(chain.channels, width_alignment(chain, block))
        for layer in chain.producers:
            narrowing[layer.name] = (grid, narrowing.get(layer.name, ([], []))[1])
        for layer in chain.readers:
            narrowing[layer.name] = (narrowing.get(layer.name, ([], []))[0], grid)
    timings = measure_layers(
        workspace.model, layers, shapes, speed.settings, cache, max_groups=max_groups,
        progress=None if progress is None else lambda done, total: progress("timing layers", done, total),
        narrowing=narrowing,
    )
    feed = workspace.timing_feed()
    key = model_key(workspace.model, {name: value.shape for name, value in feed.items()}, speed.settings)
    keys = (None, None, None) if key is None else (key + "/total", key + "/realized", key + "/narrowed")
    cached = (None, None, None) if key is None or cache.changed else tuple(cache.get(k) for k in keys)
    total, realized, narrowed = cached
    if total is None or realized is None:
        total, realized = realized_fraction(workspace.model, layers, timings, feed, speed.settings)
    latency = LatencyCost(total=total, timings=timings, realized=realized, settings=speed.settings)
    if chains and narrowed is None:
        narrowed = realized_narrowing(workspace.model, chains, latency, feed, speed.settings)
    latency = replace(latency, realized_narrowing=1.0 if narrowed is None else narrowed)
    if key is not None:
        for name, value in zip(keys, (total, realized, narrowed)):
            if value is not None:
                cache.put(name, value)
    cache.save()
    return latency


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

    `allocator` is one of `alds`, `uniform`, `energy` (see `allocate`), or `auto`: each of those is built and run
    on the calibration samples and the plan whose outputs move least wins (it needs `model` and `calibration`).
    The default is `auto` for a calibrated analysis and `alds` otherwise.
    """
    chosen = _default_allocator(analysis, allocator)
    if chosen != "auto":
        return allocate(analysis, budget, metric=metric, allocator=chosen)
    if model is None or calibration is None:
        raise InvalidOptionError("The auto allocator compares plans end to end: pass model= and calibration=.")
    proto = load_model(model)
    return choose_plan(proto, analysis, budget, metric, samples_from(calibration, proto))


def _default_allocator(analysis: Analysis, allocator: str | None) -> str:
    if allocator is None:
        return "auto" if analysis.measure == OUTPUT_MEASURE else "alds"
    if allocator == "auto" and analysis.measure != OUTPUT_MEASURE:
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
) -> tuple[onnx.ModelProto, Report]:
    """Rewrite the layers `plan` names into their factorized form; check the result in onnxruntime unless told not to.

    Returns the new ModelProto (the input is not modified) and a Report. Pass the `analysis` the plan came from to
    reuse its decompositions, calibration and latency costs; without it the model is analysed again (on
    `calibration` if given, or on `inputs` unless `weight_only`; layers are not timed). `refit` re-fits every
    decoder on the calibration samples (see `refit`). Verification also times both models with `threads` and
    `provider`.
    """
    start = time.perf_counter()
    speed = _Speed.of(True, None, threads, provider, False)
    workspace = _prepare(model, inputs, input_shapes, verify, calibration, weight_only, speed)
    seconds = {"load": time.perf_counter() - start}
    if analysis is not None:  # in-sample only if the given analysis was calibrated on the very samples verified on
        same = bool(analysis.calibration_key) and workspace.feeds is not None and (
            analysis.calibration_key == workspace.feeds.key)
        workspace = replace(workspace, in_sample=same)
    if analysis is None:  # analysing up to the plan's largest k also gives the planned error of every choice
        start = time.perf_counter()
        analysis = _analyze(workspace, None, max((k for k, _ in plan.layers.values()), default=1), 1,
                            DEFAULT_SHRINKAGE, None, "both" if plan.widths else "lowrank")
        seconds["analyze"] = time.perf_counter() - start
    return _apply(workspace, plan, verify, analysis, seconds, refit)


def _apply(workspace: _Workspace, plan: Plan, run_verify: bool, analysis: Analysis, seconds: dict,
           refit: bool = False, time_models: bool = True, progress: Progress | None = None
           ) -> tuple[onnx.ModelProto, Report]:
    start = time.perf_counter()
    model = workspace.model
    layers = {a.layer.name: a for a in analysis.layers}
    _check_plan(plan, layers, analysis)
    chosen = factors_of(analysis, plan.layers,
                        None if progress is None else lambda done, total: progress("applying", done, total))
    errors: dict[str, float] = {}

    def written():  # each layer's factors go into the model as they come, and are not kept
        for layer, factors, error in chosen:
            errors[layer.name] = error
            yield layer, factors

    rewrites = written()
    changed = bool(plan.layers or plan.widths)
    cuts = cuts_of(analysis, plan.widths)  # narrowed and factorized layers are distinct: narrow first
    narrowed = eliminate_channels(model, cuts)[0] if cuts else model
    if refit and plan.layers:
        if workspace.calibration is None:
            raise InvalidOptionError("refit needs calibration data (--calibration or --inputs).")
        rewrites = refit_factors(model, list(rewrites), workspace.calibration, base=narrowed)  # needs every layer
    compressed = factorize_layers(narrowed, rewrites)[0] if plan.layers else narrowed
    seconds["apply"] = time.perf_counter() - start
    rows = [_row(entry, analysis, plan.layers.get(entry.layer.name), errors.get(entry.layer.name))
            for entry in analysis.layers]
    narrowed_rows = tuple(_narrowed_row(entry, plan.widths[entry.chain.name], folded, analysis)
                          for entry, (_, folded) in zip([c for c in analysis.chains if c.chain.name in plan.widths],
                                                        cuts))

    verification = timing = None
    if run_verify and changed:
        start = time.perf_counter()
        check_model(compressed, full_check=True)  # by path (weights not read) when large or lazily loaded
        samples = workspace.samples_to_verify
        verification = verify(model, compressed, samples, None if progress is None else
                              lambda done: progress("verifying", done, samples.count))
        seconds["verify"] = time.perf_counter() - start
        if time_models:
            start = time.perf_counter()
            timing = measure_latency_ratio(model, compressed, [workspace.timing_feed()], repeats=_TIMED_ROUNDS,
                                           settings=workspace.speed.settings)
            seconds["time"] = time.perf_counter() - start

    after_shapes = workspace.shapes_of(compressed) if changed else None
    before = {name: cost_model.total for name, cost_model in analysis.costs.items()}
    after = {}
    for name, cost_model in analysis.costs.items():
        counted = cost_model.count(compressed, after_shapes) if changed else before[name]
        after[name] = counted if counted is not None else plan_cost(analysis, plan, name)  # a time: predicted
    report = Report(
        layers=tuple(rows),
        skipped=analysis.skipped,
        before=before,
        after=after,
        plan=plan,
        verification=verification,
        verified_on=workspace.samples_to_verify.source if verification is not None else None,
        seconds=seconds,
        message=None if changed else _nothing_to_do(analysis, plan),
        measure=analysis.measure,
        calibrated_on=analysis.calibration,
        in_sample=workspace.in_sample and verification is not None,
        refit=refit and changed,
        latency=timing,
        guarded=analysis.guarded,
        speed_note=_speed_note(workspace, analysis),
        units={name: cost_model.unit for name, cost_model in analysis.costs.items()},
        notes=workspace.notes,
        narrowed=narrowed_rows,
    )
    return compressed, report


def _speed_note(workspace: _Workspace, analysis: Analysis) -> str | None:
    """Why latency was not measured, when the user asked for it to be."""
    if workspace.speed.guard and not analysis.guarded and analysis.layers:
        return ("Layers were not timed (some input shape is unknown: give --input-shape), so the never-slower "
                "guard was off.")
    return None


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
    progress: Progress | None = None,
) -> tuple[onnx.ModelProto, Report]:
    """Compress `model`: analyze, plan, apply, verify. Returns the compressed ModelProto and a Report.

    Give either a `budget` (the fraction in (0, 1] of the model's `metric` to keep: params, flops, or latency,
    its measured time in onnxruntime) or a target: `target_error` (the smallest model whose verified relative
    output error on `inputs` stays <= it) or `evaluate` (model -> score, higher is better) with `min_score` (the
    smallest model scoring at least that). A target is met by searching the budget with verification in the loop;
    the report lists the steps.

    With `calibration` (or `inputs`, unless `weight_only`) every layer is decomposed on its real inputs (see
    `projection`), the default allocator is `auto` and the default `method` is `both` (layers are narrowed or
    factorized; `lowrank` with a latency budget). Every layer is timed in onnxruntime with the deployment's
    `threads` and `provider` (cached in `latency_cache`, see `latency_cache`), and a layer is only factorized into
    a form measured faster than it, unless `allow_slower`. Verification times both models and reports the speedup.
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
    speed = _Speed.of(allow_slower, metric, threads, provider, latency_cache)
    workspace = _prepare(model, inputs, input_shapes, verify or target_error is not None, calibration, weight_only,
                         speed, need_shapes=metric != "params")  # flops and latency need shapes: say so now
    seconds = {"load": time.perf_counter() - start}
    start = time.perf_counter()
    method = method or default_method(workspace.calibration is not None, metric)
    analysis = _analyze(workspace, exclude, max_groups, rank_multiple, shrinkage, progress, method)
    seconds["analyze"] = time.perf_counter() - start
    start = time.perf_counter()

    def make_plan(fraction: float) -> Plan:
        return plan(analysis, fraction, metric=metric, allocator=allocator, model=workspace.model,
                    calibration=workspace.calibration)

    if not targeted:
        chosen = make_plan(budget)
        seconds["plan"] = time.perf_counter() - start
        compressed, report = _apply(workspace, chosen, verify, analysis, seconds, refit, progress=progress)
    else:
        compressed, report = _search(workspace, analysis, make_plan, metric, allocator, refit, verify, target_error,
                                     evaluate, min_score, seconds, progress)
    seconds["total"] = time.perf_counter() - total_start
    return compressed, report


def _search(workspace, analysis, make_plan, metric, allocator, refit, run_verify, target_error, evaluate, min_score,
            seconds, progress):
    """The smallest budget whose model meets the target, by bisection with verification in the loop.

    Budget 1.0 (nothing factorized) always meets it. Each step plans, applies and checks one budget; the interval
    halves until it is narrower than 0.01.
    """
    start = time.perf_counter()
    chosen_allocator = _default_allocator(analysis, allocator)
    low = smallest_budget(analysis, metric, "alds" if chosen_allocator == "auto" else chosen_allocator)
    steps: list[SearchStep] = []

    def check(fraction: float):
        candidate_plan = make_plan(fraction)
        compressed, report = _apply(workspace, candidate_plan, target_error is not None, analysis, {}, refit,
                                    time_models=False)
        if target_error is not None:
            value = 0.0 if report.verification is None else report.verification.worst_relative_l2
            passed = bool(value <= target_error)
        else:
            value = float(evaluate(compressed))
            passed = bool(value >= min_score)
        steps.append(SearchStep(budget=fraction, achieved=report.ratio(metric), value=value, passed=passed))
        if progress is not None:
            progress("searching", len(steps), max(len(steps), planned_steps))
        return passed, candidate_plan

    best_plan = Plan(layers={}, allocator=chosen_allocator, metric=metric, budget=1.0, threshold=0.0)
    high = 1.0
    # one check of the smallest budget, then halvings until the interval is narrower than the resolution
    planned_steps = 1 + max(0, math.ceil(math.log2(max(high - low, _SEARCH_RESOLUTION) / _SEARCH_RESOLUTION)))
    passed, candidate = check(low)
    if passed:
        best_plan, high = candidate, low
    while high - low > _SEARCH_RESOLUTION:  # when the smallest budget passed, high == low already
        middle = round((low + high) / 2, 4)
        passed_middle, candidate = check(middle)
        if passed_middle:
            best_plan, high = candidate, middle
        else:
            low = middle
    seconds["search"] = time.perf_counter() - start
    if progress is not None:
        progress("searching", len(steps), len(steps))  # done: the bar ends full
    compressed, report = _apply(workspace, best_plan, run_verify, analysis, seconds, refit, progress=progress)
    measure = "relative output error" if target_error is not None else "score"
    goal = f"{measure} <= {target_error:g}" if target_error is not None else f"score >= {min_score:g}"
    return compressed, replace(report, search=tuple(steps), search_goal=goal)


def _check_plan(plan: Plan, layers: Mapping[str, object], analysis: Analysis) -> None:
    skipped = {s.name: s.reason for s in analysis.skipped}
    for name, (k, rank) in plan.layers.items():
        if name not in layers:
            why = f" (skipped: {skipped[name]})" if name in skipped else ""
            raise InvalidOptionError(f"The plan names layer {name!r}, which is not a factorizable layer of this model{why}.")
        layer = layers[name].layer
        if layer.in_channels % k:
            raise InvalidOptionError(
                f"The plan splits layer {name!r} into k={k} groups, but its {layer.in_channels} input channels "
                f"do not divide by {k}."
            )
        if k > 1 and layer.op == "MatMul" and layer.activation_rank is None:
            raise InvalidOptionError(
                f"Layer {name!r} can only take k=1: the rank of its input is unknown (give --input-shape)."
            )
        largest = min(layer.out_channels, layer.columns // k)
        if not 1 <= rank <= largest:
            raise InvalidOptionError(f"The plan gives layer {name!r} rank {rank}; with k={k} it must be 1 to {largest}.")


def _row(entry, analysis: Analysis, choice: tuple[int, int] | None = None, error: float | None = None) -> LayerRow:
    """The report row of one layer: kept dense when `choice` is None, else factorized as (k, rank)."""
    layer = entry.layer
    k, rank = choice if choice is not None else (None, None)
    dense = choice is None
    costs = {}
    for name, cost_model in analysis.costs.items():
        before = entry.dense[name]
        costs[name] = (before, before if dense else cost_model.factorized(layer, k, rank))
    return LayerRow(
        name=layer.name,
        op=layer.op,
        weight_shape=layer.weight_shape,
        k=k,
        rank=rank,
        costs=costs,
        error=error,
        planned_error=None if dense else next((c.error for c in entry.candidates if (c.k, c.rank) == choice), None),
    )


def _narrowed_row(entry, width: int, folded, analysis: Analysis) -> NarrowedRow:
    """The report row of one narrowed layer: its channels before and after, its readers, the error and savings."""
    chain = entry.chain
    planned = next((c for c in entry.candidates if c.width == width), None)
    savings = {name: model.narrowing_saving([(chain, width)]) for name, model in analysis.costs.items()}
    savings = {name: value for name, value in savings.items() if value is not None}
    return NarrowedRow(name=chain.name, op=chain.producers[0].op, readers=tuple(r.name for r in chain.readers),
                       channels=chain.channels, width=width, error=entry.elimination.error_of(folded),
                       planned_error=None if planned is None else planned.error, savings=savings)


def _nothing_to_do(analysis: Analysis, plan: Plan) -> str:
    if not analysis.layers:
        return nothing_to_compress(analysis.skipped)
    return "The plan factorizes no layer (the budget keeps every layer dense). The model is unchanged."
