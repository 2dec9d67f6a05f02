"""The Context every stage reads, and the runner that takes a model through the stages in order.

    prepare -> Context -> analyze -> Analysis (holds its Context) -> plan -> Plan -> apply -> (model, Report)

A Context is made once per call (`prepare`): the loaded model with its fingerprint, its input shapes, the samples to
calibrate and verify on, and the validated settings. An `Analysis` keeps its Context, so planning and applying it
need nothing else; a `Plan` records the settings and the model's fingerprint, so applying it later to the same
model reproduces the same bytes and applying it to another is refused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import onnx

from onnx_lowrank.errors import InvalidModelError, InvalidOptionError, SlowerModelError
from onnx_lowrank.graph import runtime
from onnx_lowrank.graph.constant_inputs import constant_initializer_inputs
from onnx_lowrank.graph.inputs import (Samples, assumed_sizes_note, batch_can_be_cut, feed_rows, parse_shape_specs,
                                       random_feeds, resolve_shapes, sample_units, samples_from)
from onnx_lowrank.graph.load import check_model, fingerprint, load_model
from onnx_lowrank.graph.shapes import tensor_shapes
from onnx_lowrank.ops.base import FAMILIES
from onnx_lowrank.plan import Plan
from onnx_lowrank.settings import AnalysisSettings, SpeedSettings
from onnx_lowrank.stages.analyze import OUTPUT_MEASURE, Analysis, analyze_chains, analyze_layers, weight_only
from onnx_lowrank.stages.apply import Written, check_plan, write_plan
from onnx_lowrank.stages.calibrate import calibrate
from onnx_lowrank.stages.channel_sets import find_chains
from onnx_lowrank.stages.deployment import Int8Alone, choose_activations, choose_ranges, compare_deployed
from onnx_lowrank.stages.discover import discover
from onnx_lowrank.stages.judge import MIN_CALIBRATION_UNITS, calibration_split, fold_statistics
from onnx_lowrank.stages.layer_timing import block_size, latency_cost
from onnx_lowrank.stages.parallel import single_threaded_blas
from onnx_lowrank.stages.quantize import Quantization, plan_quantization, quantize, with_shapes
from onnx_lowrank.stages.report import Report, build_report
from onnx_lowrank.stages.timing import MEASUREMENTS, LatencyComparison, SpeedCheck, compare_models
from onnx_lowrank.stages.verify import verify

__all__ = ["Context", "prepare", "run_analysis", "finish_plan", "written_with", "run_apply", "deploy_int8",
           "run_quantize", "keep_speed_promise", "ModelLike", "ShapeSpecs", "SampleSource", "Progress"]

ModelLike = str | os.PathLike | onnx.ModelProto
ShapeSpecs = Mapping[str, Sequence[int]] | Sequence[str] | None
SampleSource = str | os.PathLike | Sequence[Mapping[str, np.ndarray]] | None
Progress = Callable[[str, int, int | None], None]
"""progress(stage, done, total): called as calibration samples, timed, analysed and applied layers, verification
samples and search steps complete (total None if unknown)."""

_RANDOM_SAMPLES = 2


@dataclass(frozen=True, eq=False)
class Context:
    """A loaded model with what every stage may need: concrete shapes, samples to verify and calibrate on, and the
    settings, validated once."""

    model: onnx.ModelProto
    input_shapes: dict[str, tuple[int, ...]] | None  # None when some input dimension is unknown
    feeds: Samples | None  # verification samples
    calibration: Samples | None = None  # None: weight-only
    in_sample: bool = False  # verification and calibration use the same samples
    settings: AnalysisSettings = AnalysisSettings()  # method resolved
    speed: SpeedSettings = SpeedSettings()
    notes: tuple[str, ...] = ()  # what was read differently from the file, in one line each
    random_verification: bool = False  # verify on random inputs at `input_shapes`, made when first needed
    needs_shapes: bool = False  # the metric counts FLOPs or time: tensor shapes must be measurable
    few_samples: int | None = None  # calibration samples given, when too few to calibrate on (weight-only instead)

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the model's graph and weights (`graph.load.fingerprint`), computed when first asked for."""
        return fingerprint(self.model)

    @cached_property
    def samples_to_verify(self) -> Samples | None:
        """The samples verification runs on: given ones, or random ones made now (a model that nothing changed
        never needs them: its inputs may be of a dtype no random data can be made for)."""
        if self.feeds is not None or not self.random_verification:
            return self.feeds
        return Samples.given(random_feeds(self.model, self.input_shapes, count=_RANDOM_SAMPLES, seed=0), "random")

    def timing_feed(self) -> dict[str, np.ndarray] | None:
        """One feed to time whole models on, at `input_shapes` (the shapes the layers are timed at, so the whole-model
        probes and checks measure what the layer timings predict): the first verification or calibration sample, its
        first rows when it is a larger batch (calibrated on a batch of 16 pages with --input-shape x:1x3x736x736, the
        whole models were timed on all 16 and the layers on one), else random."""
        for samples in (self.feeds, self.calibration):
            if samples is not None:
                feed = _at_shapes(next(iter(samples)), self.input_shapes)
                if feed is not None:
                    return feed
                break
        if self.input_shapes is None:
            return None
        return random_feeds(self.model, self.input_shapes, count=1, seed=0)[0]

    def shapes_of(self, model: onnx.ModelProto) -> dict[str, tuple[int, ...]] | None:
        """Concrete shapes of every tensor the cost model reads, or None when the input shapes are unknown."""
        if self.input_shapes is None:
            return None
        counted = {*FAMILIES, "ConvTranspose", "BatchNormalization"}  # the ops whose tensors the costs read
        names = {t for n in model.graph.node if n.op_type in counted for t in list(n.input[:2]) + list(n.output[:1])}
        constants = {t.name for t in model.graph.initializer}
        constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
        try:
            return tensor_shapes(model, self.input_shapes, sorted(names - constants - {""}))
        except InvalidModelError:  # onnxruntime cannot run the model (a custom op): FLOPs and times stay unknown
            if self.needs_shapes:
                raise
            return None


def _at_shapes(feed: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]] | None
               ) -> dict[str, np.ndarray] | None:
    """`feed` at `shapes`: itself, or its first rows where only the batch is smaller; None when it cannot be."""
    if shapes is None:
        return dict(feed)
    if set(shapes) != set(feed):
        return None
    out = {}
    for name, array in feed.items():
        want = tuple(shapes[name])
        if array.shape == want:
            out[name] = array
        elif array.ndim == len(want) >= 1 and array.shape[1:] == want[1:] and want[0] <= array.shape[0]:
            out[name] = array[: want[0]]
        else:
            return None
    return out


def _batch_note(samples: Samples, shapes: Mapping[str, tuple[int, ...]], model: onnx.ModelProto) -> tuple[str, ...]:
    """Said when a sample's batch sets the shapes the layers are sized and timed at: a batch of 16 calibration
    pages made every timing 16 times as long (19 minutes on PP-OCRv4 det), and the plan fit a batch of 16."""
    rows = feed_rows(next(iter(samples)))
    if rows <= 1 or not batch_can_be_cut(model):
        return ()
    one = " ".join(f"{name}:{'x'.join(map(str, (1, *shape[1:])))}" for name, shape in shapes.items())
    return (f"Sizes and times are those of the first sample, a batch of {rows}; to plan and time for one at a "
            f"time, give --input-shape {one}.",)


def prepare(
    model: ModelLike,
    inputs: SampleSource,
    input_shapes: ShapeSpecs,
    need_feeds: bool,
    calibration: SampleSource = None,
    settings: AnalysisSettings = AnalysisSettings(),
    speed: SpeedSettings = SpeedSettings(),
    need_shapes: bool = False,
    few_samples_fallback: bool = True,
) -> Context:
    """Load the model and settle its samples, input shapes and method. Shapes that cannot be settled are an error
    (naming every input that needs one) when verification needs feeds or the metric needs shapes, before any work.

    Calibration samples holding fewer than `judge.MIN_CALIBRATION_UNITS` independent samples (`sample_units`) are
    too few for the judge to check any data-aware plan on samples that did not fit it: unless the method needs data
    (eliminate, both asked for) or `few_samples_fallback` is off (apply, which follows the plan's settings), the
    compression is weight-only, the settings say so (a plan records it) and a note tells why. With weight-only
    settings, calibration samples only verify."""
    proto, constant_inputs = constant_initializer_inputs(load_model(model))
    overrides = parse_shape_specs(input_shapes)
    feeds = samples_from(inputs, proto) if inputs is not None else None
    calibration_samples = samples_from(calibration, proto) if calibration is not None else None
    in_sample = False
    if calibration_samples is None and feeds is not None and not settings.weight_only:
        calibration_samples, in_sample = feeds, True  # samples the user handed over should help, not only judge
    notes = _constant_inputs_note(constant_inputs)
    if feeds is not None:
        resolved = feeds.first_shapes()  # the first sample fixes the shapes FLOPs are counted at
        if overrides:  # unless --input-shape says otherwise
            resolved = resolve_shapes(proto, {**resolved, **overrides})
        else:
            notes += _batch_note(feeds, resolved, proto)
    else:
        try:
            resolved = resolve_shapes(proto, overrides)
        except InvalidOptionError:
            # the sizes are needed only if something can be compressed: a model with nothing to compress is
            # written unchanged without them
            if calibration_samples is None and (need_feeds or need_shapes) and discover(proto).layers:
                raise
            resolved = calibration_samples.first_shapes() if calibration_samples is not None else None
            if resolved is not None:
                notes += _batch_note(calibration_samples, resolved, proto)
        else:
            if calibration_samples is None:
                notes += tuple(filter(None, [assumed_sizes_note(proto, overrides)]))
        if need_feeds and calibration_samples is not None:
            feeds, in_sample = calibration_samples, True  # real samples judge better than random ones
    random_verification = need_feeds and feeds is None and resolved is not None
    few = None
    if calibration_samples is not None and (settings.weight_only or (
            few_samples_fallback and settings.method in (None, "lowrank")
            and calibration_samples.count < MIN_CALIBRATION_UNITS
            and (units := sample_units(calibration_samples, proto)) < MIN_CALIBRATION_UNITS)):
        if not settings.weight_only:  # too few to check a data-aware plan on samples that did not fit it
            notes += (f"calibration had {units} sample{'s' if units != 1 else ''}: too few to tell a data-aware plan "
                      "from an overfitted one; compressed from the weights alone; give at least "
                      f"{MIN_CALIBRATION_UNITS}.",)
            settings, few = replace(settings, weight_only=True), units
        calibration_samples, in_sample = None, False  # weight-only (a plan's recorded setting): they only verify
    return Context(model=proto, input_shapes=resolved, feeds=feeds, calibration=calibration_samples,
                   in_sample=in_sample, settings=settings.resolved(calibration_samples is not None), speed=speed,
                   notes=notes, random_verification=random_verification, needs_shapes=need_shapes, few_samples=few)


def _constant_inputs_note(names: Sequence[str]) -> tuple[str, ...]:
    if not names:
        return ()
    return (f"{len(names)} weight{'s are' if len(names) > 1 else ' is'} also listed as graph input"
            f"{'s' if len(names) > 1 else ''} (an old exporter convention, e.g. {names[0]!r}): read as constants, as "
            "onnxruntime does, and written as initializers only.",)


def run_analysis(context: Context, progress: Progress | None = None) -> Analysis:
    """Discover, calibrate, time and analyze: every layer's candidates, held with the Context they came from."""
    method = context.settings.method
    if method != "lowrank" and context.calibration is None:
        raise InvalidOptionError(f"--method {method} needs calibration data (--calibration or --inputs): which "
                                 "channels the others reproduce is read from the activations.")
    # Many small decompositions: a second BLAS thread barely helps them and, when onnxruntime or another process
    # holds the other core, makes them many times slower (measured: 1.3 s with one thread, 14-59 s with two).
    with single_threaded_blas():
        return _analysis(context, progress)


def _analysis(context: Context, progress: Progress | None) -> Analysis:
    settings = context.settings
    shapes = context.shapes_of(context.model)
    discovery = discover(context.model, shapes=shapes, exclude=settings.exclude)
    chains = find_chains(context.model, discovery) if settings.method != "lowrank" else None
    statistics = None if context.calibration is None else {}
    channel_statistics = {}
    parts = channel_parts = ()
    if context.calibration is not None and discovery.layers:
        samples = context.calibration
        calibration = calibrate(  # the channels narrowing fits its folds on, and the judge's parts, in the same pass
            context.model,
            discovery.layers,
            samples,
            tensors={} if chains is None else {name: c.window for c in chains.chains for name in c.fits},
            progress=None if progress is None else lambda done: progress("calibrating", done, samples.count),
            part_of=calibration_split(sample_units(samples, context.model)),
            by_row=batch_can_be_cut(context.model),
        )
        statistics, channel_statistics = calibration.layers, calibration.tensors
        parts, channel_parts = calibration.parts, calibration.tensor_parts
    latency = None
    timeable = shapes is not None and all(view.input_name in shapes for layer in discovery.layers
                                          for view in layer.views())
    if context.speed.measure and timeable and discovery.layers:
        latency = latency_cost(
            context.model, discovery.layers, shapes, context.speed, context.timing_feed(), settings.max_groups,
            None if progress is None else lambda done, total: progress("timing layers", done, total),
            () if chains is None else chains.chains)
    total = len(discovery.layers)
    counter = iter(range(1, total + 1))
    analysis = analyze_layers(
        context.model,
        discovery,
        shapes,
        max_groups=settings.max_groups,
        rank_multiple=settings.rank_multiple,
        progress=None if progress is None else lambda layer: progress("analyzing", next(counter), total),
        statistics=statistics,
        shrinkage=settings.shrinkage,
        calibration=None if context.calibration is None else context.calibration.source,
        calibration_key=() if context.calibration is None else context.calibration.key,
        latency=latency,
        guard=context.speed.guard and latency is not None,
    )
    analysis = replace(analysis, notes=context.notes, context=context,
                       fold_statistics=fold_statistics(parts) if parts else (),
                       fold_channels=fold_statistics(channel_parts) if parts and chains is not None else ())
    if settings.method == "lowrank":
        return analysis
    block = block_size() if latency is not None else 1  # the latency model's rank rounding, for widths
    narrowable, too_few = analyze_chains(chains.chains, statistics, channel_statistics, analysis.costs, block,
                                         guard=analysis.guarded, rounded=settings.int8)
    return replace(analysis, method=settings.method, unnarrowed=chains.skipped + too_few, chains=narrowable)


def written_with(analysis: Analysis, plan: Plan) -> Analysis:
    """The analysis `plan` is written from: a plan whose settings are weight-only (the `auto` judge chose a
    weight-only plan) is written from the weight-only analysis of a calibrated one (`analyze.weight_only`, its context
    without calibration, settings weight-only and lowrank), so its report, its JSON and `apply` agree; else
    `analysis` itself."""
    if plan.settings is None or not plan.settings.weight_only or analysis.measure != OUTPUT_MEASURE:
        return analysis
    context = analysis.context
    if context is not None:
        context = replace(context, calibration=None, in_sample=False,
                          settings=replace(context.settings, weight_only=True, method="lowrank"))
    return replace(weight_only(analysis), notes=analysis.notes, context=context,
                   thin_calibration=analysis.thin_calibration)  # what the samples could not support, still said


def finish_plan(plan: Plan, analysis: Analysis, refit: bool = False) -> Plan:
    """The plan with what reproduces it recorded: the method, the analysis settings, refit and the fingerprint of
    the model it was made for (see `plan.Plan`); of the analysis it is written from (`written_with`)."""
    writer = written_with(analysis, plan)
    context = writer.context
    return replace(plan, method=writer.method, refit=bool(refit),
                   settings=plan.settings if context is None else context.settings,
                   model=None if context is None else context.fingerprint)


def run_apply(context: Context, plan: Plan, run_verify: bool, analysis: Analysis, seconds: dict,
              refit: bool = False, time_models: bool = True, progress: Progress | None = None
              ) -> tuple[onnx.ModelProto, Report]:
    """Write `plan` into the model (`stages.apply`, from the analysis `written_with` names), check and time the
    result, and report."""
    start = time.perf_counter()
    writer = written_with(analysis, plan)
    if writer is not analysis:  # a weight-only plan: no sample fitted it
        analysis, context = writer, replace(context, in_sample=False)
    model = context.model
    check_plan(plan, analysis)
    if refit and plan.layers and context.calibration is None:
        raise InvalidOptionError("refit needs calibration data (--calibration or --inputs).")
    written = write_plan(model, analysis, plan, calibration=context.calibration if refit else None,
                         progress=None if progress is None else lambda done, total: progress("applying", done, total))
    compressed = written.model
    seconds["apply"] = time.perf_counter() - start
    changed = bool(plan.layers or plan.widths)

    verification = timing = check = None
    if run_verify and changed:
        start = time.perf_counter()
        check_model(compressed, full_check=True)  # by path (weights not read) when large or lazily loaded
        seconds["verify"] = time.perf_counter() - start
        if time_models:
            start = time.perf_counter()
            # unguarded, nothing is decided from it: one measurement (one pair of sessions), reported as such
            timing = compare_models(model, compressed, [context.timing_feed()], context.speed,
                                    measurements=MEASUREMENTS if analysis.guarded else 1)
            if analysis.guarded:
                plan, written, timing, check = _whole_model_check(context, analysis, plan, written, timing, refit)
                compressed, changed = written.model, bool(plan.layers or plan.widths)
            seconds["time"] = time.perf_counter() - start
        start = time.perf_counter()
        samples = context.samples_to_verify
        verification = verify(model, compressed, samples, None if progress is None else
                              lambda done: progress("verifying", done, samples.count)) if changed else None
        seconds["verify"] += time.perf_counter() - start

    report = build_report(
        analysis, plan, written, compressed,
        after_shapes=context.shapes_of(compressed) if changed else None,
        verification=verification,
        verified_on=context.samples_to_verify.source if verification is not None else None,
        seconds=seconds,
        in_sample=context.in_sample and verification is not None,
        refit=refit and changed,
        latency=timing,
        speed_note=_speed_note(context, analysis),
        notes=context.notes,
        few_samples=context.few_samples,
    )
    return compressed, replace(report, speed_check=check)


def deploy_int8(context: Context, mode: str, upgrade: bool) -> tuple[Context, Int8Alone]:
    """Settle the int8 recipe before planning (`quantize.plan_quantization`: a quantized input is refused here)
    and quantize the original by it (int8 alone; static QDQ with the faster activation type, measured on the
    original, and the activations' ranges whose int8 alone moved the outputs least on the calibration samples).
    Returns the context whose speed settings name that int8 form (`speed.deployed`): every model timed is timed in
    it, so the layer timings, the latency budget and the never-slower guard measure what is deployed, against int8
    alone, and the `auto` judge scores its plans quantized; and int8 alone itself."""
    quantization, notes = plan_quantization(context.model, mode, context.calibration is not None, upgrade)
    quantization = with_shapes(quantization, context.model)
    quantization, model, activation_ms = choose_activations(context.model, quantization, context.calibration,
                                                            context.timing_feed(), context.speed)
    quantization, model, range_errors = choose_ranges(context.model, quantization, context.calibration, model)
    context = replace(context, speed=replace(context.speed, deployed=quantization))
    return context, Int8Alone(quantization, model, activation_ms, tuple(notes), range_errors)


def run_quantize(context: Context, compressed: onnx.ModelProto, report: Report, alone: Int8Alone,
                 run_verify: bool, progress: Progress | None = None, time_models: bool = True
                 ) -> tuple[onnx.ModelProto, Report]:
    """The written model quantized as int8 alone was (`deploy_int8`), compared side by side with the original, int8
    alone and ours in float (`stages.deployment`) when verifying (and timed, unless not `time_models`: a search
    step). Returns ours + int8 and the report with the comparison; its verification is of ours + int8, the model
    written."""
    quantization = alone.quantization
    if progress is not None:
        progress("quantizing", 0, 1)
    ours = quantize(compressed, quantization, context.calibration)
    if progress is not None:
        progress("quantizing", 1, 1)
    feed = context.timing_feed()
    _runs_quantized(ours, feed, quantization)
    samples = context.samples_to_verify if run_verify else None
    deployment, check = compare_deployed(context.model, compressed, alone.model, ours, quantization, samples,
                                         feed if run_verify and time_models else None, context.speed,
                                         alone.activation_ms, alone.notes, alone.range_errors)
    return ours, replace(report, deployment=deployment,
                         verification=check if check is not None else report.verification,
                         verified_on=report.verified_on if check is None else samples.source)


def _runs_quantized(model: onnx.ModelProto, feed: Mapping[str, np.ndarray] | None, quantization: Quantization) -> None:
    """Ours + int8 runs in onnxruntime once before anything is written, verified or not: onnxruntime's quantizer can
    write a model its own kernels refuse (per-channel zero points of a dynamic MatMul)."""
    if feed is None:
        return
    try:
        runtime.run(runtime.session(model), feed)
    except InvalidModelError as exc:
        raise InvalidModelError(f"onnxruntime's quantization ({quantization.describe()}) of the compressed model "
                                f"does not run: {exc}; try the other --quantize mode, or compress without it and "
                                "quantize separately") from exc


def _savings(analysis: Analysis, plan: Plan) -> list[tuple[float, str, str]]:
    """(measured saving in ms, "layer" or "width", name) of every change `plan` makes, least saving first (model
    order among equals)."""
    latency = analysis.costs["latency"]
    entries = []
    for entry in analysis.layers:
        if entry.layer.name in plan.layers:
            ms = latency.factorized(entry.layer, *plan.layers[entry.layer.name])
            entries.append((0.0 if ms is None else latency.dense(entry.layer) - ms, "layer", entry.layer.name))
    for entry in analysis.chains:
        if entry.chain.name in plan.widths:
            saving = latency.narrowing_saving([(entry.chain, plan.widths[entry.chain.name])])
            entries.append((saving or 0.0, "width", entry.chain.name))
    return sorted(entries, key=lambda item: item[0])


def keep_speed_promise(context: Context, analysis: Analysis, plan: Plan, compressed: onnx.ModelProto,
                       timing: LatencyComparison, refit: bool = False
                       ) -> tuple[Plan, onnx.ModelProto, LatencyComparison, SpeedCheck]:
    """The never-slower guard's whole-model check for a model written from `plan` and timed (`timing`): what
    `run_apply` does after writing, for callers that write and time on their own (`sweep`). Returns the plan kept,
    its model, its timing and the check."""
    plan, written, timing, check = _whole_model_check(context, analysis, plan, Written(model=compressed), timing,
                                                      refit)
    return plan, written.model, timing, check


def _whole_model_check(context: Context, analysis: Analysis, plan: Plan, written, timing, refit: bool):
    """The never-slower promise about the whole model: when the written model is not measured faster than the
    original beyond noise (`LatencyComparison.faster`: the bounds of several measurements with fresh sessions),
    take out the planned changes with the least measured saving (1, then 1, 2, 4, ... more), writing and timing
    again, until it is. When none is, a plan that narrows is written with its narrowed layers alone unless that model
    is slower beyond noise and by more than one per-node overhead (fewer channels on the channel block and no extra
    node: a narrowed model is not slower unless measured so, and by more than the smallest cost a node can add), and
    the check says the promise was not shown; else nothing is written (`SlowerModelError`). Not "not slower beyond noise" either:
    5 measurements cannot tell 3-7% apart on a 0.1 ms model, and models written on that ground (bytes-classifier,
    text-transformer) measured 1.02-1.07x when timed again. A model whose every layer runs near onnxruntime's
    per-node overhead is too small for a measurement to judge: its plan stays, and the check says the promise was
    not shown. Returns (plan, written, timing, SpeedCheck)."""
    if timing.faster:
        return plan, written, timing, SpeedCheck(kept=True)
    latency = analysis.costs["latency"]
    every_layer = [entry.layer for entry in analysis.layers]
    if every_layer and all(latency.at_overhead([layer]) for layer in every_layer):
        return plan, written, timing, SpeedCheck(kept=False, note=(
            f"Measured {_measured(timing)}, not faster beyond noise; every layer of this model runs near "
            "onnxruntime's per-node overhead, too small for a measurement to judge, so the plan was kept as it was."))
    changes = _savings(analysis, plan)
    calibration = context.calibration if refit else None
    count, step = 0, 1
    while count < len(changes):
        count = min(len(changes), count + step)
        step = max(1, count)
        gone = changes[:count]
        names = {name for _, _, name in gone}
        smaller = replace(plan, layers={n: c for n, c in plan.layers.items() if n not in names},
                          widths={n: w for n, w in plan.widths.items() if n not in names})
        if not (smaller.layers or smaller.widths):
            break  # the original itself: nothing left to show faster
        again = write_plan(context.model, analysis, smaller, calibration=calibration)
        measured = compare_models(context.model, again.model, [context.timing_feed()], context.speed)
        if measured.faster:
            return smaller, again, measured, SpeedCheck(kept=True, dropped=tuple(name for _, _, name in gone))
    if plan.widths:  # narrowing alone adds no node and only drops channels: not slower unless measured so
        narrowed = replace(plan, layers={})
        again = write_plan(context.model, analysis, narrowed, calibration=calibration) if plan.layers else written
        measured = compare_models(context.model, again.model, [context.timing_feed()],
                                  context.speed) if plan.layers else timing
        extra_ms = measured.compressed_ms - measured.original_ms
        if not (measured.slower and extra_ms > latency.overhead_ms):  # less than a node's cost: not the narrowing's
            return narrowed, again, measured, SpeedCheck(kept=False, dropped=tuple(plan.layers), note=(
                f"Measured {_measured(measured)} with only the narrowed layers: not faster beyond noise, and not "
                "slower (narrowing adds no node and drops channels on onnxruntime's channel block); the "
                f"never-slower promise was not shown{' (the factorized layers were kept dense)' if plan.layers else ''}."))
    raise SlowerModelError(
        f"The compressed model was measured at {_measured(timing)}, not faster than {timing.baseline} beyond noise, "
        "and neither was any plan with the least-saving layers taken out: the never-slower guard wrote nothing. Use a "
        "higher budget, --exclude the slow layers, or --allow-slower to write it knowingly.")


def _measured(timing: LatencyComparison) -> str:
    """'1.027x of the original's time (0.991-1.064 over 5 measurements)': the ratio and its bounds (of int8 alone's
    time when the models were timed in their int8 form)."""
    bounds = timing.bounds
    spread = "" if bounds is None else (f" ({bounds[0]:.3f}-{bounds[1]:.3f} over {len(timing.pair_ratios)} "
                                        "measurements)")
    return f"{timing.ratio:.3f}x of {timing.baseline}'s time{spread}"


def _speed_note(context: Context, analysis: Analysis) -> str | None:
    """Why latency was not measured, when the user asked for it to be."""
    if context.speed.guard and not analysis.guarded and analysis.layers:
        return ("Layers were not timed (some input shape is unknown: give --input-shape), so the never-slower "
                "guard was off.")
    return None

