"""One layer's decomposition for one group count k: computed once, then read for every rank and for the factors.

Analysis turns every (layer, k) into a `Decomposition`; the planner reads its `errors` and `dropped_energy` for all
ranks at once, and apply asks it for the `factors` of the chosen rank, so nothing is decomposed twice. Two kinds:

- `WeightDecomposition` (no data): grouped SVD of the weight; the error is the relative spectral error
  ||W - W_hat||_2 / ||W||_2 (planned with the upper bound of `error.error_bound`, exact for k = 1).
- `projection.OutputDecomposition` (calibration data): the rank-r factors that minimise the layer's output error on
  the calibration inputs; the error is the exact relative output error on those inputs.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .error import Spectrum, error_bound, truncation_error
from .svd import Factors, group_singular_values, group_svds, spectral_norm, truncate

__all__ = ["Decomposition", "WeightDecomposition"]


class Decomposition(Protocol):
    """What the planner and the rewrite need from a decomposition of one layer with k input-channel groups."""

    k: int

    @property
    def max_rank(self) -> int:
        """Largest useful rank of one group: min(out, in/k)."""

    def errors(self, ranks: np.ndarray) -> np.ndarray:
        """The planning error of each rank (what the min-max allocator bounds)."""

    def dropped_energy(self, ranks: np.ndarray) -> np.ndarray:
        """Fraction of the layer's energy each rank drops (k = 1; what the `energy` baseline equalises)."""

    def factors(self, rank: int) -> Factors:
        """The factors written into the model at `rank`."""

    def measured_error(self, rank: int) -> float:
        """The error of the written factors, in the same measure as `errors` (reported per layer)."""

    def written(self, rank: int) -> tuple[Factors, float]:
        """`factors(rank)` and `measured_error(rank)` together (a decomposition may share work between them)."""


class WeightDecomposition:
    """Grouped truncated SVD of the weight alone (see `svd` and `error`).

    Singular values come first and cheaply (planning needs only them); the singular vectors are computed when the
    factors are written (`written`) and not kept.
    """

    measure = "relative spectral error of the weight"

    def __init__(self, matrix: np.ndarray, k: int, reference_norm: float | None = None) -> None:
        self.matrix = matrix
        self.k = k
        values = group_singular_values(matrix, k)
        norm = float(values[0, 0]) if reference_norm is None and k == 1 else reference_norm
        if norm is None:
            norm = spectral_norm(matrix)
        self.spectrum = Spectrum(k=k, singular_values=values, reference_norm=norm)

    @property
    def max_rank(self) -> int:
        return self.spectrum.max_rank

    @property
    def reference_norm(self) -> float:
        return self.spectrum.reference_norm

    def errors(self, ranks: np.ndarray) -> np.ndarray:
        return error_bound(self.spectrum, np.asarray(ranks))

    def dropped_energy(self, ranks: np.ndarray) -> np.ndarray:
        energy = self.spectrum.singular_values[0] ** 2
        total = float(energy.sum())
        dropped = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])  # dropped[r] = sum of energy[r:]
        return dropped[np.asarray(ranks)] / total if total else np.zeros(len(np.atleast_1d(ranks)))

    def factors(self, rank: int) -> Factors:
        return self.written(rank)[0]

    def measured_error(self, rank: int) -> float:
        return self.written(rank)[1]

    def written(self, rank: int) -> tuple[Factors, float]:
        """The factors at `rank` and their measured error, from one SVD that is not kept: singular vectors of every
        layer at once would hold about twice the model's weights in memory."""
        svds = group_svds(self.matrix, self.k)
        return truncate(svds, rank), truncation_error(svds, rank, self.reference_norm)
