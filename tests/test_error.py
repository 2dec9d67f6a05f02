"""The planning error bound brackets the true error, and is exact for k = 1."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from onnx_lowrank.math.decomposition import WeightDecomposition
from onnx_lowrank.math.spectral import Spectrum, error_bound, measured_error
from onnx_lowrank.math.svd import factorize, group_singular_values, reconstruct, spectral_norm


@st.composite
def matrices(draw):
    k = draw(st.sampled_from([1, 2, 3, 4]))
    out = draw(st.integers(1, 12))
    cols = k * draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    decay = draw(st.floats(0.3, 1.0))
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((out, cols)) * decay ** np.arange(cols)
    rank = draw(st.integers(1, min(out, cols // k)))
    return matrix, k, rank


@settings(max_examples=200, deadline=None)
@given(matrices())
def test_bound_brackets_measured_error(case):
    matrix, k, rank = case
    spectrum = Spectrum(k=k, singular_values=group_singular_values(matrix, k), reference_norm=spectral_norm(matrix))
    factors = factorize(matrix, k, rank)
    true = measured_error(matrix, factors)
    upper = float(error_bound(spectrum, rank))
    padded = np.concatenate([spectrum.singular_values, np.zeros((k, 1))], axis=1)
    lower = padded[:, rank].max() / spectrum.reference_norm
    assert lower - 1e-9 <= true <= upper + 1e-9
    if k == 1:
        assert abs(true - upper) <= 1e-9


@settings(max_examples=100, deadline=None)
@given(matrices())
def test_full_rank_reconstructs(case):
    matrix, k, _ = case
    full = min(matrix.shape[0], matrix.shape[1] // k)
    assert np.allclose(reconstruct(factorize(matrix, k, full)), matrix, atol=1e-10)


def test_singular_values_are_split_evenly_between_factors():
    matrix = np.random.default_rng(1).standard_normal((5, 8))
    factors = factorize(matrix, 1, 3)
    sigma = np.linalg.svd(matrix, compute_uv=False)[:3]
    assert np.allclose(np.linalg.norm(factors.decoder, axis=0), np.sqrt(sigma))
    assert np.allclose(np.linalg.norm(factors.encoder[0], axis=1), np.sqrt(sigma))


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 12), cols_per_group=st.integers(1, 10), k=st.sampled_from([1, 2, 3, 4]),
       seed=st.integers(0, 2**16), rank_fraction=st.floats(0, 1))
def test_truncation_error_from_the_svds_equals_the_measured_error(out, cols_per_group, k, seed, rank_fraction):
    matrix = np.random.default_rng(seed).standard_normal((out, cols_per_group * k))
    decomposition = WeightDecomposition(matrix, k)
    rank = max(1, round(rank_fraction * decomposition.max_rank))
    expected = measured_error(matrix, decomposition.factors(rank), decomposition.reference_norm)
    assert decomposition.measured_error(rank) == pytest.approx(expected, rel=1e-7, abs=1e-12)
