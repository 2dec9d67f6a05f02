"""One layer's decomposition for one group count k: computed once, then read for every rank and for the factors.

Analysis turns every (layer, k) into a `Decomposition`; the planner reads its `errors` and `dropped_energy` for all
ranks at once, and apply asks it for the `factors` of the chosen rank, so nothing is decomposed twice. Two kinds:

- `WeightDecomposition` (no data): grouped SVD of the weight; the error is the relative spectral error
  ||W - W_hat||_2 / ||W||_2 (planned with the upper bound of `error.error_bound`, exact for k = 1).
- `projection.OutputDecomposition` (calibration data): the rank-r factors that minimise the layer's output error on
  the calibration inputs; the error is the exact relative output error on those inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from onnx_lowrank.math.spectral import Spectrum, error_bound, truncation_error
from onnx_lowrank.math.svd import Factors, group_singular_values, group_svds, spectral_norm, truncate

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
    factors are written (`written`) and not kept. With `reread` (a function returning the matrix again, such as
    `Layer.read_matrix`) the matrix is not kept either: the factors read it anew, so analysing every layer of a
    large model never holds more than a layer or two of its weights.
    """

    measure = "relative spectral error of the weight"

    def __init__(self, matrix: np.ndarray, k: int, reference_norm: float | None = None,
                 reread: Callable[[], np.ndarray] | None = None) -> None:
        self._matrix = None if reread is not None else matrix
        self._reread = reread
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
        """The factors at `rank` and their measured error, from one SVD per group that is not kept (singular vectors
        of every layer at once would hold about twice the model's weights), taken one group at a time so that only
        one group's right singular vectors exist beside the factors."""
        matrix = self._matrix if self._reread is None else self._reread()
        k, cols = self.k, matrix.shape[1] // self.k
        encoder = np.empty((k, rank, cols))
        decoder = np.empty((matrix.shape[0], k * rank))
        spectra = []  # (u, s) of every group, for the error; each group's vt is dropped once its factors are taken
        for g in range(k):
            ((u, s, vt),) = group_svds(matrix[:, g * cols : (g + 1) * cols], 1)
            part = truncate([(u, s, vt)], rank)
            encoder[g], decoder[:, g * rank : (g + 1) * rank] = part.encoder[0], part.decoder
            spectra.append((u, s, None))
            del vt, part
        return Factors(k=k, rank=rank, encoder=encoder, decoder=decoder), truncation_error(spectra, rank,
                                                                                          self.reference_norm)
