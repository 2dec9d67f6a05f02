"""Turn each discovered layer into its candidate factorizations, each with an error and a cost.

For every candidate group count k (the divisors of the layer's input channels up to `max_groups`) the layer is
decomposed once (`decomposition`): by the SVD of its weight, or, with calibration statistics, by the output-optimal
projection on its real inputs (`projection`). Every rank r then gives a candidate (k, r) whose error comes from that
decomposition and whose cost comes from `cost`. Only candidates smaller than the dense layer are kept, and with
`rank_multiple` only ranks that are multiples of it (onnxruntime's blocked conv kernels want channel counts in
multiples of 8 or 16). The decompositions are kept, so apply writes the factors without decomposing again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from . import cost
from .decomposition import Decomposition, WeightDecomposition
from .discover import Discovery, Layer, Skipped
from .errors import InvalidOptionError
from .projection import DEFAULT_SHRINKAGE, OutputDecomposition, shrunk_covariance
from .statistics import InputStatistics
from .svd import Factors

__all__ = ["Candidate", "LayerAnalysis", "Analysis", "analyze_layers", "group_counts", "factors_of", "WEIGHT_MEASURE", "OUTPUT_MEASURE"]

WEIGHT_MEASURE = "spectral"
"""Errors are relative spectral errors of the weight, ||W - W_hat||_2 / ||W||_2 (no data)."""
OUTPUT_MEASURE = "output"
"""Errors are relative output errors of the layer on the calibration data, ||Y - Y_hat||_F / ||Y||_F."""


@dataclass(frozen=True)
class Candidate:
    """One way to factorize a layer: k groups of rank r, its planning error and its cost."""

    k: int
    rank: int
    error: float  # spectral: upper bound (exact for k = 1); output: exact on the calibration statistics
    params: int
    flops: int | None


@dataclass(frozen=True, eq=False)
class LayerAnalysis:
    layer: Layer
    decompositions: Mapping[int, Decomposition]  # k -> the layer decomposed with k input-channel groups
    candidates: tuple[Candidate, ...]  # sorted by (k, rank); all smaller than the dense layer

    @property
    def dense_params(self) -> int:
        return cost.dense_params(self.layer)

    @property
    def dense_flops(self) -> int | None:
        return cost.dense_flops(self.layer)


@dataclass(frozen=True, eq=False)
class Analysis:
    """Everything the planner needs: per-layer candidates and the whole model's costs."""

    layers: tuple[LayerAnalysis, ...]
    skipped: tuple[Skipped, ...]
    total_params: int
    total_flops: int | None  # None when concrete input shapes are unknown
    rank_multiple: int = 1
    measure: str = WEIGHT_MEASURE  # what the candidates' errors measure
    calibration: str | None = None  # where the calibration statistics came from (None: weight-only)
    calibration_key: tuple = ()  # identifies those samples (`inputs.Samples.key`), to tell in-sample verification

    def layer(self, name: str) -> LayerAnalysis:
        for analysis in self.layers:
            if analysis.layer.name == name:
                return analysis
        raise KeyError(name)


def factors_of(analysis: Analysis, choices: Mapping[str, tuple[int, int]]) -> list[tuple[Layer, Factors, float]]:
    """(layer, factors, measured error) of every layer `choices` names (layer -> (k, rank)), in model order, from
    the analysis' decompositions: nothing is decomposed again."""
    chosen = []
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
        chosen.append((entry.layer, decomposition.factors(choice[1]), decomposition.measured_error(choice[1])))
    return chosen


def group_counts(layer: Layer, max_groups: int) -> list[int]:
    """Candidate k: divisors of the input channels up to `max_groups`; k > 1 for a MatMul needs its activation rank."""
    if layer.op == "MatMul" and layer.activation_rank is None:
        return [1]
    return [k for k in range(1, max_groups + 1) if layer.in_channels % k == 0]


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
) -> Analysis:
    """Decompositions and candidates of every discovered layer, plus the model's total params and FLOPs.

    With `statistics` (layer name -> input statistics, from `calibrate.collect_statistics`) every layer is decomposed
    on its calibration inputs and errors are relative output errors; without, weight-only.
    """
    if not isinstance(max_groups, int) or max_groups < 1:
        raise InvalidOptionError(f"max_groups must be a whole number >= 1. Got {max_groups!r} instead.")
    if not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise InvalidOptionError(f"rank_multiple must be a whole number >= 1. Got {rank_multiple!r} instead.")
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float)) or not 0 <= shrinkage < float("inf"):
        raise InvalidOptionError(f"shrinkage must be a finite number >= 0. Got {shrinkage!r} instead.")
    layers = []
    for layer in discovery.layers:
        layer_statistics = None if statistics is None else statistics[layer.name]
        layers.append(_analyze_layer(layer, max_groups, rank_multiple, layer_statistics, float(shrinkage)))
        if progress is not None:
            progress(layer)
    return Analysis(
        layers=tuple(layers),
        skipped=discovery.skipped,
        total_params=cost.model_params(model),
        total_flops=cost.model_flops(model, shapes) if shapes is not None else None,
        rank_multiple=rank_multiple,
        measure=WEIGHT_MEASURE if statistics is None else OUTPUT_MEASURE,
        calibration=calibration if statistics is not None else None,
        calibration_key=calibration_key if statistics is not None else (),
    )


def _decompositions(layer: Layer, max_groups: int, statistics: InputStatistics | None, shrinkage: float):
    counts = group_counts(layer, max_groups)
    if statistics is None:
        first = WeightDecomposition(layer.matrix, 1)  # k = 1 first: its largest singular value is ||W||_2
        norm = first.reference_norm
        return {k: first if k == 1 else WeightDecomposition(layer.matrix, k, norm) for k in counts}
    covariance = shrunk_covariance(statistics, shrinkage)  # once per layer, shared by every k
    return {
        k: OutputDecomposition(layer.matrix, statistics, k, bias=layer.bias, shrinkage=shrinkage, covariance=covariance)
        for k in counts
    }


def _analyze_layer(layer: Layer, max_groups: int, rank_multiple: int, statistics, shrinkage: float) -> LayerAnalysis:
    decompositions = _decompositions(layer, max_groups, statistics, shrinkage)
    shifted = statistics is not None  # data-aware factors carry a bias correction
    candidates: list[Candidate] = []
    for k, decomposition in decompositions.items():
        ranks = np.arange(rank_multiple, decomposition.max_rank + 1, rank_multiple)
        ranks = ranks[[cost.is_smaller(layer, k, int(r), shifted) for r in ranks]]
        errors = decomposition.errors(ranks) if len(ranks) else np.zeros(0)
        for rank, error in zip(ranks.tolist(), errors.tolist()):
            candidates.append(
                Candidate(
                    k=k,
                    rank=rank,
                    error=error,
                    params=cost.factorized_params(layer, k, rank, shifted),
                    flops=cost.factorized_flops(layer, k, rank),
                )
            )
    return LayerAnalysis(layer=layer, decompositions=decompositions, candidates=tuple(candidates))
