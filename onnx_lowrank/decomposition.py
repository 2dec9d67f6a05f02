"""One layer's decomposition for one group count k: computed once, then read for every rank and for the factors.

Analysis turns every (layer, k) into a `Decomposition`; the planner reads its `errors` and `dropped_energy` for all
ranks at once, and apply asks it for the `factors` of the chosen rank, so nothing is decomposed twice. Two kinds:

- `WeightDecomposition` (no data): grouped SVD of the weight; the error is the relative spectral error
  ||W - W_hat||_2 / ||W||_2 (planned with the upper bound of `error.error_bound`, exact for k = 1).
- `projection.OutputDecomposition` (calibration data): the rank-r factors that minimise the layer's output error on
  the calibration inputs; the error is the exact relative output error on those inputs.
"""

from __future__ import annotations

from functools import cached_property
from typing import Protocol

import numpy as np
import scipy.linalg

from .error import Spectrum, error_bound, measured_error
from .svd import Factors, group_blocks

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


class WeightDecomposition:
    """Grouped truncated SVD of the weight alone (see `svd` and `error`).

    Singular values come first and cheaply (planning needs only them); the singular vectors are computed on the
    first call to `factors` and kept, so every later rank reuses them.
    """

    measure = "relative spectral error of the weight"

    def __init__(self, matrix: np.ndarray, k: int, reference_norm: float | None = None) -> None:
        self.matrix = matrix
        self.k = k
        self._blocks = group_blocks(np.asarray(matrix, dtype=np.float64), k)
        values = np.stack([_svdvals(block) for block in self._blocks])
        norm = float(values[0, 0]) if reference_norm is None and k == 1 else reference_norm
        if norm is None:
            norm = float(_svdvals(np.asarray(matrix, dtype=np.float64))[0]) if matrix.size else 0.0
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

    @cached_property
    def _vectors(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return [scipy.linalg.svd(b, full_matrices=False, check_finite=False, lapack_driver="gesdd") for b in self._blocks]

    def factors(self, rank: int) -> Factors:
        out, cols = self._blocks.shape[1], self._blocks.shape[2]
        if not 1 <= rank <= min(out, cols):
            raise ValueError(f"rank must be in [1, {min(out, cols)}] for a block of shape {(out, cols)}, got {rank}")
        encoder = np.empty((self.k, rank, cols))
        decoder = np.empty((out, self.k * rank))
        for g, (u, s, vt) in enumerate(self._vectors):
            root = np.sqrt(s[:rank])
            decoder[:, g * rank : (g + 1) * rank] = u[:, :rank] * root
            encoder[g] = root[:, None] * vt[:rank]
        return Factors(k=self.k, rank=rank, encoder=encoder, decoder=decoder)

    def measured_error(self, rank: int) -> float:
        return measured_error(self.matrix, self.factors(rank), self.reference_norm)


def _svdvals(matrix: np.ndarray) -> np.ndarray:
    # gesdd: divide and conquer; gesvd is an order of magnitude slower on large layers
    return scipy.linalg.svd(matrix, compute_uv=False, check_finite=False, lapack_driver="gesdd")
