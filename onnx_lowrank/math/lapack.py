"""The dense factorizations the math uses (eigh, svd, pinvh), from numpy.linalg: they release the GIL.

Per-layer work runs on one Python thread per core (`stages.parallel`). scipy.linalg's eigh and svd hold the GIL
through the LAPACK call, so two threads decomposing two layers took as long as one doing both (measured: 0.95-1.0x
on 700 x 700 eigh and svd, 2 cores); numpy.linalg's run them side by side (2.0-2.2x). The drivers are the same
divide-and-conquer routines the code used from scipy (syevd, gesdd). NaN or inf in the input is not checked for
(callers give finite float64 matrices); a driver that does not converge raises numpy.linalg.LinAlgError.

A weight block is often far from square (a 256 x 65536 projection; a k-group split makes every block wider), and
gesdd on it spends its time on the long side: `gram_svd` and `gram_svdvals` go through the eigendecomposition of
the small Gram matrix instead (256 x 256 there: 0.1 s against 5.6 s, singular values equal to 2e-15 of the
largest), at the price of singular vectors on the long side that are not orthonormal where s is at rounding level.
"""

from __future__ import annotations

import numpy as np

__all__ = ["eigh", "svd", "svdvals", "gram_svd", "gram_svdvals", "pinvh", "GRAM_ASPECT"]


def eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues ascending, eigenvectors as columns) of a symmetric matrix (its lower triangle is read)."""
    values, vectors = np.linalg.eigh(matrix)
    return values, vectors


def svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD (u, s descending, vt), both sides orthonormal (gesdd)."""
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    return u, s, vt


def svdvals(matrix: np.ndarray) -> np.ndarray:
    """Singular values, descending (gesdd)."""
    return np.linalg.svd(matrix, compute_uv=False)


GRAM_ASPECT = 2
"""From this ratio of long to short side, `gram_svd` is worth its looser long side (module docstring)."""


def gram_svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD (u, s descending, vt) through the Gram matrix of the short side, such that u @ diag(s) @ vt
    reproduces `matrix` to float64 rounding: the Gram's eigenvectors are the short side's singular vectors
    (orthonormal), the matrix projected on them is s times the long side's, and s is the norm of that projection
    (exact whatever the eigenvalue's rounding), so the product is the matrix projected on a complete orthonormal
    basis. Where s is at rounding level (below ~1e-8 of the largest) the long side's vector is not orthogonal to
    the others: use it only through u * s or s * vt (a truncation, its error), not as a basis."""
    m = np.asarray(matrix, dtype=np.float64)
    rows, cols = m.shape
    if min(rows, cols) == 0:
        return svd(m)
    if rows <= cols:
        _, u = eigh(m @ m.T)
        u = u[:, ::-1]
        projected = u.T @ m  # row i: s_i v_i^T
        s = np.linalg.norm(projected, axis=1)
        vt = np.divide(projected, s[:, None], out=np.zeros_like(projected), where=s[:, None] > 0)
    else:
        _, v = eigh(m.T @ m)
        v = v[:, ::-1]
        projected = m @ v  # column i: s_i u_i
        s = np.linalg.norm(projected, axis=0)
        u = np.divide(projected, s[None, :], out=np.zeros_like(projected), where=s[None, :] > 0)
        vt = v.T
    order = np.argsort(-s, kind="stable")  # the norms of the smallest may come out of the eigenvalues' order
    return u[:, order], s[order], vt[order]


def gram_svdvals(matrix: np.ndarray) -> np.ndarray:
    """Singular values, descending: square roots of the short side's Gram eigenvalues (those at rounding level come
    out at ~1e-8 of the largest)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.size == 0:
        return svdvals(m)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None))


def pinvh(matrix: np.ndarray, rtol: float) -> np.ndarray:
    """Pseudo-inverse of a symmetric matrix: eigenvalues at most `rtol` times the largest magnitude count as zero."""
    values, vectors = eigh(matrix)
    if values.size == 0:
        return np.zeros_like(matrix)
    kept = np.abs(values) > rtol * np.max(np.abs(values))
    vectors = vectors[:, kept]
    return (vectors / values[kept]) @ vectors.T
