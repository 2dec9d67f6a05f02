"""Turn each discovered layer into its candidate factorizations, each with an error and a cost.

For every candidate group count k (the divisors of the layer's input channels up to `max_groups`) the layer is
decomposed once (`decomposition`): by the SVD of its weight, or, with calibration statistics, by the output-optimal
projection on its real inputs (`projection`). Every rank r then gives a candidate (k, r) whose error comes from that
decomposition and whose costs come from the analysis' cost models (`cost_models`: params, flops, latency). Only
candidates saving at least `cost.MIN_SAVING` of the dense layer are kept, and with `rank_multiple` only ranks that are multiples of it.
With measured latencies, only the ranks the latency model prices are kept (on onnxruntime's channel block where
the measurement showed that ranks off it are slower), and the never-slower guard removes the candidates measured
slower than the dense layer beyond the noise of the timing rounds, never a layer at the per-node overhead
(`LatencyCost.slower`, `LatencyCost.narrowing_slower`). The decompositions are kept, so apply writes the factors without
decomposing again.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import onnx

from onnx_lowrank.stages import costs as cost
from onnx_lowrank.stages.cost_models import CostModel, LatencyCost, build_cost_models
from onnx_lowrank.math.decomposition import Decomposition, WeightDecomposition
from onnx_lowrank.stages.discover import Discovery
from onnx_lowrank.math.elimination import ChannelElimination, Folded, Reader, widths
from onnx_lowrank.ops.base import group_counts, width_alignment
from onnx_lowrank.ops.layer import Chain, Layer, Skipped
from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.stages.parallel import map_all, map_in_order, single_threaded_blas
from onnx_lowrank.math.projection import (DEFAULT_SHRINKAGE, OutputDecomposition, adaptive_shrinkage,
                                          oas_intensity, shrunk_covariance)
from onnx_lowrank.math.statistics import InputStatistics
from onnx_lowrank.math.svd import Factors

__all__ = ["Candidate", "LayerAnalysis", "Analysis", "analyze_layers", "factors_of", "WEIGHT_MEASURE",
           "OUTPUT_MEASURE", "WidthCandidate", "ChainAnalysis", "analyze_chains", "cuts_of", "ThinLayer",
           "FALLBACK_ROW_FRACTION", "reanalyzed", "weight_only"]


MIN_ROWS_PER_CHANNEL = 2
"""Calibration rows (positions) needed per channel of a chain before its channels are judged dependent."""

WEIGHT_MEASURE = "spectral"
"""Errors are relative spectral errors of the weight, ||W - W_hat||_2 / ||W||_2 (no data)."""
OUTPUT_MEASURE = "output"
"""Errors are relative output errors of the layer on the calibration data, ||Y - Y_hat||_F / ||Y - mean(Y)||_F:
relative to how much the output varies (`math.projection`)."""


FALLBACK_ROW_FRACTION = 1 / 8
"""With the adaptive (default) shrinkage, a layer calibrated on fewer rows than this fraction of its input dimension
d, or whose OAS intensity is 1 (inputs indistinguishable from isotropic noise), falls back to the weight-only
truncation: its statistics are the isotropic part alone, (trace(Sigma) / d) I, so its factors are the weight's own
(Frobenius) truncation with the bias correction, and its error is the relative output error under isotropic inputs.
On such rows the projection only fits the few directions the rows span (6 rows of a 512-wide layer: error 0.02 on
them, the model's top-1 agreement 0.33 on other samples). Calibration studies (notes) kept data-aware layers with
0.46-0.8 rows per dimension well ahead of weight-only, so the line is drawn far below that."""


class ThinLayer(NamedTuple):
    """A layer calibrated on fewer rows than its input dimension: (name, rows, dims), and whether it fell back to
    the weight-only truncation (`FALLBACK_ROW_FRACTION`)."""

    name: str
    rows: int
    dims: int
    weight_only: bool


@dataclass(frozen=True)
class Candidate:
    """One way to factorize a layer: k groups of rank r, its planning error and its cost."""

    k: int
    rank: int
    error: float  # spectral: upper bound (exact for k = 1); output: exact on the calibration statistics
    costs: Mapping[str, float]  # cost model name -> the factorized layer's cost


@dataclass(frozen=True, eq=False)
class LayerAnalysis:
    layer: Layer
    decompositions: Mapping[int, Decomposition]  # k -> the layer decomposed with k input-channel groups
    candidates: tuple[Candidate, ...]  # sorted by (k, rank); each saves at least cost.MIN_SAVING
    dense: Mapping[str, float]  # cost model name -> the dense layer's cost


@dataclass(frozen=True)
class WidthCandidate:
    """One way to narrow a chain: keep `width` channels, with its output error and what it saves."""

    width: int
    error: float  # relative output error of the readers on the calibration statistics (exact)
    savings: Mapping[str, float]  # cost model name -> what the model saves (every model that can price it)


@dataclass(frozen=True, eq=False)
class ChainAnalysis:
    chain: Chain
    elimination: ChannelElimination
    candidates: tuple[WidthCandidate, ...]  # by rising width; each saves at least cost.MIN_SAVING of its layers


@dataclass(frozen=True, eq=False)
class Analysis:
    """Everything the planner needs: per-layer candidates and the whole model's costs."""

    layers: tuple[LayerAnalysis, ...]
    skipped: tuple[Skipped, ...]
    costs: Mapping[str, CostModel]  # name -> cost model; params always, flops and latency when available
    rank_multiple: int = 1
    guarded: bool = False  # only candidates measured faster than their dense layer were kept
    measure: str = WEIGHT_MEASURE  # what the candidates' errors measure
    calibration: str | None = None  # where the calibration statistics came from (None: weight-only)
    calibration_key: tuple = ()  # identifies those samples (`inputs.Samples.key`), to tell in-sample verification
    notes: tuple[str, ...] = ()  # what was read differently from the file (initializers listed as inputs)
    method: str = "lowrank"  # see METHODS
    chains: tuple[ChainAnalysis, ...] = ()  # narrowable layers (method eliminate or both)
    unnarrowed: tuple[Skipped, ...] = ()  # layers whose channels cannot be cut, and why
    context: object | None = None  # the `pipeline.Context` (model, samples, settings) it was made from
    thin_calibration: tuple[ThinLayer, ...] = ()  # layers with fewer calibration rows than input dimensions
    fold_statistics: tuple[Mapping[str, InputStatistics], ...] = ()  # per judge fold, its fit rows' statistics
    fold_channels: tuple[Mapping[str, InputStatistics], ...] = ()  # per judge fold, its fit rows' channel statistics

    def total(self, metric: str) -> float | None:
        """The original model's cost in `metric`, or None when this analysis cannot count it."""
        model = self.costs.get(metric)
        return None if model is None else model.total

    def layer(self, name: str) -> LayerAnalysis:
        for analysis in self.layers:
            if analysis.layer.name == name:
                return analysis
        raise KeyError(name)


def factors_of(analysis: Analysis, choices: Mapping[str, tuple[int, int]],
               progress: Callable[[int, int], None] | None = None) -> Iterator[tuple[Layer, Factors, float]]:
    """(layer, factors, measured error) of every layer `choices` names (layer -> (k, rank)), in model order, from
    the analysis' decompositions: nothing is decomposed again. The choices are checked now; the factors come one
    layer at a time as they are iterated (computed a few layers ahead in parallel, `parallel`), so a caller that
    writes each into the model and lets it go never holds every layer's factors. `progress(done, total)` follows
    them."""
    jobs = []
    for entry in analysis.layers:
        choice = choices.get(entry.layer.name)
        if choice is None:
            continue
        decomposition = entry.decompositions.get(choice[0])
        if decomposition is None:  # a k the analysis did not consider (a hand-edited plan)
            raise InvalidOptionError(
                f"The plan splits layer {entry.layer.name!r} into k={choice[0]} groups, which the analysis did "
                f"not consider (its k: {sorted(entry.decompositions)}); analyse with a larger max_groups."
            )
        jobs.append((entry.layer, decomposition, choice[1]))
    return _written(jobs, progress)


def _written(jobs, progress) -> Iterator[tuple[Layer, Factors, float]]:
    def one(job) -> tuple[Layer, Factors, float]:
        layer, decomposition, rank = job
        return (layer, *decomposition.written(rank))

    with single_threaded_blas():
        for done, result in enumerate(map_in_order(one, jobs), start=1):
            if progress is not None:
                progress(done, len(jobs))
            yield result


def analyze_layers(
    model: onnx.ModelProto,
    discovery: Discovery,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    max_groups: int = 8,
    rank_multiple: int = 1,
    progress: Callable[[Layer], None] | None = None,
    statistics: Mapping[str, InputStatistics] | None = None,
    shrinkage: float | None = DEFAULT_SHRINKAGE,
    calibration: str | None = None,
    calibration_key: tuple = (),
    latency: LatencyCost | None = None,
    guard: bool = False,
) -> Analysis:
    """Decompositions and candidates of every discovered layer, and the cost models of the whole model.

    With `statistics` (layer name -> input statistics, from `calibrate.collect_statistics`) every layer is decomposed
    on its calibration inputs and errors are relative output errors; without, weight-only. With `latency` (measured
    by `layer_timing`) candidates are priced in milliseconds too, and `guard` drops those not faster than dense.
    """
    if guard and latency is None:
        raise InvalidOptionError("The never-slower guard needs measured latencies.")
    costs = build_cost_models(
        params_total=cost.model_params(model),
        flops_total=cost.model_flops(model, shapes) if shapes is not None else None,
        bias_correction=statistics is not None,  # data-aware factors carry a bias correction
        latency=latency,
    )
    def one(layer: Layer) -> LayerAnalysis:
        layer_statistics = None if statistics is None else statistics[layer.name]
        return _analyze_layer(layer, max_groups, rank_multiple, layer_statistics, shrinkage, costs, guard)

    layers = []
    with single_threaded_blas():
        for entry in map_all(one, discovery.layers):
            layers.append(entry)
            if progress is not None:
                progress(entry.layer)
    return Analysis(
        layers=tuple(layers),
        skipped=discovery.skipped,
        costs=costs,
        guarded=guard,
        rank_multiple=rank_multiple,
        measure=WEIGHT_MEASURE if statistics is None else OUTPUT_MEASURE,
        calibration=calibration if statistics is not None else None,
        calibration_key=calibration_key if statistics is not None else (),
        thin_calibration=() if statistics is None else thin_layers(layers, statistics, shrinkage),
    )


def reanalyzed(analysis: Analysis, statistics: Mapping[str, InputStatistics], shrinkage: float | None,
               channels: Mapping[str, InputStatistics] | None = None) -> Analysis:
    """`analysis` with every layer decomposed again on other calibration statistics (a subset of the rows: the
    judge's fit rows), the same group counts, rank multiple, cost models (measured latencies reused) and guard; with
    `channels` (the same rows' channel statistics) every narrowable chain fitted again on them too, with the same
    widths offered, so a narrowed plan is scored on rows that did not fit it either."""
    def one(entry: LayerAnalysis) -> LayerAnalysis:
        return _analyze_layer(entry.layer, max(entry.decompositions), analysis.rank_multiple,
                              statistics[entry.layer.name], shrinkage, analysis.costs, analysis.guarded)

    def chain(entry: ChainAnalysis) -> ChainAnalysis:
        elimination = _elimination(entry.chain, statistics, channels, entry.elimination.rounded, entry.elimination)
        errors = elimination.errors([c.width for c in entry.candidates]) if entry.candidates else []
        return replace(entry, elimination=elimination,
                       candidates=tuple(replace(c, error=float(e)) for c, e in zip(entry.candidates, errors)))

    with single_threaded_blas():
        layers = map_all(one, analysis.layers)
        chains = map_all(chain, analysis.chains) if channels is not None and analysis.chains else analysis.chains
    return replace(analysis, layers=layers, chains=tuple(chains),
                   thin_calibration=thin_layers(layers, statistics, shrinkage), fold_statistics=(), fold_channels=())


_WEIGHT_ONLY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # analysis -> its weight-only analysis


def weight_only(analysis: Analysis) -> Analysis:
    """`analysis` decomposed from the weights alone (as `analyze_layers` without statistics): the same layers, group
    counts, rank multiple, measured latencies and guard, params priced without the bias correction, no chains (their
    fits need data) and no context. Made once per analysis (the judge's candidates and the plan written from them
    share it); an analysis that is weight-only already is its own."""
    if analysis.measure == WEIGHT_MEASURE:
        return analysis
    made = _WEIGHT_ONLY.get(analysis)
    if made is None:
        costs = dict(analysis.costs)
        costs["params"] = replace(costs["params"], bias_correction=False)

        def one(entry: LayerAnalysis) -> LayerAnalysis:
            return _analyze_layer(entry.layer, max(entry.decompositions), analysis.rank_multiple, None, None, costs,
                                  analysis.guarded)

        with single_threaded_blas():
            layers = map_all(one, analysis.layers)
        made = replace(analysis, layers=layers, costs=costs, measure=WEIGHT_MEASURE, calibration=None,
                       calibration_key=(), method="lowrank", chains=(), unnarrowed=(), context=None,
                       thin_calibration=(), fold_statistics=())
        _WEIGHT_ONLY[analysis] = made
    return made


def falls_back(statistics: InputStatistics, shrinkage: float | None) -> bool:
    """Whether the layer is decomposed weight-only though calibrated (`FALLBACK_ROW_FRACTION`): only with the
    adaptive shrinkage (a number given by the user fixes the decomposition)."""
    return shrinkage is None and statistics.count < FALLBACK_ROW_FRACTION * statistics.dim


def thin_layers(layers: Sequence[LayerAnalysis], statistics: Mapping[str, InputStatistics],
                shrinkage: float | None) -> tuple[ThinLayer, ...]:
    """The layers calibrated on fewer rows than their input dimension, in model order, and which fell back."""
    thin = []
    for entry in layers:
        found = statistics[entry.layer.name]
        if found.count < found.dim:
            fell_back = falls_back(found, shrinkage) or getattr(entry.decompositions.get(1), "shrinkage", 0) == np.inf
            thin.append(ThinLayer(entry.layer.name, int(found.count), int(found.dim), bool(fell_back)))
    return tuple(thin)


def layer_shrinkage(statistics: InputStatistics, shrinkage: float | None) -> float:
    """The shrinkage a layer is decomposed with: the user's number, inf when it falls back (`falls_back`), else
    the OAS shrinkage of its own statistics."""
    if shrinkage is not None:
        return float(shrinkage)
    if falls_back(statistics, shrinkage):
        return np.inf
    return adaptive_shrinkage(oas_intensity(shrunk_covariance(statistics, 0.0), statistics.count))


def _decompositions(layer: Layer, max_groups: int, statistics: InputStatistics | None, shrinkage: float | None):
    counts = group_counts(layer, max_groups)
    matrix = layer.read_matrix()  # read once for every k; the decompositions keep what they need, not the matrix
    if statistics is None:
        reread = layer.read_matrix
        first = WeightDecomposition(matrix, 1, reread=reread)  # k = 1 first: its largest singular value is ||W||_2
        norm = first.reference_norm
        return {k: first if k == 1 else WeightDecomposition(matrix, k, norm, reread=reread) for k in counts}
    shrinkage = layer_shrinkage(statistics, shrinkage)
    covariance = shrunk_covariance(statistics, shrinkage)  # once per layer, shared by every k
    return {
        k: OutputDecomposition(matrix, statistics, k, bias=layer.bias, shrinkage=shrinkage, covariance=covariance)
        for k in counts
    }


def _offered(layer: Layer, k: int, rank: int, shifted: bool, latency: LatencyCost | None, guard: bool) -> bool:
    """Saves at least cost.MIN_SAVING; priced by the latency model when there is one; and, guarded, not measured
    slower than dense beyond noise (`LatencyCost.slower`)."""
    if not cost.is_smaller(layer, k, rank, shifted):
        return False
    if latency is None:
        return True
    if not latency.offers(layer, k, rank):
        return False
    return not guard or not latency.slower(layer, k, rank)


def _analyze_layer(layer: Layer, max_groups: int, rank_multiple: int, statistics, shrinkage: float | None,
                   costs: Mapping[str, CostModel], guard: bool) -> LayerAnalysis:
    decompositions = _decompositions(layer, max_groups, statistics, shrinkage)
    shifted = statistics is not None  # data-aware factors carry a bias correction
    latency = costs.get("latency")
    candidates: list[Candidate] = []
    for k, decomposition in decompositions.items():
        ranks = np.arange(rank_multiple, decomposition.max_rank + 1, rank_multiple)
        ranks = ranks[[_offered(layer, k, int(r), shifted, latency, guard) for r in ranks]]
        errors = decomposition.errors(ranks) if len(ranks) else np.zeros(0)
        for rank, error in zip(ranks.tolist(), errors.tolist()):
            prices = {name: model.factorized(layer, k, rank) for name, model in costs.items()}
            candidates.append(Candidate(k=k, rank=rank, error=error, costs=prices))
    dense = {name: model.dense(layer) for name, model in costs.items()}
    return LayerAnalysis(layer=layer, decompositions=decompositions, candidates=tuple(candidates), dense=dense)


def cuts_of(analysis: Analysis, widths: Mapping[str, int]) -> list[tuple[Chain, Folded]]:
    """(chain, folded) of every chain `widths` names (chain name -> channels kept), in model order."""
    chains = {entry.chain.name: entry for entry in analysis.chains}
    for name, width in widths.items():
        if name not in chains:
            reason = next((s.reason for s in analysis.unnarrowed if s.name == name), None)
            raise InvalidOptionError(f"The plan narrows {name!r}, which is not a narrowable layer of this model"
                                     + (f" ({reason})" if reason else "") + ".")
        if not 1 <= width < chains[name].chain.channels:
            raise InvalidOptionError(f"The plan keeps {width} channels of {name!r}; it has "
                                     f"{chains[name].chain.channels}, so keep 1 to {chains[name].chain.channels - 1}.")
    return [(e.chain, e.elimination.fold(widths[e.chain.name])) for e in analysis.chains if e.chain.name in widths]


def analyze_chains(chains, statistics: Mapping[str, InputStatistics], channels: Mapping[str, InputStatistics],
                   costs: Mapping[str, CostModel], block: int = 1, guard: bool = False, rounded: bool = False
                   ) -> tuple[tuple[ChainAnalysis, ...], tuple[Skipped, ...]]:
    """Width candidates of every chain, from its readers' calibration statistics and the channel statistics of the
    tensors they are fitted on (`channels`, by tensor name; see `elimination`), each priced by every cost model
    that can price it; and the chains skipped because the samples are too few to tell which channels the others
    reproduce (with fewer rows than channels, every channel looks like a combination of the others). With `block`
    > 1 (onnxruntime's channel block, when latencies are measured) a chain with a 2-D Conv keeps widths on the
    block; with `guard`, widths measured slower than the dense layers beyond noise are dropped; with `rounded` (an
    int8 deployment) the fits and errors count the rounding noise of the activations (`elimination`)."""
    usable, skipped = [], []
    for chain in chains:
        rows = min(channels[name].count for name in chain.fits)
        if chain.channels < 2 or rows < MIN_ROWS_PER_CHANNEL * chain.channels:
            reason = (f"{rows} calibration rows cannot tell which of its {chain.channels} channels the others "
                      f"reproduce; give samples with at least {MIN_ROWS_PER_CHANNEL * chain.channels} positions")
            skipped += [Skipped(name=p.name, op=p.op, reason=reason) for p in chain.producers]
        else:
            usable.append(chain)
    latency = costs.get("latency")

    def one(chain: Chain) -> ChainAnalysis:
        elimination = _elimination(chain, statistics, channels, rounded)
        n = chain.channels
        dense = sum(cost.dense_params(layer) for layer in chain.layers)
        offered = []
        for width in widths(n, elimination.rank, width_alignment(chain, block)):
            if width >= n:
                continue
            savings = {name: model.narrowing_saving([(chain, width)]) for name, model in costs.items()}
            savings = {name: value for name, value in savings.items() if value is not None}
            if savings["params"] < cost.MIN_SAVING * dense:
                continue
            if guard and latency is not None and latency.narrowing_slower([(chain, width)]):
                continue  # the never-slower guard, as for factorized layers (`LatencyCost.narrowing_slower`)
            offered.append((width, savings))
        errors = elimination.errors([w for w, _ in offered]) if offered else []
        candidates = tuple(WidthCandidate(width=w, error=float(e), savings=sv) for (w, sv), e in zip(offered, errors))
        return ChainAnalysis(chain=chain, elimination=elimination, candidates=candidates)

    with single_threaded_blas():
        return map_all(one, usable), tuple(skipped)


def _elimination(chain: Chain, statistics: Mapping[str, InputStatistics], channels: Mapping[str, InputStatistics],
                 rounded: bool, like: ChannelElimination | None = None) -> ChannelElimination:
    """The chain's elimination: its readers on their input statistics, fitted on its tensors' channel statistics;
    with `like` (one of the same chain, on other statistics) its readers' matrices, not the weights read again."""
    fits = chain.fits
    matrices = [r.read_matrix() for r in chain.readers] if like is None else [r.matrix for r in like.readers]
    readers = [Reader(matrix, r.taps, statistics[r.name], r.bias, fit=fits.index(tensor))
               for matrix, r, tensor in zip(matrices, chain.readers, chain.fitted_on)]
    return ChannelElimination(readers, chain.channels, [channels[name] for name in fits], rounded=rounded)
