"""How far a factorized layer moves from the original: the one place a candidate's error is computed.

The error of a factorization is the relative spectral error ||W - W_hat||_2 / ||W||_2 of the layer's matrix.

For planning we need it for every (k, r) without building the factors, from the groups' singular values alone.
With k groups the residual is E = [E_1 ... E_k], where ||E_g||_2 = sigma_{g,r+1} (the first dropped singular value
of group g). Since E E^T = sum_g E_g E_g^T,

    max_g sigma_{g,r+1}  <=  ||E||_2  <=  sqrt(sum_g sigma_{g,r+1}^2)

We plan with the upper bound (exact when k = 1). The lower bound is what the ALDS reference code uses; it can
understate the error by sqrt(k). The error reported for a chosen factorization is exact: from the groups' SVDs,
E E^T = sum_g U_g' diag(s_g'^2) U_g'^T over the dropped singular pairs, an (out x out) eigenproblem instead of
another SVD of the residual (`truncation_error`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnx_lowrank.math.svd import Factors, reconstruct, spectral_norm

__all__ = ["Spectrum", "error_bound", "measured_error", "truncation_error"]


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Singular values of each of the k column groups of a layer's matrix, and the norm errors are relative to."""

    k: int
    singular_values: np.ndarray  # (k, max_rank), descending per group
    reference_norm: float  # ||W||_2

    @property
    def max_rank(self) -> int:
        return self.singular_values.shape[1]


def error_bound(spectrum: Spectrum, ranks: np.ndarray | int) -> np.ndarray:
    """Upper bound of the relative spectral error for each rank in `ranks` (vectorised; exact for k = 1)."""
    ranks = np.asarray(ranks)
    padded = np.concatenate([spectrum.singular_values, np.zeros((spectrum.k, 1))], axis=1)
    dropped = padded[:, np.minimum(ranks, spectrum.max_rank)]  # (k, len(ranks)): first dropped value per group
    if spectrum.reference_norm == 0:
        return np.zeros(dropped.shape[1:])
    return np.sqrt(np.sum(dropped**2, axis=0)) / spectrum.reference_norm


def measured_error(matrix: np.ndarray, factors: Factors, reference_norm: float | None = None) -> float:
    """The exact relative spectral error of `factors` against `matrix` (pass ||matrix||_2 when it is known)."""
    norm = spectral_norm(matrix) if reference_norm is None else reference_norm
    return 0.0 if norm == 0 else spectral_norm(matrix - reconstruct(factors)) / norm


def truncation_error(svds: list[tuple[np.ndarray, np.ndarray, np.ndarray]], rank: int, reference_norm: float) -> float:
    """The exact relative spectral error of truncating every group's thin SVD (u, s, vt) to `rank`."""
    if reference_norm == 0:
        return 0.0
    if len(svds) == 1:
        s = svds[0][1]
        return float(s[rank]) / reference_norm if rank < len(s) else 0.0
    # ||sum_g U_g,dropped S_g,dropped^2 U_g,dropped^T||_2 = ||B||_2^2 with B = [U_g,dropped S_g,dropped]_g (out x K):
    # the largest eigenvalue of the smaller of B B^T and B^T B (a layer with 65536 outputs never forms 65536^2)
    dropped = np.hstack([u[:, rank:] * s[rank:] for u, s, _ in svds])
    if dropped.size == 0:
        return 0.0
    gram = dropped @ dropped.T if dropped.shape[0] <= dropped.shape[1] else dropped.T @ dropped
    largest = float(np.linalg.eigvalsh(gram)[-1])
    return float(np.sqrt(max(largest, 0.0))) / reference_norm
