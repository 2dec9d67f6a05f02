"""math/lapack.py: the Gram-matrix SVD of blocks far from square gives what gesdd gives where the factors use it."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_lowrank.math import lapack
from onnx_lowrank.math.spectral import truncation_error
from onnx_lowrank.math.svd import group_svds, svdvals


def _matrix(rng, rows, cols, decay):
    """A matrix whose singular values fall from 1 to 10^-decay (rank-deficient when some are rounded to zero)."""
    short = min(rows, cols)
    left = np.linalg.qr(rng.standard_normal((rows, short)))[0]
    right = np.linalg.qr(rng.standard_normal((cols, short)))[0]
    return (left * np.logspace(0, -decay, short)) @ right.T


@settings(max_examples=60, deadline=None)
@given(short=st.integers(1, 12), aspect=st.integers(2, 40), wide=st.booleans(), decay=st.sampled_from([0, 3, 20]),
       seed=st.integers(0, 2**32 - 1))
def test_gram_svd_reproduces_the_matrix_and_gesdd_singular_values(short, aspect, wide, decay, seed):
    rng = np.random.default_rng(seed)
    rows, cols = (short, short * aspect) if wide else (short * aspect, short)
    m = _matrix(rng, rows, cols, decay) * rng.uniform(0.1, 10)
    u, s, vt = lapack.gram_svd(m)
    exact = np.linalg.svd(m, compute_uv=False)
    scale = exact[0]
    assert np.all(np.diff(s) <= 0)
    np.testing.assert_allclose((u * s) @ vt, m, rtol=0, atol=1e-13 * scale)
    np.testing.assert_allclose(s, exact, rtol=0, atol=1e-7 * scale)  # values at rounding level: ~1e-8 of the largest
    np.testing.assert_allclose(lapack.gram_svdvals(m), exact, rtol=0, atol=1e-7 * scale)
    short_side = u if wide else vt.T  # the Gram's eigenvectors: orthonormal
    np.testing.assert_allclose(short_side.T @ short_side, np.eye(short), rtol=0, atol=1e-12)
    for rank in range(short + 1):  # a truncation's error as gesdd's
        assert abs(truncation_error([(u, s, vt)], rank, scale) - (exact[rank] / scale if rank < short else 0)) < 1e-7


def test_grouped_blocks_far_from_square_truncate_as_with_gesdd():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((16, 256))
    for k in (1, 2, 4, 8):  # blocks of 16 x 256/k: all but the last far from square
        ours = group_svds(w, k)
        for (u, s, vt), block in zip(ours, np.split(w, k, axis=1)):
            _, s_exact, _ = np.linalg.svd(block, full_matrices=False)
            np.testing.assert_allclose(s, s_exact, rtol=1e-10, atol=1e-12)
            for rank in (1, len(s) // 2, len(s)):
                truncated = (u[:, :rank] * s[:rank]) @ vt[:rank]
                u_e, s_e, vt_e = np.linalg.svd(block, full_matrices=False)
                np.testing.assert_allclose(truncated, (u_e[:, :rank] * s_e[:rank]) @ vt_e[:rank], atol=1e-10)
    np.testing.assert_allclose(svdvals(w), np.linalg.svd(w, compute_uv=False), rtol=1e-10)
