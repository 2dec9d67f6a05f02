"""Turn each discovered layer into its candidate factorizations, each with an error and a cost.

For every candidate group count k (the divisors of the layer's input channels up to `max_groups`) the layer is
decomposed once (`decomposition`): by the SVD of its weight, or, with calibration statistics, by the output-optimal
projection on its real inputs (`projection`). Every rank r then gives a candidate (k, r) whose error comes from that
decomposition and whose costs come from the analysis' cost models (`cost_models`: params, flops, latency). Only
candidates saving at least `cost.MIN_SAVING` of the dense layer are kept, and with `rank_multiple` only ranks that are multiples of it.
With measured latencies, only the ranks the latency model prices are kept (on onnxruntime's channel block where
the measurement showed that ranks off it are slower), and the never-slower guard keeps only candidates measured
faster than the dense layer (`GUARD_RATIO`). The decompositions are kept, so apply writes the factors without
decomposing again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

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
from onnx_lowrank.stages.parallel import map_in_order, single_threaded_blas
from onnx_lowrank.math.projection import DEFAULT_SHRINKAGE, OutputDecomposition, shrunk_covariance
from onnx_lowrank.math.statistics import InputStatistics
from onnx_lowrank.math.svd import Factors

__all__ = ["Candidate", "LayerAnalysis", "Analysis", "analyze_layers", "factors_of", "WEIGHT_MEASURE",
           "OUTPUT_MEASURE", "GUARD_RATIO", "WidthCandidate", "ChainAnalysis", "analyze_chains", "cuts_of",
           "default_method"]



def default_method(calibrated: bool, metric: str | None = None) -> str:
    """The method when none is given: `both` with calibration data (narrowing needs it), else `lowrank`. The
    benchmark chose it (README, Neuron elimination): on the calibration samples `both` never does worse than
    low rank alone, whose plans are among those it judges."""
    return "both" if calibrated else "lowrank"

MIN_ROWS_PER_CHANNEL = 2
"""Calibration rows (positions) needed per channel of a chain before its channels are judged dependent."""

GUARD_RATIO = 0.95
"""The never-slower guard keeps a candidate only if its measured time is at most this fraction of the dense
layer's: a margin over the few percent by which repeated measurements of one layer differ."""

WEIGHT_MEASURE = "spectral"
"""Errors are relative spectral errors of the weight, ||W - W_hat||_2 / ||W||_2 (no data)."""
OUTPUT_MEASURE = "output"
"""Errors are relative output errors of the layer on the calibration data, ||Y - Y_hat||_F / ||Y - mean(Y)||_F:
relative to how much the output varies (`math.projection`)."""


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
    shrinkage: float = DEFAULT_SHRINKAGE,
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
        return _analyze_layer(layer, max_groups, rank_multiple, layer_statistics, float(shrinkage), costs, guard)

    layers = []
    with single_threaded_blas():
        for entry in map_in_order(one, discovery.layers):
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
    )


def _decompositions(layer: Layer, max_groups: int, statistics: InputStatistics | None, shrinkage: float):
    counts = group_counts(layer, max_groups)
    matrix = layer.read_matrix()  # read once for every k; the decompositions keep what they need, not the matrix
    if statistics is None:
        reread = layer.read_matrix
        first = WeightDecomposition(matrix, 1, reread=reread)  # k = 1 first: its largest singular value is ||W||_2
        norm = first.reference_norm
        return {k: first if k == 1 else WeightDecomposition(matrix, k, norm, reread=reread) for k in counts}
    covariance = shrunk_covariance(statistics, shrinkage)  # once per layer, shared by every k
    return {
        k: OutputDecomposition(matrix, statistics, k, bias=layer.bias, shrinkage=shrinkage, covariance=covariance)
        for k in counts
    }


def _offered(layer: Layer, k: int, rank: int, shifted: bool, latency: LatencyCost | None, guard: bool) -> bool:
    """Saves at least cost.MIN_SAVING; priced by the latency model when there is one; and, guarded, measured faster."""
    if not cost.is_smaller(layer, k, rank, shifted):
        return False
    if latency is None:
        return True
    if not latency.offers(layer, k, rank):
        return False
    return not guard or latency.factorized(layer, k, rank) <= GUARD_RATIO * latency.dense(layer)


def _analyze_layer(layer: Layer, max_groups: int, rank_multiple: int, statistics, shrinkage: float,
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
                   costs: Mapping[str, CostModel], block: int = 1, guard: bool = False
                   ) -> tuple[tuple[ChainAnalysis, ...], tuple[Skipped, ...]]:
    """Width candidates of every chain, from its readers' calibration statistics and the channel statistics of the
    tensors they are fitted on (`channels`, by tensor name; see `elimination`), each priced by every cost model
    that can price it; and the chains skipped because the samples are too few to tell which channels the others
    reproduce (with fewer rows than channels, every channel looks like a combination of the others). With `block`
    > 1 (onnxruntime's channel block, when latencies are measured) a chain with a 2-D Conv keeps widths on the
    block; with `guard`, only widths measured to save at least 1 - GUARD_RATIO of its layers' time are kept."""
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
        fits = chain.fits
        readers = [Reader(r.read_matrix(), r.taps, statistics[r.name], r.bias, fit=fits.index(tensor))
                   for r, tensor in zip(chain.readers, chain.fitted_on)]
        elimination = ChannelElimination(readers, chain.channels, [channels[name] for name in fits])
        n = chain.channels
        dense = sum(cost.dense_params(layer) for layer in chain.layers)
        dense_ms = sum(latency.dense(layer) for layer in chain.layers) if latency is not None else None
        offered = []
        for width in widths(n, elimination.rank, width_alignment(chain, block)):
            if width >= n:
                continue
            savings = {name: model.narrowing_saving([(chain, width)]) for name, model in costs.items()}
            savings = {name: value for name, value in savings.items() if value is not None}
            if savings["params"] < cost.MIN_SAVING * dense:
                continue
            if guard and savings.get("latency", 0.0) < (1.0 - GUARD_RATIO) * dense_ms:
                continue  # the never-slower guard, as for factorized layers
            offered.append((width, savings))
        errors = elimination.errors([w for w, _ in offered]) if offered else []
        candidates = tuple(WidthCandidate(width=w, error=float(e), savings=sv) for (w, sv), e in zip(offered, errors))
        return ChainAnalysis(chain=chain, elimination=elimination, candidates=candidates)

    with single_threaded_blas():
        return tuple(map_in_order(one, usable)), tuple(skipped)
