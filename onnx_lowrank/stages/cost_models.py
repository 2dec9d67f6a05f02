"""Named cost models: what a layer costs dense and factorized, and what the whole model costs. One registry.

A budget is a fraction of one of these (`--metric`), the allocator adds up whichever one it is given, and the
report prints every one the analysis has. Adding a cost = one class with `dense`, `factorized`,
`narrowing_saving` and `total`, built in `build_cost_models`; nothing else switches on metric names.

- `params`: weight elements (see `cost`), with the folded-bias and bias-correction accounting.
- `flops`: 2 x MACs at the model's concrete input shapes (see `cost`); needs them.
- `latency`: milliseconds in onnxruntime, measured per layer (`layer_timing`) with the deployment's session
  options, for the dense layer and a grid of ranks per group count k, linearly interpolated between grid ranks.
  Whole model = measured whole-model latency of the original, minus its layers' dense times, plus their planned
  times (the per-run overhead a layer timed alone carries is in both and cancels), each saving scaled by the
  fraction of such savings a probe model really delivered. Forms that would lose
  onnxruntime's blocked conv kernels are not offered, and conv ranks are multiples of its channel block
  (`FormTiming.aligned_to`, see `layer_timing`): that is the automatic rank rounding.
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import onnx

from onnx_lowrank.stages import costs as cost
from onnx_lowrank.ops.layer import Chain, Layer
from onnx_lowrank.graph.runtime import RuntimeSettings
from onnx_lowrank.math.noise import slower_beyond_noise
from onnx_lowrank.options import METRICS

__all__ = ["CostModel", "ParamsCost", "FlopsCost", "LatencyCost", "FormTiming", "LayerTiming", "METRICS",
           "interpolate", "build_cost_models", "unavailable_reason", "NEAR_OVERHEAD", "slower_by_more_than_a_node"]


_UNAVAILABLE = {
    "flops": "The flops metric needs concrete input shapes: pass --input-shape NAME:1x3x224x224 (or --inputs).",
    "latency": "The latency metric needs measured layer latencies, which need concrete input shapes: pass "
               "--input-shape NAME:1x3x224x224 (or --inputs).",
}


def slower_by_more_than_a_node(variant: Sequence[float], base: Sequence[float], overhead_ms: float) -> bool:
    """The per-layer filter's "slower": beyond the rounds' noise (`noise.slower_beyond_noise`) and, median to
    median, by more than one per-node overhead; a difference that small is the extra node's own cost, which the
    whole-model check judges with the rest of the model (`pipeline`)."""
    return (slower_beyond_noise(variant, base)
            and statistics.median(variant) - statistics.median(base) > overhead_ms)


def unavailable_reason(metric: str) -> str:
    """Why an analysis has no cost model `metric`, and what to do."""
    return _UNAVAILABLE.get(metric, f"The metric must be one of {', '.join(METRICS)}. Got {metric!r} instead.")


class CostModel(Protocol):
    name: str
    unit: str  # "" for counts, "ms" for times
    total: float  # the whole original model

    def dense(self, layer: Layer) -> float: ...

    def factorized(self, layer: Layer, k: int, rank: int) -> float | None:
        """The factorized layer's cost, or None when this model cannot price (k, rank) (an unmeasured k)."""
        ...

    def count(self, model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]] | None) -> float | None:
        """The cost of a whole model counted on the model itself, or None when it can only be predicted (a time is
        measured by verification instead)."""
        ...

    def narrowing_saving(self, cuts: Sequence[tuple[Chain, int]]) -> float | None:
        """What narrowing every chain to its width saves, counted exactly (chains that touch each other save less
        than the sum of their savings); None when this model cannot price one of the narrowed layers."""
        ...


@dataclass(frozen=True)
class ParamsCost:
    total: float
    bias_correction: bool = False  # data-aware factors add a bias where the layer has none
    name: str = "params"
    unit: str = ""

    def dense(self, layer: Layer) -> float:
        return cost.dense_params(layer)

    def factorized(self, layer: Layer, k: int, rank: int) -> float | None:
        return cost.factorized_params(layer, k, rank, self.bias_correction)

    def count(self, model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]] | None) -> float | None:
        return cost.model_params(model)

    def narrowing_saving(self, cuts: Sequence[tuple[Chain, int]]) -> float | None:
        return cost.narrowing_saving(cuts, "params")


@dataclass(frozen=True)
class FlopsCost:
    total: float
    name: str = "flops"
    unit: str = ""

    def dense(self, layer: Layer) -> float:
        return cost.dense_flops(layer)

    def factorized(self, layer: Layer, k: int, rank: int) -> float | None:
        return cost.factorized_flops(layer, k, rank)

    def count(self, model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]] | None) -> float | None:
        return None if shapes is None else cost.model_flops(model, shapes)

    def narrowing_saving(self, cuts: Sequence[tuple[Chain, int]]) -> float | None:
        return cost.narrowing_saving(cuts, "flops")


def interpolate(points: Sequence[tuple[int, float]], rank: int) -> float:
    """Piecewise-linear cost at `rank` through measured (rank, cost) points sorted by rank.

    Below the first point the first point's cost is used and above the last the last one's (never extrapolated:
    a guess beyond the measurements must not look cheaper than what was measured).
    """
    if not points:
        raise ValueError("no measured points to interpolate")
    ranks = [r for r, _ in points]
    if rank <= ranks[0]:
        return float(points[0][1])
    if rank >= ranks[-1]:
        return float(points[-1][1])
    right = bisect.bisect_left(ranks, rank)
    (r0, c0), (r1, c1) = points[right - 1], points[right]
    if r1 == rank:
        return float(c1)
    return float(c0 + (c1 - c0) * (rank - r0) / (r1 - r0))


def _rounds_at(points: Sequence[int], rounds: Sequence[Sequence[float]], rank: int) -> tuple[float, ...]:
    """Each round's milliseconds at `rank`, interpolated between the grid `points` as the medians are."""
    return tuple(interpolate(list(zip(points, column)), rank) for column in zip(*rounds))


@dataclass(frozen=True)
class FormTiming:
    """Measured milliseconds of one layer factorized with k groups, at a grid of ranks; with the per-round times
    of every grid rank (`rounds`, parallel to `points`), timed interleaved with the dense layer's rounds."""

    points: tuple[tuple[int, float], ...]  # (rank, ms), sorted by rank
    aligned_to: int = 1  # > 1: ranks off this multiple were measured slower, so only its multiples are offered
    rounds: tuple[tuple[float, ...], ...] = ()  # per grid point: ms of every timed round; () when not kept

    def ms(self, rank: int) -> float:
        """Interpolated between the measured ranks (for a rank off `aligned_to`, an underestimate)."""
        return interpolate(self.points, rank)

    def rounds_at(self, rank: int, full: tuple[int, tuple[float, ...]] | None = None) -> tuple[float, ...]:
        """Per-round milliseconds at `rank` (`full`: one more grid point, the dense layer's rounds at its width);
        () without per-round times."""
        if not self.rounds:
            return ()
        ranks, rounds = [r for r, _ in self.points], list(self.rounds)
        if full is not None:
            ranks, rounds = ranks + [full[0]], rounds + [full[1]]
        return _rounds_at(ranks, rounds, rank)

    def offers(self, rank: int) -> bool:
        return rank % self.aligned_to == 0


@dataclass(frozen=True)
class LayerTiming:
    """One layer's measured dense time, its factorized forms by k, and, for a layer that can lose channels, its
    time with fewer output channels (`rows`: channels kept -> ms) or fewer input channels (`columns`)."""

    dense_ms: float
    forms: Mapping[int, FormTiming] = field(default_factory=dict)
    rows: FormTiming | None = None
    columns: FormTiming | None = None
    dense_rounds: tuple[float, ...] = ()  # the dense layer's ms in every round its variants were timed in


NEAR_OVERHEAD = 2.0
"""A layer whose dense time is below this many times onnxruntime's per-node overhead (a one-Identity model timed
with the layers, `LatencyCost.overhead_ms`) is too small to time reliably: its own work is at most one more node's
overhead, the factorized form's extra node decides its time alone, and the guard does not filter it (the whole-model
check in `pipeline.run_apply` judges it with the rest)."""


@dataclass(frozen=True)
class LatencyCost:
    """Milliseconds: each layer from its timings, the rest of the model as measured.

    A factorized layer costs its dense time minus `realized` times the saving measured on the layer alone: the
    fraction of such savings a factorized model really delivered when timed whole (`layer_timing`). A narrowed
    layer is priced from its times with fewer output and with fewer input channels (the two ratios to dense
    multiplied when it loses both), its saving scaled by `realized_narrowing`, the fraction a narrowed model
    delivered (more than 1 where the per-channel ops and depthwise convs between shrink too).
    """

    total: float  # measured median of the original model
    timings: Mapping[str, LayerTiming]  # layer name -> timing
    realized: float = 1.0
    realized_narrowing: float = 1.0
    settings: RuntimeSettings = RuntimeSettings()  # the session options everything was timed with
    overhead_ms: float = 0.0  # a one-Identity model's time: onnxruntime's per-run, per-node overhead
    name: str = "latency"
    unit: str = "ms"

    def dense(self, layer: Layer) -> float:
        return self.timings[layer.name].dense_ms

    def factorized(self, layer: Layer, k: int, rank: int) -> float | None:
        form = self.timings[layer.name].forms.get(k)
        if form is None:
            return None
        dense = self.timings[layer.name].dense_ms
        return dense - self.realized * (dense - form.ms(rank))

    def offers(self, layer: Layer, k: int, rank: int) -> bool:
        """Whether (k, rank) is a form worth planning with: measured, and on the channel block when it matters."""
        form = self.timings[layer.name].forms.get(k)
        return form is not None and form.offers(rank)

    def count(self, model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]] | None) -> float | None:
        return None

    def at_overhead(self, layers: Sequence[Layer]) -> bool:
        """Whether `layers` are too small to time reliably: their dense times together below NEAR_OVERHEAD per-node
        overheads each."""
        dense = sum(self.timings[layer.name].dense_ms for layer in layers)
        return dense < NEAR_OVERHEAD * self.overhead_ms * len(layers)

    def slower(self, layer: Layer, k: int, rank: int) -> bool:
        """The never-slower guard's one decision for a factorized layer: measured slower than dense beyond noise
        (the paired sign test on the per-round times of the one interleaved measurement, `noise.slower_beyond_noise`;
        the realized fraction scales every round's saving alike, so it does not change the verdict). A layer at the
        per-node overhead is never filtered alone, nor a form slower by at most one per-node overhead
        (`slower_by_more_than_a_node`). Without per-round times (a hand-made timing), the medians decide."""
        timing = self.timings[layer.name]
        form = timing.forms.get(k)
        if form is None or self.at_overhead([layer]):
            return False
        variant = form.rounds_at(rank)
        if not variant or not timing.dense_rounds:
            return form.ms(rank) > timing.dense_ms
        return slower_by_more_than_a_node(variant, timing.dense_rounds, self.overhead_ms)

    def narrowing_slower(self, cuts: Sequence[tuple[Chain, int]]) -> bool:
        """The guard's decision for narrowed layers: the narrowed layers' summed per-round times slower than their
        dense rounds beyond noise (as `slower`); layers at the per-node overhead together are never filtered."""
        shapes = list(cost.narrowed_shapes(cuts).values())
        if not shapes or self.at_overhead([layer for layer, _, _ in shapes]):
            return False
        dense_total, narrowed_total = None, None
        for layer, rows, columns in shapes:
            timing = self.timings.get(layer.name)
            if timing is None:
                return False
            rounds = self._narrowed_rounds(layer, timing, rows, columns)
            if rounds is None:  # no per-round times: the medians decide
                ms = self.narrowed(layer, rows, columns)
                return ms is not None and self.narrowing_saving(cuts) < 0
            dense_total = timing.dense_rounds if dense_total is None else tuple(map(sum, zip(dense_total,
                                                                                         timing.dense_rounds)))
            narrowed_total = rounds if narrowed_total is None else tuple(map(sum, zip(narrowed_total, rounds)))
        return slower_beyond_noise(narrowed_total, dense_total)

    @staticmethod
    def _narrowed_rounds(layer, timing: LayerTiming, rows: int, columns: int) -> tuple[float, ...] | None:
        if not timing.dense_rounds:
            return None
        ms = timing.dense_rounds
        for kept, full, form in ((rows, layer.out_channels, timing.rows), (columns, layer.in_channels, timing.columns)):
            if kept != full:
                if form is None or not form.rounds:
                    return None
                at = form.rounds_at(kept, (full, timing.dense_rounds))
                ms = tuple(m * a / max(d, 1e-12) for m, a, d in zip(ms, at, timing.dense_rounds))
        return ms

    def narrowed(self, layer: Layer, rows: int, columns: int) -> float | None:
        """The layer's measured time with `rows` output and `columns` input channels (interpolated between the
        timed widths; None when a needed width was not timed)."""
        timing = self.timings.get(layer.name)
        if timing is None:
            return None
        ms = timing.dense_ms
        for kept, full, form in ((rows, layer.out_channels, timing.rows), (columns, layer.in_channels, timing.columns)):
            if kept != full:
                if form is None:
                    return None
                ms *= interpolate([*form.points, (full, timing.dense_ms)], kept) / max(timing.dense_ms, 1e-12)
        return ms

    def narrowing_saving(self, cuts: Sequence[tuple[Chain, int]]) -> float | None:
        saving = 0.0
        for layer, rows, columns in cost.narrowed_shapes(cuts).values():
            ms = self.narrowed(layer, rows, columns)
            if ms is None:
                return None
            saving += self.timings[layer.name].dense_ms - ms
        return self.realized_narrowing * saving


def build_cost_models(
    params_total: float,
    flops_total: float | None,
    bias_correction: bool,
    latency: LatencyCost | None = None,
) -> dict[str, CostModel]:
    """The cost models an analysis can plan with: params always, flops with concrete shapes, latency if measured."""
    models: dict[str, CostModel] = {"params": ParamsCost(params_total, bias_correction)}
    if flops_total is not None:
        models["flops"] = FlopsCost(flops_total)
    if latency is not None:
        models["latency"] = latency
    return models
