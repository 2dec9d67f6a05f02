"""The dense factorizations the math uses (eigh, svd, pinvh), from numpy.linalg: they release the GIL.

Per-layer work runs on one Python thread per core (`stages.parallel`). scipy.linalg's eigh and svd hold the GIL
through the LAPACK call, so two threads decomposing two layers took as long as one doing both (measured: 0.95-1.0x
on 700 x 700 eigh and svd, 2 cores); numpy.linalg's run them side by side (2.0-2.2x). The drivers are the same
divide-and-conquer routines the code used from scipy (syevd, gesdd). NaN or inf in the input is not checked for
(callers give finite float64 matrices); a driver that does not converge raises numpy.linalg.LinAlgError.
"""

from __future__ import annotations

import numpy as np

__all__ = ["eigh", "svd", "svdvals", "pinvh"]


def eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues ascending, eigenvectors as columns) of a symmetric matrix (its lower triangle is read)."""
    values, vectors = np.linalg.eigh(matrix)
    return values, vectors


def svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD (u, s descending, vt)."""
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return u, s, vt


def svdvals(matrix: np.ndarray) -> np.ndarray:
    """Singular values, descending."""
    return np.linalg.svd(matrix, compute_uv=False)


def pinvh(matrix: np.ndarray, rtol: float) -> np.ndarray:
    """Pseudo-inverse of a symmetric matrix: eigenvalues at most `rtol` times the largest magnitude count as zero."""
    values, vectors = eigh(matrix)
    if values.size == 0:
        return np.zeros_like(matrix)
    kept = np.abs(values) > rtol * np.max(np.abs(values))
    vectors = vectors[:, kept]
    return (vectors / values[kept]) @ vectors.T
