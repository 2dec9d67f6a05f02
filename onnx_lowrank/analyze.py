"""Turn each discovered layer into its candidate factorizations, each with an error and a cost.

For every candidate group count k (the divisors of the layer's input channels up to `max_groups`) the singular
values of every column group are computed once; from them every rank r gives a candidate (k, r) whose error comes
from `error.error_bound` and whose cost comes from `cost`. Only candidates smaller than the dense layer are kept,
and with `rank_multiple` only ranks that are multiples of it (onnxruntime's blocked conv kernels want channel
counts in multiples of 8 or 16). Full factors are not computed here: the plan needs only singular values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from . import cost
from .discover import Discovery, Layer, Skipped
from .error import Spectrum, error_bound
from .errors import InvalidOptionError
from .svd import group_singular_values

__all__ = ["Candidate", "LayerAnalysis", "Analysis", "analyze_layers", "group_counts"]


@dataclass(frozen=True)
class Candidate:
    """One way to factorize a layer: k groups of rank r, its planning error and its cost."""

    k: int
    rank: int
    error: float  # upper bound of the relative spectral error (exact for k = 1)
    params: int
    flops: int | None


@dataclass(frozen=True, eq=False)
class LayerAnalysis:
    layer: Layer
    spectra: Mapping[int, Spectrum]  # k -> singular values of the k groups
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

    def layer(self, name: str) -> LayerAnalysis:
        for analysis in self.layers:
            if analysis.layer.name == name:
                return analysis
        raise KeyError(name)


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
) -> Analysis:
    """Spectra and candidates of every discovered layer, plus the model's total params and FLOPs."""
    if not isinstance(max_groups, int) or max_groups < 1:
        raise InvalidOptionError(f"max_groups must be a whole number >= 1. Got {max_groups!r} instead.")
    if not isinstance(rank_multiple, int) or rank_multiple < 1:
        raise InvalidOptionError(f"rank_multiple must be a whole number >= 1. Got {rank_multiple!r} instead.")
    layers = []
    for layer in discovery.layers:
        layers.append(_analyze_layer(layer, max_groups, rank_multiple))
        if progress is not None:
            progress(layer)
    return Analysis(
        layers=tuple(layers),
        skipped=discovery.skipped,
        total_params=cost.model_params(model),
        total_flops=cost.model_flops(model, shapes) if shapes is not None else None,
        rank_multiple=rank_multiple,
    )


def _analyze_layer(layer: Layer, max_groups: int, rank_multiple: int) -> LayerAnalysis:
    spectra: dict[int, Spectrum] = {}
    candidates: list[Candidate] = []
    norm = None
    for k in group_counts(layer, max_groups):
        values = group_singular_values(layer.matrix, k)
        if norm is None:  # k = 1 comes first: its largest singular value is ||W||_2
            norm = float(values[0, 0])
        spectrum = Spectrum(k=k, singular_values=values, reference_norm=norm)
        spectra[k] = spectrum
        ranks = np.arange(rank_multiple, spectrum.max_rank + 1, rank_multiple)
        ranks = ranks[[cost.is_smaller(layer, k, int(r)) for r in ranks]]
        errors = error_bound(spectrum, ranks)
        for rank, error in zip(ranks.tolist(), errors.tolist()):
            candidates.append(
                Candidate(
                    k=k,
                    rank=rank,
                    error=error,
                    params=cost.factorized_params(layer, k, rank),
                    flops=cost.factorized_flops(layer, k, rank),
                )
            )
    return LayerAnalysis(layer=layer, spectra=spectra, candidates=tuple(candidates))
