"""The `auto` allocator: build the plans of several allocators and keep the one whose outputs move least.

Min-max over data-aware layer errors is usually best, but a per-layer error does not say how much that layer's error
moves the model's outputs, and a non-uniform allocation can lose to the uniform one. So every allocator's plan for
the budget is written and run on the calibration samples next to the original, and the plan with the smallest
worst relative output error wins. The uniform baseline is always among them, so the default never loses to it on
the calibration data. With `--method both` the plans of each method alone (only factorized, only narrowed) are
among them too, so `both` never loses to either on the calibration data. Costs one extra pass over the calibration
samples per plan.

When layers are timed, a plan whose error the samples cannot tell from the best one's is as good, and the fastest
of those wins (not when the judge scored in folds, below, nor on fewer than `TIE_ROWS` held-out rows: with that few
the smallest error wins): "cannot tell" is a difference of less than two standard errors, the standard error of the
paired difference estimated by a jackknife over the samples (each left out in turn). With only a few samples that
resolution is coarse, so more calibration samples make the judge sharper. "Fastest" is measured: those plans'
models are timed against each other, interleaved, with the deployment's session settings (predictions rank plans
whose times differ by a few percent less reliably than that). Those times go to the latency cache the analysis
used, keyed by each written model's bytes, so runs sharing a cache choose, and write, the same plan.

Plans whose worst error is float rounding (`allocate.FLOAT_ROUNDING`) are exact, and tie whatever the samples: the
fastest of them wins, or, where the layers were not timed (all at the per-node overhead), the one adding the fewest
nodes (a factorized layer is one more).

Every row of a batch is a sample (an .npz holding a batch of 6 is 6): plans are compared, and jackknifed, per row.

Held-out scoring: a plan scored on the rows its statistics were fitted on looks better than it is (6 rows of a
512-wide layer: error 0.02 on them, top-1 0.33 elsewhere). So when the judge's samples are the analysis' own
calibration samples, the plans are scored on units (rows, or whole samples when the model's batch is fixed,
`inputs.sample_units`) that did not fit them, counted over all feeds in order:

- at least `SINGLE_SPLIT_UNITS`: one split, every `FOLDS`-th unit held out (index i with i % FOLDS == FOLDS - 1);
- `MIN_CALIBRATION_UNITS` (= `FOLDS`) to `SINGLE_SPLIT_UNITS` - 1: `FOLDS` folds, unit i held out in fold i % FOLDS,
  so every unit scores once;
- fewer: too few to check any data-aware plan on held-out data, so `pipeline.prepare` makes the whole compression
  weight-only (with a note) and the judge is not reached by default; if it is (a method that needs data asked for),
  the plans are scored on the rows they were fitted on and the note says so.

In each fold the layers are decomposed again on the fold's fit rows alone (`analyze.reanalyzed`: one decomposition
per layer; the measured latencies are reused, nothing is timed again), from statistics the analysis' own calibration
pass collected in parts (`calibration_split`: the rows of the held-out units apart), so no pass is run again; every
candidate allocator (and method) builds its plan on that analysis, and those plans are scored on the fold's
held-out rows. A label's score is its worst relative output error pooled over every fold's held-out rows (and
jackknifed over them). The winning allocator (and method) then builds the plan from the full analysis, on all rows.
Narrowing is judged the same way: each chain is fitted again on the fold's fit rows (the channel statistics of the
same pass, in parts; same widths offered), so a narrowed plan is scored on rows that did not fit it. Before, the
chains kept their fits on every row, held-out ones included, and narrowed plans looked better than they were: the
judge chose them over plans that factorize. Samples other than the analysis' own never fitted the plans, so all
their rows score, once.

Weight-only plans are candidates too: the candidate allocators' plans on the weight-only analysis of the same
layers (`analyze.weight_only`: no statistics, so no fold changes them), scored on the same held-out rows. When one
wins ("auto: alds (weight only) ..."), the plan's settings say weight_only (method lowrank), and it is written, and
reproduced by `apply`, from the weights alone (`pipeline.written_with`).

Deployed as int8 (`--quantize`, `speed.deployed`): every candidate is scored as it will run, quantized by the same
recipe as the model written, calibrated on the rows that fitted it (a fold's fit rows) and scored on the held-out
ones, and the tied plans are timed in their int8 form. With min-max activation ranges (`Quantization.planning`),
whatever ranges the model written gets: percentile ranges cost PP-OCRv4 det's judge minutes (one histogram
calibration per candidate and fold), and min-max, the harsher on a factor's outliers, still finds the plans that
quantize badly. Measured on YOLOv8n at params 0.6 (benchmarks/INT8.md, this
and the previous run): the plan timed and judged in float lost 0.13 box F1 once quantized (0.719 against int8
alone's 0.849), the plan timed and judged in int8 0.011 (0.838). It costs one onnxruntime quantization per
candidate and fold (about 2 s on YOLOv8n, 4 s on PP-OCRv4 det).

Cost, bounded: one weight-only decomposition of every layer per analysis (shared by every budget); with a split or
folds, one decomposition per layer per fold (at most `FOLDS`, and only with fewer than `SINGLE_SPLIT_UNITS` units),
and per fold each distinct candidate written and run once on that fold's held-out rows (over the folds, every
calibration unit runs once per candidate). Memory: the statistics of the fit rows of every fold are held with the
analysis (one set beside the whole's with a split, `FOLDS` sets with folds).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np
import onnx

from onnx_lowrank.stages.allocate import FLOAT_ROUNDING, allocate
from onnx_lowrank.math.projection import DEFAULT_SHRINKAGE
from onnx_lowrank.stages.analyze import Analysis, reanalyzed, weight_only
from onnx_lowrank.stages.calibrate import calibrate
from onnx_lowrank.stages.apply import write_plan
from onnx_lowrank.errors import BudgetError
from onnx_lowrank.graph.inputs import Samples, batch_can_be_cut, sample_units
from onnx_lowrank.math.statistics import InputStatistics, PooledStatistics
from onnx_lowrank.stages.latency_cache import LatencyCache, model_key
from onnx_lowrank.stages.quantize import as_deployed
from onnx_lowrank.stages.layer_timing import BLOCK_SECONDS, open_cache
from onnx_lowrank.stages.timing import OnnxruntimeTimer, timer_of
from onnx_lowrank.options import ALLOCATORS
from onnx_lowrank.plan import Plan
from onnx_lowrank.settings import AnalysisSettings
from onnx_lowrank.stages.verify import Verification, _relative, verify_many

__all__ = ["CANDIDATE_ALLOCATORS", "choose_plan", "calibration_split", "fold_statistics"]

CANDIDATE_ALLOCATORS = ALLOCATORS


def choose_plan(model: onnx.ModelProto, analysis: Analysis, budget: float, metric: str, samples: Samples,
                speed=None, weight_only_plans: bool = True,
                timing_feed: Callable[[], Mapping[str, np.ndarray]] | None = None) -> Plan:
    """The best plan for `budget` among the candidate allocators, judged end to end on `samples`; tied plans are
    timed with `speed` (`settings.SpeedSettings`; None: the session settings the layers were timed with) on the
    feed `timing_feed()` gives, read only then (None: the first of `samples`; `pipeline.Context.timing_feed`, at the
    shapes the layers were timed at). With
    `weight_only_plans` the allocators' plans on the weights alone are candidates too; a weight-only winner's
    settings say so (`pipeline.written_with` writes it from the weights)."""
    factorizes = analysis.method != "eliminate" and analysis.layers  # weight-only plans only factorize
    plain = weight_only(analysis) if weight_only_plans and factorizes else None
    plans: dict[str, Plan] = {}
    origins: dict[str, tuple[str | None, str]] = {}  # label -> (method, allocator) that built it; method None: weights
    first_error = None
    methods = (analysis.method, "lowrank", "eliminate") if analysis.method == "both" else (analysis.method,)
    kinds = [(method, name) for method in methods for name in CANDIDATE_ALLOCATORS]
    kinds += [(None, name) for name in CANDIDATE_ALLOCATORS] if plain is not None else []
    for method, name in kinds:
        label = (f"{name} (weight only)" if method is None else name if method == analysis.method
                 else f"{name} ({method} only)")
        try:
            candidate = (allocate(plain, budget, metric=metric, allocator=name) if method is None else
                         allocate(replace(analysis, method=method), budget, metric=metric, allocator=name))
        except BudgetError as error:
            first_error = first_error or error
            continue
        if not any(_same(candidate, method is None, other, origins[label_][0] is None)
                   for label_, other in plans.items()):
            plans[label], origins[label] = candidate, (method, name)  # identical plans: judge once
    if not plans:
        raise first_error
    writers = {label: plain if origins[label][0] is None else analysis for label in plans}
    if len(plans) == 1 or not analysis.layers:
        name = next(iter(plans))
        return _chosen(plans[name], name, writers[name] is plain, analysis, f"auto: {name} (the only distinct plan)")
    folds, where = _folds(model, analysis, samples)
    deployed = None if speed is None or speed.deployed is None else speed.deployed.planning
    per_fold = []
    for scored, judged, fit in folds:
        # each written when its session is made; with --quantize as deployed: calibrated on the fold's fit rows,
        # never on the rows that score it, so a factor that quantizes badly costs its plan the judgement
        models = (as_deployed(_written(model, *_fitted(analysis, judged, plain, plans[label], origins[label], budget,
                                                       metric)), deployed, fit)
                  for label in plans)
        per_fold.append(verify_many(model, models, scored))
    if deployed is not None:
        where = f"{where}, each plan quantized as deployed"
    checks = {label: _pooled([fold[i] for fold in per_fold]) for i, label in enumerate(plans)}
    errors = {name: _score(check.worst_relative_l2) for name, check in checks.items()}
    least = min(plans, key=lambda name: errors[name])  # ties: the first listed (alds)
    scores = ", ".join(f"{name} {errors[name]:.4g}" for name in plans)
    best, faster = least, ""
    # in folds (fewer than SINGLE_SPLIT_UNITS units) the jackknife is too coarse to call a plan as good as the best:
    # ppocr-cls on 4 and 8 samples tied plans with 6-17x the best error, and the fastest of them won
    tied = [name for name in plans if _within_rounding(checks[name])
            or (len(folds) == 1 and _indistinguishable(checks[name], checks[least]))]
    if "latency" in analysis.costs and len(tied) > 1:
        feed = next(iter(samples)) if timing_feed is None else timing_feed()
        times = measured_times(model, analysis, {name: plans[name] for name in tied}, feed, speed, writers)
        best = min(tied, key=lambda name: (times[name], errors[name]))
        if best != least:
            faster = (f"; within two standard errors of {least}'s and measured faster: {times[best]:.3g} ms "
                      f"against {times[least]:.3g} ms")
    elif len(tied) > 1:  # not timed (layers at the per-node overhead): the fewest nodes added
        best = min(tied, key=lambda name: (len(plans[name].layers), errors[name]))
        if best != least:
            faster = f"; exact like {least}'s and adds fewer nodes"
    note = f"auto: {best} (output error on {where}: {scores}{faster})"
    return _chosen(plans[best], best, writers[best] is plain, analysis, note)


def _same(plan: Plan, plain: bool, other: Plan, other_plain: bool) -> bool:
    """Whether two candidates write the same model: the same choices from the same kind of analysis."""
    return (plain, dict(plan.layers), dict(plan.widths)) == (other_plain, dict(other.layers), dict(other.widths))


def _chosen(plan: Plan, label: str, plain: bool, analysis: Analysis, note: str) -> Plan:
    """The winning plan, labelled; a weight-only one with settings that say so (written from the weights)."""
    chosen = replace(plan, allocator=label, notes=(note,))
    if not plain:
        return chosen
    context = analysis.context
    settings = AnalysisSettings() if context is None else context.settings
    return replace(chosen, method="lowrank", settings=replace(settings, weight_only=True, method="lowrank"))


def _fitted(analysis: Analysis, judged: Analysis, plain: Analysis | None, plan: Plan, origin: tuple[str | None, str],
            budget: float, metric: str) -> tuple[Analysis, Plan]:
    """(analysis, plan) a candidate is scored as in a fold: a weight-only plan as it is (no fold changes it), a
    data-aware one rebuilt on the fold's analysis, or the full plan when there is no fold or it cannot meet the
    budget that way."""
    method, name = origin
    if method is None:
        return plain, plan
    if judged is analysis:
        return analysis, plan
    try:
        return judged, allocate(replace(judged, method=method), budget, metric=metric, allocator=name)
    except BudgetError:
        return analysis, plan  # the subset's analysis cannot meet the budget this way: judge the full plan


FOLDS = 4
"""Units held out in turn: unit i in fold i % FOLDS (module docstring)."""
MIN_CALIBRATION_UNITS = FOLDS
"""Fewer calibration units cannot fill every fold with a held-out unit: the compression is weight-only
(`pipeline.prepare`)."""
SINGLE_SPLIT_UNITS = 16
"""From this many units one split (fold FOLDS - 1 alone, 4 or more held-out units) scores the plans."""


def held_out(index: int) -> bool:
    """Whether calibration unit `index` is held out from fitting in the single split."""
    return index % FOLDS == FOLDS - 1


def calibration_split(units: int) -> Callable[[int], int] | None:
    """The part each of `units` calibration units is summed into by the analysis' calibration pass (`calibrate`'s
    `part_of`), so the judge's fit statistics come from that one pass: with a single split, part 0 the fit units and
    part 1 the held-out ones; with folds, part i % FOLDS; None with too few units to judge."""
    if units >= SINGLE_SPLIT_UNITS:
        return lambda index: int(held_out(index))
    if units >= MIN_CALIBRATION_UNITS:
        return lambda index: index % FOLDS
    return None


def fold_statistics(parts: Sequence[Mapping[str, InputStatistics]]) -> tuple[Mapping[str, InputStatistics], ...]:
    """Per fold, the statistics of its fit rows, from the parts of `calibration_split`: part 0 with a single split,
    every part but the fold's own with folds."""
    if len(parts) == 2:
        return (parts[0],)
    return tuple(PooledStatistics([part for index, part in enumerate(parts) if index != fold])
                 for fold in range(len(parts)))


_FOLDS_OF: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""analysis -> {samples key: its folds}: the folds do not depend on the budget, so every budget a sweep or a target
search plans for the same analysis reuses one set of calibration passes and decompositions."""


def _folds(model: onnx.ModelProto, analysis: Analysis, samples: Samples
           ) -> tuple[list[tuple[Samples, Analysis, Samples]], str]:
    """([(the rows that score the plans, the analysis their plans are built on, the rows that fitted it)] per fold,
    how the note names the rows); computed once per analysis and samples."""
    known = _FOLDS_OF.setdefault(analysis, {})
    key = (samples.key, id(model))
    if key not in known:
        known[key] = _made_folds(model, analysis, samples)
    return known[key]


def _made_folds(model: onnx.ModelProto, analysis: Analysis, samples: Samples
                ) -> tuple[list[tuple[Samples, Analysis, Samples]], str]:
    rows = samples.rows
    own = bool(analysis.calibration_key) and analysis.calibration_key == samples.key
    if not own:
        return [(samples, analysis, samples)], _rows(rows, "sample")
    by_row = batch_can_be_cut(model)
    units = sample_units(samples, model)
    if units < MIN_CALIBRATION_UNITS or not analysis.layers:
        return [(samples, analysis, samples)], (_rows(rows, "calibration sample")
                                       + " (the ones that fitted them: too few to hold any out)")
    shrinkage = DEFAULT_SHRINKAGE if analysis.context is None else analysis.context.settings.shrinkage
    chosen = (FOLDS - 1,) if units >= SINGLE_SPLIT_UNITS else tuple(range(FOLDS))
    collected = analysis.fold_statistics if len(analysis.fold_statistics) == len(chosen) else None
    channels = analysis.fold_channels if collected is not None and len(analysis.fold_channels) == len(chosen) else None
    folds = []
    for index, fold in enumerate(chosen):
        fit = samples.rows_where(lambda i, fold=fold: i % FOLDS != fold, by_row=by_row)
        scored = samples.rows_where(lambda i, fold=fold: i % FOLDS == fold, by_row=by_row)
        statistics = collected[index] if collected is not None else calibrate(
            model, [entry.layer for entry in analysis.layers], fit).layers  # an analysis made without parts
        folds.append((scored, reanalyzed(analysis, statistics, shrinkage, None if channels is None else channels[index]),
                      fit))
    if len(folds) == 1:
        return folds, f"{_rows(scored.rows, 'held-out calibration sample')}, plans fitted on the other {fit.rows}"
    return folds, (f"{_rows(rows, 'calibration sample')} in {FOLDS} folds, each held out once and scored on plans "
                   "fitted on the others")


def _pooled(checks: list[Verification]) -> Verification:
    """One candidate's verifications on every fold's held-out rows as one: each output's relative L2 error pooled
    over all their rows, and the rows' squares for the jackknife (the other per-output figures are the first
    fold's: the judge reads only these)."""
    if len(checks) == 1:
        return checks[0]
    squares = tuple(tuple(square for check in checks for square in check.squares[index])
                    for index in range(len(checks[0].outputs)))
    outputs = tuple(replace(output, relative_l2=_relative(sum(d for d, _ in rows), sum(r for _, r in rows)))
                    for output, rows in zip(checks[0].outputs, squares))
    return Verification(outputs, sum(check.samples for check in checks),
                        sum(check.rows or check.samples for check in checks), squares=squares)


def _rows(count: int, what: str) -> str:
    return f"{count} {what}{'s' if count != 1 else ''}"


JUDGE_ROUNDS = 20
"""Interleaved rounds when the judge times the plans it cannot tell apart (medians)."""


def measured_times(model: onnx.ModelProto, analysis: Analysis, plans: dict[str, Plan], feed: dict,
                   speed=None, writers: Mapping[str, Analysis] | None = None) -> dict[str, float]:
    """Median milliseconds of every plan's model on `feed` (written from `writers[name]`, default `analysis`), all
    timed interleaved by `speed`'s timer, or read from its latency cache (`settings.SpeedSettings`; None: onnxruntime
    with the session settings the analysis timed its layers with, and no cache). As with a layer's variants, one plan
    missing from the cache times them all again."""
    if speed is None:
        settings, timer, cache = analysis.costs["latency"].settings, None, LatencyCache(None)
    else:
        settings, timer, cache = speed.runtime, timer_of(speed), open_cache(speed.cache)
    models = [_written(model, (writers or {}).get(name, analysis), plan) for name, plan in plans.items()]
    shapes = {name: value.shape for name, value in feed.items()}
    deployed = None if speed is None or speed.deployed is None else speed.deployed.key
    keys = [model_key(written, shapes, settings, deployed) for written in models]
    keys = [None if key is None else key + "/judged" for key in keys]
    cached = [None if key is None else cache.get(key) for key in keys]
    if any(ms is None for ms in cached):
        timer = timer or OnnxruntimeTimer(settings)
        cached = list(timer.time(models, [[feed]] * len(models), JUDGE_ROUNDS, block_s=BLOCK_SECONDS).medians)
        for key, ms in zip(keys, cached):
            if key is not None:
                cache.put(key, ms)
        cache.save()
    return dict(zip(plans, cached))


def _written(model: onnx.ModelProto, analysis: Analysis, plan: Plan) -> onnx.ModelProto:
    return write_plan(model, analysis, plan).model


TIE_ROWS = 16
"""The fewest held-out rows a jackknife may call two plans tied on: below that its standard error is a guess (on 4
held-out rows ppocr-cls tied a plan with 17x the best error, the faster one was written, and it lost to weight-only
on the evaluation split)."""


def _indistinguishable(candidate: Verification, best: Verification) -> bool:
    """Whether the samples cannot tell `candidate`'s worst output error from `best`'s: their difference is below
    two standard errors (jackknife: the difference with each row left out in turn, over at least TIE_ROWS rows; a
    worse plan scored on fewer is never tied)."""
    difference = _score(candidate.worst_relative_l2) - _score(best.worst_relative_l2)
    if difference <= 0:
        return True
    left_out = [a - b for a, b in zip(candidate.leave_one_out(), best.leave_one_out())]
    if len(left_out) < TIE_ROWS or not all(math.isfinite(d) for d in left_out):
        return False
    n, mean = len(left_out), sum(left_out) / len(left_out)
    standard_error = math.sqrt((n - 1) / n * sum((d - mean) ** 2 for d in left_out))
    return difference < 2 * standard_error


def _within_rounding(check: Verification) -> bool:
    """Whether a plan's worst output error is float rounding (`allocate.FLOAT_ROUNDING`): every such plan is exact,
    whatever the samples, and they tie: the fastest is written, or, where the layers were not timed, the one that
    adds the fewest nodes (a factorized layer is one more node; on a model with duplicated units the smallest
    rounding picked a factorized plan 1.10x slower than the original over an exact narrowing)."""
    return _score(check.worst_relative_l2) <= FLOAT_ROUNDING


def _score(error: float) -> float:
    return math.inf if math.isnan(error) else error
