"""What a compression did, as data first (`Report`, JSON-safe) and as a terminal table second (`render`)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from onnx_lowrank.stages.allocate import plan_cost
from onnx_lowrank.stages.analyze import Analysis
from onnx_lowrank.stages.apply import Written
from onnx_lowrank.stages.deployment import Deployment
from onnx_lowrank.ops.layer import Skipped
from onnx_lowrank.stages.timing import LatencyComparison, SpeedCheck
from onnx_lowrank.plan import Plan
from onnx_lowrank.stages.verify import Verification

__all__ = ["NarrowedRow", "LayerRow", "SearchStep", "Report", "build_report", "skip_summary", "nothing_to_compress",
           "LARGE_ERROR"]

_MEASURES = {
    "spectral": "relative spectral error of the weight, ||W - W_hat||_2 / ||W||_2",
    "output": "relative output error of the layer on the calibration data, ||Y - Y_hat||_F / ||Y - mean(Y)||_F",
}


_MOVEMENT = (
    (0.01, "practically unchanged."),
    (0.05, "a small change; check your task metric."),
    (0.2, "a noticeable change; check your task metric before deploying."),
    (math.inf, "a large change: the model's answers are likely wrong."),
)
"""Worst relative output error -> what it means for a user (upper limits, first match). A large change is followed
by the cures that fit the report (`Report.cures`)."""
DOMINANT = 2.0
"""A changed layer dominates the error when its error is at least this many times every other changed layer's."""
LARGE_ERROR = 0.2
_NOT_FINITE = ("the outputs hold NaN or infinite values, so how far they moved is unknown; check the original model's "
               "outputs on real samples (--inputs).")


@dataclass(frozen=True)
class LayerRow:
    """One factorizable layer: what it was, what it became (k, rank None when kept dense), and the error."""

    name: str
    op: str
    weight_shape: tuple[int, ...]
    k: int | None
    rank: int | None
    costs: Mapping[str, tuple[float | None, float | None]]  # cost model name -> (dense, as written)
    error: float | None  # the error of the written factors, in the report's `measure` (spectral or output)
    planned_error: float | None  # the error the allocator planned with


@dataclass(frozen=True)
class NarrowedRow:
    """One narrowed layer: the output channels it kept, the layers that read them, the error and what it saved."""

    name: str
    op: str
    readers: tuple[str, ...]
    channels: int
    width: int
    error: float  # relative output error of the readers on the calibration statistics, as written
    planned_error: float | None
    savings: Mapping[str, float | None]  # cost model name -> what narrowing this layer alone saves


@dataclass(frozen=True)
class SearchStep:
    """One step of a target search: the budget tried, what it achieved, the checked value and the verdict."""

    budget: float
    achieved: float | None  # fraction of the metric the model kept
    value: float  # verified relative output error, or the evaluate score
    passed: bool


@dataclass(frozen=True)
class Report:
    layers: tuple[LayerRow, ...]
    skipped: tuple[Skipped, ...]
    before: Mapping[str, float]  # cost model name -> the original model's cost (latency: measured)
    after: Mapping[str, float]  # counted on the compressed model itself; latency: predicted from the layer costs
    plan: Plan
    verification: Verification | None = None
    verified_on: str | None = None  # the samples verification ran on: an --inputs path, or "random"
    seconds: Mapping[str, float] = field(default_factory=dict)  # stage -> wall time
    message: str | None = None  # why nothing was compressed, when nothing was
    measure: str = "spectral"  # what layer errors measure: "spectral" (weight only) or "output" (calibration data)
    calibrated_on: str | None = None  # where the calibration samples came from; None: weight-only
    in_sample: bool = False  # verification ran on the calibration samples themselves
    refit: bool = False  # decoders were refit on the calibration samples
    search: tuple[SearchStep, ...] = ()  # the steps of a target search, in order
    search_goal: str | None = None  # what the search had to meet, e.g. "relative output error <= 0.05"
    latency: LatencyComparison | None = None  # both models timed interleaved by verification
    guarded: bool = False  # only layers measured faster than dense were candidates
    speed_note: str | None = None  # why latency was not measured, when it was asked for
    units: Mapping[str, str] = field(default_factory=dict)  # cost model name -> unit ("" for counts, "ms")
    notes: tuple[str, ...] = ()  # how the model was read, when not as written (initializers listed as inputs)
    narrowed: tuple[NarrowedRow, ...] = ()  # layers whose output channels were cut (method eliminate or both)
    speed_check: SpeedCheck | None = None  # the guard's whole-model check; None: not made (guard off, not timed)
    thin_calibration: tuple = ()  # `analyze.ThinLayer`s: fewer calibration rows than input dimensions, fallbacks
    few_samples: int | None = None  # calibration samples given, when too few to calibrate on (weight-only instead)
    deployment: Deployment | None = None  # --quantize: ours + int8 against int8 alone and the original

    def ratio(self, metric: str) -> float | None:
        """after / before in `metric`, or None when the report has no such cost (flops without shapes)."""
        before, after = self.before.get(metric), self.after.get(metric)
        if before is None or after is None:
            return None
        return after / before if before else 1.0

    @property
    def params_ratio(self) -> float:
        return self.ratio("params")

    @property
    def flops_ratio(self) -> float | None:
        return self.ratio("flops")

    @property
    def predicted_latency_error(self) -> float | None:
        """predicted / measured - 1 for the compressed model's latency relative to the original's, when both are
        known. Ratios, not milliseconds: the two were timed minutes apart, and the machine's speed drifts."""
        predicted = self.ratio("latency")
        if predicted is None or self.latency is None or not self.latency.ratio:
            return None
        return predicted / self.latency.ratio - 1.0

    @property
    def compressible_fraction(self) -> float:
        """Share of the model's parameters that sit in factorizable layers: all a budget can act on."""
        total = self.before.get("params") or 0
        dense = sum(row.costs["params"][0] or 0 for row in self.layers)
        return dense / total if total else 0.0

    @property
    def verdict(self) -> tuple[str, ...]:
        """What happened, in lines a user can act on: budget, what was compressible, how far the outputs moved."""
        lines = []
        metric = self.plan.metric
        if self.plan.budget is not None and metric in self.before and self.ratio(metric) is not None:
            ratio = self.ratio(metric)
            measured = self._measured_budget()
            if measured is not None:
                lines.append(measured)
            else:
                met = "met" if ratio <= self.plan.budget + 1e-9 else "missed"
                lines.append(f"Budget {met}: {metric} {ratio:.3f} of the original (asked {self.plan.budget:g}).")
            if self.plan.gaps:
                lines.append(self._shortfall(ratio))
        fraction = self.compressible_fraction
        if fraction < 0.9:
            where = "; ".join(f"{count} {op}: {reason}" for count, op, reason, _ in skip_summary(self.skipped)[:2])
            lines.append(f"Only {fraction:.0%} of the parameters are in layers that can be factorized; the rest are in "
                         f"other operators{' or skipped layers (' + where + ')' if where else ''}.")
        if self.verification is not None:
            error = self.verification.worst_relative_l2
            words = next((text for limit, text in _MOVEMENT if error < limit), _NOT_FINITE)
            cures = self.cures if not error < LARGE_ERROR and math.isfinite(error) else ()
            cure = "" if not cures else " " + _sentence(cures)
            lines.append(f"Outputs moved by {error:.3g} (worst relative L2): {words}{cure}")
        if self.deployment is not None:
            lines.append(self.deployment.verdict)
        return tuple(lines)

    def _measured_budget(self) -> str | None:
        """Whether a latency budget was met, judged by the written model's measured time (against the baseline the
        budget is a fraction of: int8 alone's time when the layers were timed in their int8 form), not by the layer
        timings' prediction the plan was made from: that prediction is what missed by 5-9% on PP-OCRv4 det and
        YOLOv8n in int8. None when the budget is not a latency or the model was not timed against that baseline."""
        timed = self.latency
        if self.plan.metric != "latency" or timed is None:
            return None
        budget_baseline = "original" if self.deployment is None else "int8 alone"
        if timed.against != budget_baseline:
            return None
        budget, predicted = self.plan.budget, self.ratio("latency")
        bounds = timed.bounds
        spread = "" if bounds is None else f" ({bounds[0]:.3f}-{bounds[1]:.3f})"
        measured = f"latency measured {timed.ratio:.3f}x of {timed.baseline}'s time{spread}, asked {budget:g}"
        if timed.ratio <= budget + 1e-9:
            return f"Budget met: {measured} (predicted {predicted:.3f})."
        if bounds is not None and bounds[0] <= budget:
            return f"Budget met within the measurements' noise: {measured} (predicted {predicted:.3f})."
        return (f"Budget missed: {measured}; the layer timings the plan was made from predicted {predicted:.3f}. "
                "Ask for less to get there, or see what a lower budget costs with `sweep`.")

    def _shortfall(self, ratio: float) -> str:
        """One line: the plan keeps far less than its budget, and the layers that had nothing nearer it."""
        shown = "; ".join(gap.describe(self.plan.metric) for gap in self.plan.gaps[:3])
        more = f"; {len(self.plan.gaps) - 3} more in the plan's gaps" if len(self.plan.gaps) > 3 else ""
        guard = " (only candidates measured faster count; --allow-slower lifts that)" if self.guarded else ""
        return (f"Far below the budget ({self.plan.metric} {ratio:.3f}, asked {self.plan.budget:g}): no layer had a "
                f"form between this plan and the budget ({shown}{more}){guard}.")

    @property
    def cures(self) -> tuple[str, ...]:
        """What would move the outputs less, for this report: calibration data when there was none (or when
        --weight-only ignored it), more samples (or planning on the weights) when layers saw fewer rows than inputs,
        --allow-slower when the guard left only destructive forms, --exclude for a layer that dominates the error,
        and a higher budget when one helps."""
        cures = []
        thin = tuple(self.thin_calibration)
        weight_only = self.plan.settings is not None and self.plan.settings.weight_only
        judged = (self.plan.allocator or "").endswith("(weight only)")  # the judge found the data-aware plans worse
        if self.few_samples is not None:
            cures.append(f"calibrate on more samples (at least 4; {self.few_samples} given)")
        elif judged:
            cures.append("calibrate on more samples (on these, every data-aware plan did worse than the weights "
                         "alone)")
        elif weight_only:
            cures.append("plan on calibration data (--calibration, without --weight-only)")
        elif self.calibrated_on is None and (self.layers or self.narrowed):
            cures.append("give calibration data (--calibration)")
        elif thin:
            worst = min(thin, key=lambda t: t.rows / max(t.dims, 1))
            others = f" and {len(thin) - 1} more" if len(thin) > 1 else ""
            cures.append(f"calibrate on more samples ({worst.name} saw {worst.rows} rows for {worst.dims} inputs"
                         f"{others})")
            if not all(t.weight_only for t in thin):
                cures.append("plan on the weights alone (--weight-only)")
        stuck = [gap for gap in self.plan.gaps if gap.next_kept is None]
        if stuck and self.guarded:
            cures.append("let factorizations not measured faster count (--allow-slower)")
        dominant = self._dominant_layer()
        changed = [row.name for row in self.factorized] + [row.name for row in self.narrowed]
        if dominant is None and stuck and len(changed) > 1 and stuck[0].layer in changed:
            dominant = stuck[0].layer  # its only forms cut too deep: the others can take the budget instead
        if dominant is not None:
            cures.append(f"keep {dominant} dense (--exclude '^{re.escape(dominant)}$')")
        if not self.plan.gaps or len(stuck) < len(self.plan.gaps):
            cures.append("raise the budget")
        return tuple(cures)

    def _dominant_layer(self) -> str | None:
        """The changed layer whose error is at least DOMINANT times every other changed layer's, if any."""
        errors = [(row.error, row.name) for row in self.factorized if row.error is not None]
        errors += [(row.error, row.name) for row in self.narrowed]
        errors = sorted((e for e in errors if math.isfinite(e[0])), reverse=True)
        if len(errors) < 2 or not errors[0][0] > 0 or errors[0][0] < DOMINANT * errors[1][0]:
            return None
        return errors[0][1]

    @property
    def factorized(self) -> tuple[LayerRow, ...]:
        return tuple(row for row in self.layers if row.rank is not None)

    def to_dict(self) -> dict:
        costs = {}
        for name in self.before:
            costs.update({f"{name}_before": self.before[name], f"{name}_after": self.after.get(name),
                          f"{name}_ratio": self.ratio(name)})
        return {
            "summary": {
                **costs,
                "verdict": list(self.verdict),
                "compressible_fraction": self.compressible_fraction,
                "latency_measured": None if self.latency is None else self.latency.to_dict(),
                "latency_prediction_error": self.predicted_latency_error,
                "never_slower_guard": self.guarded,
                "layers_factorized": len(self.factorized),
                "layers_considered": len(self.layers),
                "layers_skipped": len(self.skipped),
                "max_layer_error": max((r.error for r in self.factorized), default=0.0),
                "layer_error_measure": _MEASURES.get(self.measure, self.measure),
                "calibrated_on": self.calibrated_on,
                "refit": self.refit,
                "verification_in_sample": self.in_sample,
                "message": self.message,
                "notes": list(self.notes),
                "speed_note": self.speed_note,
                "never_slower_check": None if self.speed_check is None else self.speed_check.to_dict(),
                "thin_calibration": [t._asdict() for t in self.thin_calibration],
                "few_samples": self.few_samples,
            },
            "deployment": None if self.deployment is None else self.deployment.to_dict(),
            "search": {"goal": self.search_goal, "steps": [s.__dict__ for s in self.search]} if self.search else None,
            "plan": self.plan.to_dict(),
            "layers": [_row_dict(row) for row in self.layers],
            "narrowed": [{**row.__dict__, "readers": list(row.readers), "savings": dict(row.savings)}
                         for row in self.narrowed],
            "skipped": [s.__dict__ for s in self.skipped],
            "verification": self.verification.to_dict() if self.verification is not None else None,
            "verified_on": self.verified_on,
            "seconds": dict(self.seconds),
        }


def _sentence(parts: Sequence[str]) -> str:
    """'A, b, or c.' from parts."""
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + ", or " + parts[-1]
    return text[0].upper() + text[1:] + "."


def _row_dict(row: LayerRow) -> dict:
    fields = {key: value for key, value in row.__dict__.items() if key != "costs"}
    for name, (before, after) in row.costs.items():
        fields[f"{name}_before"], fields[f"{name}_after"] = before, after
    return {**fields, "weight_shape": list(row.weight_shape)}










def nothing_to_compress(skipped: Sequence[Skipped]) -> str:
    """Why a model with no factorizable layer has nothing to compress, naming the commonest skip reasons."""
    if not skipped:
        return "Nothing to compress in this model: it has no Conv, Gemm or MatMul. The model is unchanged."
    reasons = "; ".join(f"{count} {op}: {reason}" for count, op, reason, _ in skip_summary(skipped)[:2])
    return (f"Nothing to compress in this model: all {len(skipped)} of its layers with a weight were skipped "
            f"({reasons}). The model is unchanged.")


def skip_summary(skipped: Sequence[Skipped]) -> list[tuple[int, str, str, str]]:
    """(count, op, reason, first layer) for every distinct (op, reason), most frequent first: 60 identical rows say
    less than one row saying 60."""
    groups: dict[tuple[str, str], list[str]] = {}
    for item in skipped:
        groups.setdefault((item.op, item.reason), []).append(item.name)
    ordered = sorted(groups.items(), key=lambda entry: -len(entry[1]))  # stable: ties keep model order
    return [(len(names), op, reason, names[0]) for (op, reason), names in ordered]


def build_report(analysis: Analysis, plan: Plan, written: Written, compressed, *, after_shapes, verification,
                 verified_on, seconds, in_sample, refit, latency, speed_note, notes, few_samples=None) -> Report:
    """The report of one written plan: each layer's row, the costs before and after (counted on the written model;
    a time is predicted from the layer costs) and what verification found."""
    changed = bool(plan.layers or plan.widths)
    rows = [_row(entry, analysis, plan.layers.get(entry.layer.name), written.errors.get(entry.layer.name))
            for entry in analysis.layers]
    narrowed_entries = [c for c in analysis.chains if c.chain.name in plan.widths]
    narrowed_rows = tuple(_narrowed_row(entry, plan.widths[entry.chain.name], folded, analysis)
                          for entry, (_, folded) in zip(narrowed_entries, written.cuts))
    before = {name: cost_model.total for name, cost_model in analysis.costs.items()}
    after = {}
    for name, cost_model in analysis.costs.items():
        counted = cost_model.count(compressed, after_shapes) if changed else before[name]
        after[name] = counted if counted is not None else plan_cost(analysis, plan, name)  # a time: predicted
    return Report(
        layers=tuple(rows),
        skipped=analysis.skipped,
        before=before,
        after=after,
        plan=plan,
        verification=verification,
        verified_on=verified_on,
        seconds=seconds,
        message=None if changed else _nothing_to_do(analysis, plan),
        measure=analysis.measure,
        calibrated_on=analysis.calibration,
        in_sample=in_sample,
        refit=refit,
        latency=latency,
        guarded=analysis.guarded,
        speed_note=speed_note,
        units={name: cost_model.unit for name, cost_model in analysis.costs.items()},
        notes=notes,
        narrowed=narrowed_rows,
        thin_calibration=analysis.thin_calibration,
        few_samples=few_samples,
    )


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
