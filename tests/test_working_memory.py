"""Per-layer work runs a few layers ahead, never all of them: finished results wait only for the caller."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from onnx_lowrank.math.decomposition import WeightDecomposition
from onnx_lowrank.stages.parallel import map_in_order


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_come_in_order_and_only_a_few_run_ahead(workers):
    lock = threading.Lock()
    started = []
    consumed = []
    ahead = []

    def work(item):
        with lock:
            started.append(item)
            ahead.append(len(started) - len(consumed))
        return item * item

    for result in map_in_order(work, range(20), workers=workers):
        consumed.append(result)
    assert consumed == [i * i for i in range(20)]
    assert max(ahead) <= workers + 1  # the ones in flight, and the one the caller holds


def test_an_error_in_one_item_reaches_the_caller():
    def work(item):
        if item == 3:
            raise ValueError("three")
        return item

    with pytest.raises(ValueError, match="three"):
        list(map_in_order(work, range(8), workers=2))


def test_a_decomposition_that_can_read_its_matrix_again_does_not_keep_it():
    matrix = np.random.default_rng(0).standard_normal((12, 30))
    reads = []

    def reread():
        reads.append(1)
        return matrix.copy()

    kept = WeightDecomposition(matrix, 3)
    lean = WeightDecomposition(matrix.copy(), 3, reread=reread)
    assert not any(value is not None and value.size >= matrix.size for value in vars(lean).values()
                   if isinstance(value, np.ndarray))
    for rank in (1, 4):
        (a, error_a), (b, error_b) = kept.written(rank), lean.written(rank)
        np.testing.assert_array_equal(a.encoder, b.encoder)
        np.testing.assert_array_equal(a.decoder, b.decoder)
        assert error_a == error_b
    assert len(reads) == 2


@pytest.mark.parametrize("shape, k, rank", [((12, 30), 3, 2), ((40, 12), 2, 5), ((300, 8), 4, 1), ((5, 64), 8, 3)])
def test_factors_written_group_by_group_are_those_of_the_whole_svd(shape, k, rank):
    """`written` takes one group's SVD at a time; the factors and the exact error are those of all SVDs at once
    (the error checked against the spectral norm of the residual, for tall and wide layers)."""
    from onnx_lowrank.math.spectral import truncation_error
    from onnx_lowrank.math.svd import group_svds, reconstruct, spectral_norm, truncate

    matrix = np.random.default_rng(1).standard_normal(shape)
    factors, error = WeightDecomposition(matrix, k).written(rank)
    svds = group_svds(matrix, k)
    whole = truncate(svds, rank)
    np.testing.assert_allclose(factors.encoder, whole.encoder, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(factors.decoder, whole.decoder, rtol=1e-12, atol=1e-12)
    norm = spectral_norm(matrix)
    assert error == pytest.approx(truncation_error(svds, rank, norm), rel=1e-12)
    assert error == pytest.approx(spectral_norm(matrix - reconstruct(factors)) / norm, rel=1e-9)
