"""The `auto` allocator: build the plans of several allocators and keep the one whose outputs move least.

Min-max over data-aware layer errors is usually best, but a per-layer error does not say how much that layer's error
moves the model's outputs, and a non-uniform allocation can lose to the uniform one. So every allocator's plan for
the budget is written and run on the calibration samples next to the original, and the plan with the smallest
worst relative output error wins. The uniform baseline is always among them, so the default never loses to it on
the calibration data. With `--method both` the plans of each method alone (only factorized, only narrowed) are
among them too, so `both` never loses to either on the calibration data. Costs one extra pass over the calibration
samples per plan.

When layers are timed, a plan whose error the samples cannot tell from the best one's is as good, and the fastest
of those wins: "cannot tell" is a difference of less than two standard errors, the standard error of the paired
difference estimated by a jackknife over the samples (each left out in turn). With only a few samples that
resolution is coarse, so more calibration samples make the judge sharper. "Fastest" is measured: those plans'
models are timed against each other, interleaved, with the deployment's session settings (predictions rank plans
whose times differ by a few percent less reliably than that). Those times go to the latency cache the analysis
used, keyed by each written model's bytes, so runs sharing a cache choose, and write, the same plan.

Every row of a batch is a sample (an .npz holding a batch of 6 is 6): plans are compared, and jackknifed, per row.

Held-out scoring: a plan scored on the rows its statistics were fitted on looks better than it is (6 rows of a
512-wide layer: error 0.02 on them, top-1 0.33 elsewhere). So when the judge's samples are the analysis' own
calibration samples and hold at least `MIN_HELD_OUT_ROWS` rows, every `HOLD_OUT_EVERY`-th row (index i with
i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1, counted over all feeds in order) is held out: the layers are calibrated
and decomposed again on the other rows alone (one streaming pass and one decomposition per layer; the layers'
measured latencies are reused, nothing is timed again), every candidate allocator builds its plan on that analysis,
and those plans are scored on the held-out rows, which did not fit them. The winning allocator (and method) then
builds the plan from the full analysis, on all rows. Narrowing is judged on the full analysis' chains (their fits
are not re-done on the subset). With fewer rows, the plans are scored on the rows they were fitted on, and the
note says so: `analyze.FALLBACK_ROW_FRACTION` then keeps the thinnest layers weight-only. Samples other than the
analysis' own never fitted the plans, so all their rows score.
"""

from __future__ import annotations

import math
from dataclasses import replace

import onnx

from onnx_lowrank.stages.allocate import allocate
from onnx_lowrank.math.projection import DEFAULT_SHRINKAGE
from onnx_lowrank.stages.analyze import Analysis, reanalyzed
from onnx_lowrank.stages.calibrate import calibrate
from onnx_lowrank.stages.apply import write_plan
from onnx_lowrank.errors import BudgetError
from onnx_lowrank.graph.inputs import Samples, model_inputs
from onnx_lowrank.stages.latency_cache import LatencyCache, model_key
from onnx_lowrank.stages.layer_timing import BLOCK_SECONDS, open_cache
from onnx_lowrank.stages.timing import OnnxruntimeTimer, timer_of
from onnx_lowrank.options import ALLOCATORS
from onnx_lowrank.plan import Plan
from onnx_lowrank.stages.verify import Verification, verify_many

__all__ = ["CANDIDATE_ALLOCATORS", "choose_plan"]

CANDIDATE_ALLOCATORS = ALLOCATORS


def choose_plan(model: onnx.ModelProto, analysis: Analysis, budget: float, metric: str, samples: Samples,
                speed=None) -> Plan:
    """The best plan for `budget` among the candidate allocators, judged end to end on `samples`; tied plans are
    timed with `speed` (`settings.SpeedSettings`; None: the session settings the layers were timed with)."""
    plans: dict[str, Plan] = {}
    origins: dict[str, tuple[str, str]] = {}  # label -> (method, allocator) that built the plan
    first_error = None
    methods = (analysis.method, "lowrank", "eliminate") if analysis.method == "both" else (analysis.method,)
    for method, name in ((method, name) for method in methods for name in CANDIDATE_ALLOCATORS):
        label = name if method == analysis.method else f"{name} ({method} only)"
        try:
            candidate = allocate(replace(analysis, method=method), budget, metric=metric, allocator=name)
        except BudgetError as error:
            first_error = first_error or error
            continue
        if all((dict(candidate.layers), dict(candidate.widths)) != (dict(p.layers), dict(p.widths))
               for p in plans.values()):  # identical plans: judge once
            plans[label], origins[label] = candidate, (method, name)
    if not plans:
        raise first_error
    if len(plans) == 1 or not analysis.layers:
        name, only = next(iter(plans.items()))
        return replace(only, allocator=name, notes=(f"auto: {name} (the only distinct plan)",))
    scored, judged, where = _scoring(model, analysis, samples)
    fitted = {}  # each label's plan on the analysis that did not see the scoring rows
    for label, plan in plans.items():
        if judged is analysis:
            fitted[label] = plan
            continue
        method, name = origins[label]
        try:
            fitted[label] = allocate(replace(judged, method=method), budget, metric=metric, allocator=name)
        except BudgetError:
            fitted[label] = plan  # the subset's analysis cannot meet the budget this way: judge the full plan
    models = (_written(model, judged if fitted[label] is not plans[label] else analysis, fitted[label])
              for label in plans)  # each written when its session is made
    checks = dict(zip(plans, verify_many(model, models, scored)))
    errors = {name: _score(check.worst_relative_l2) for name, check in checks.items()}
    least = min(plans, key=lambda name: errors[name])  # ties: the first listed (alds)
    scores = ", ".join(f"{name} {errors[name]:.4g}" for name in plans)
    best, faster = least, ""
    tied = [name for name in plans if _indistinguishable(checks[name], checks[least])]
    if "latency" in analysis.costs and len(tied) > 1:
        times = measured_times(model, analysis, {name: plans[name] for name in tied}, next(iter(samples)), speed)
        best = min(tied, key=lambda name: (times[name], errors[name]))
        if best != least:
            faster = (f"; within two standard errors of {least}'s and measured faster: {times[best]:.3g} ms "
                      f"against {times[least]:.3g} ms")
    note = f"auto: {best} (output error on {where}: {scores}{faster})"
    return replace(plans[best], allocator=best, notes=(note,))


HOLD_OUT_EVERY = 4
"""Every HOLD_OUT_EVERY-th calibration row scores the plans instead of fitting them (module docstring)."""
MIN_HELD_OUT_ROWS = 8
"""Rows needed before any are held out: at least 2 held out (a jackknife needs 2), and 6 of 8 still fit."""


def held_out(index: int) -> bool:
    """Whether calibration row `index` is held out from fitting to score the plans."""
    return index % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1


def _scoring(model: onnx.ModelProto, analysis: Analysis, samples: Samples) -> tuple[Samples, Analysis, str]:
    """(the rows that score the plans, the analysis their plans are built on, how the note names those rows)."""
    rows = samples.rows
    own = bool(analysis.calibration_key) and analysis.calibration_key == samples.key
    if not own:
        return samples, analysis, _rows(rows, "sample")
    by_row = all(spec.shape and spec.shape[0] is None for spec in model_inputs(model))  # a batch can be cut
    units = rows if by_row else samples.count
    if units < MIN_HELD_OUT_ROWS or not analysis.layers:
        return samples, analysis, (_rows(rows, "calibration sample")
                                   + " (the ones that fitted them: too few to hold any out)")
    fit = samples.rows_where(lambda i: not held_out(i), by_row=by_row)
    scored = samples.rows_where(held_out, by_row=by_row)
    statistics = calibrate(model, [entry.layer for entry in analysis.layers], fit).layers
    shrinkage = DEFAULT_SHRINKAGE if analysis.context is None else analysis.context.settings.shrinkage
    judged = reanalyzed(analysis, statistics, shrinkage)
    return scored, judged, (f"{_rows(scored.rows, 'held-out calibration sample')}, plans fitted on the other "
                            f"{fit.rows}")


def _rows(count: int, what: str) -> str:
    return f"{count} {what}{'s' if count != 1 else ''}"


JUDGE_ROUNDS = 20
"""Interleaved rounds when the judge times the plans it cannot tell apart (medians)."""


def measured_times(model: onnx.ModelProto, analysis: Analysis, plans: dict[str, Plan], feed: dict,
                   speed=None) -> dict[str, float]:
    """Median milliseconds of every plan's model on `feed`, all timed interleaved by `speed`'s timer, or read from
    its latency cache (`settings.SpeedSettings`; None: onnxruntime with the session settings the analysis timed its
    layers with, and no cache). As with a layer's variants, one plan missing from the cache times them all again."""
    if speed is None:
        settings, timer, cache = analysis.costs["latency"].settings, None, LatencyCache(None)
    else:
        settings, timer, cache = speed.runtime, timer_of(speed), open_cache(speed.cache)
    models = [_written(model, analysis, plan) for plan in plans.values()]
    shapes = {name: value.shape for name, value in feed.items()}
    keys = [model_key(written, shapes, settings) for written in models]
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


def _indistinguishable(candidate: Verification, best: Verification) -> bool:
    """Whether the samples cannot tell `candidate`'s worst output error from `best`'s: their difference is below
    two standard errors (jackknife: the difference with each sample left out in turn)."""
    difference = _score(candidate.worst_relative_l2) - _score(best.worst_relative_l2)
    if difference <= 0:
        return True
    left_out = [a - b for a, b in zip(candidate.leave_one_out(), best.leave_one_out())]
    if len(left_out) < 2 or not all(math.isfinite(d) for d in left_out):
        return False
    n, mean = len(left_out), sum(left_out) / len(left_out)
    standard_error = math.sqrt((n - 1) / n * sum((d - mean) ** 2 for d in left_out))
    return difference < 2 * standard_error


def _score(error: float) -> float:
    return math.inf if math.isnan(error) else error
