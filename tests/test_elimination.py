"""Channel elimination math (`elimination`): exactly dependent channels are dropped losslessly, the error of every
width is the readers' true output error, and the kept sets are nested."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from onnx_lowrank.math.elimination import ChannelElimination, Reader, keep_order, regression
from onnx_lowrank.math.statistics import StatisticsAccumulator, pooled, rounding_noise


def _statistics(rows: np.ndarray):
    accumulator = StatisticsAccumulator(rows.shape[1])
    accumulator.add(rows)
    return accumulator.result()


def _dependent_activations(rng, rows: int, independent: int, channels: int, taps: int, constant: bool):
    """(rows, channels * taps) patches whose channels beyond `independent` are combinations of the first ones
    (plus a constant), tap by tap, shuffled so the independent ones are not simply the first."""
    base = rng.standard_normal((rows, independent, taps))
    mix = rng.standard_normal((channels - independent, independent))
    offset = rng.standard_normal(channels - independent)[None, :, None] * 3 if constant else 0.0
    dependent = np.einsum("di,rit->rdt", mix, base) + offset
    h = np.concatenate([base, dependent], axis=1)[:, rng.permutation(channels), :]
    return h.reshape(rows, channels * taps)


@settings(max_examples=60, deadline=None)
@example(seed=194, independent=5, extra=6, taps=1, readers=1, constant=False)  # its dropped channel carries 0.4%
@given(seed=st.integers(0, 2**16), independent=st.integers(1, 6), extra=st.integers(1, 6),
       taps=st.sampled_from([1, 4, 9]), readers=st.integers(1, 3), constant=st.booleans())
def test_exactly_dependent_channels_are_dropped_without_changing_any_output(seed, independent, extra, taps, readers,
                                                                            constant):
    rng = np.random.default_rng(seed)
    channels = independent + extra
    x = _dependent_activations(rng, 40 * channels * taps, independent, channels, taps, constant)
    statistics = _statistics(x)
    weights = [rng.standard_normal((int(rng.integers(1, 6)), channels * taps)) for _ in range(readers)]
    biases = [rng.standard_normal(w.shape[0]) if i % 2 == 0 else None for i, w in enumerate(weights)]
    elimination = ChannelElimination([Reader(w, taps, statistics, b) for w, b in zip(weights, biases)], channels)
    assert elimination.rank >= independent  # round-off of float32 sums may leave a copy looking independent
    folded = elimination.fold(independent)
    kept_columns = (folded.kept[:, None] * taps + np.arange(taps)).reshape(-1)
    for w, b, matrix, bias in zip(weights, biases, folded.matrices, folded.biases):
        expected = x @ w.T + (0 if b is None else b)
        got = x[:, kept_columns] @ matrix.T + bias
        assert np.linalg.norm(got - expected) <= 1e-4 * np.linalg.norm(expected)
    exact = elimination.errors([independent])[0]
    assert exact < 1e-2  # what the float32 sums can resolve
    if independent > 1:  # one independent channel less cannot be exact (however little that channel carries)
        assert elimination.errors([independent - 1])[0] > max(2 * exact, 1e-6)


def test_the_error_of_a_width_is_the_measured_output_error():
    rng = np.random.default_rng(3)
    channels, taps = 6, 4
    x = rng.standard_normal((3000, channels * taps)) @ rng.standard_normal((channels * taps, channels * taps))
    w, b = rng.standard_normal((5, channels * taps)), rng.standard_normal(5)
    elimination = ChannelElimination([Reader(w, taps, _statistics(x), b)], channels)
    y = x @ w.T + b
    variance = np.sum(np.var(y, axis=0))
    for width in range(1, channels + 1):
        folded = elimination.fold(width)
        columns = (folded.kept[:, None] * taps + np.arange(taps)).reshape(-1)
        measured = np.sqrt(np.mean(np.sum((x[:, columns] @ folded.matrices[0].T + folded.biases[0] - y) ** 2, 1))
                           / variance)
        assert elimination.errors([width])[0] == pytest.approx(measured, rel=1e-3, abs=1e-6)
    assert elimination.errors([channels])[0] == pytest.approx(0.0, abs=1e-6)


def test_kept_sets_are_nested_and_unread_channels_go_first():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2000, 8))
    w = rng.standard_normal((4, 8))
    w[:, 2] = 0.0  # nobody reads channel 2
    elimination = ChannelElimination([Reader(w, 1, _statistics(x))], 8)
    assert elimination.order[-1] == 2
    kept = [set(elimination.fold(width).kept.tolist()) for width in range(1, 9)]
    assert all(a < b for a, b in zip(kept, kept[1:]))


def test_keep_order_pivots_on_the_largest_unexplained_variance():
    covariance = np.diag([1.0, 4.0, 2.0])
    order, rank = keep_order(covariance, np.ones(3))
    assert order.tolist() == [1, 2, 0] and rank == 3
    order, _ = keep_order(covariance, np.array([3.0, 1.0, 1.0]))  # channel 0 carries 9x the output weight
    assert order[0] == 0


def test_readers_of_different_tensors_are_each_fitted_on_their_own():
    """Two tensors of one set, the second a per-channel affine map of the first (a BatchNormalization between):
    channel 2 is 2 x channel 0 in the first and another combination plus a constant in the second. One kept set
    serves both, and each reader is exact only because it is folded with its own tensor's regression."""
    rng = np.random.default_rng(7)
    first = rng.standard_normal((500, 3))
    first[:, 2] = 2 * first[:, 0]
    second = first * np.array([1.5, -0.5, 3.0]) + np.array([0.2, 1.0, -2.0])
    w1, w2 = rng.standard_normal((4, 3)), rng.standard_normal((5, 3))
    readers = [Reader(w1, 1, _statistics(first), fit=0), Reader(w2, 1, _statistics(second), fit=1)]
    elimination = ChannelElimination(readers, 3, [_statistics(first), _statistics(second)])
    assert elimination.rank == 2
    folded = elimination.fold(2)
    assert 1 in folded.kept
    for x, w, matrix, bias in zip((first, second), (w1, w2), folded.matrices, folded.biases):
        assert np.allclose(x[:, folded.kept] @ matrix.T + bias, x @ w.T, rtol=1e-4, atol=1e-5)  # float32 sums
    assert elimination.errors([2])[0] < 1e-3  # what the float32 sums can resolve


def test_rounded_regression_does_not_lean_on_what_int8_rounding_drowns():
    """h0 = z + e0 and h1 = z + e1 are near copies (e of variance 1e-6), h2 = 1000 (e0 - e1) lies exactly in their
    span: the plain fold reproduces h2 with coefficients of +-1000, which an int8 model multiplies its rounding
    (variance ~1e-4 here) by. With that rounding noise the regression is a ridge: small coefficients, h2 lost."""
    rng = np.random.default_rng(0)
    rows = 4000
    z, other = rng.standard_normal(rows) * 3 + 5, rng.standard_normal(rows)
    e = rng.standard_normal((rows, 2)) * 1e-3
    statistics = _statistics(np.stack([z + e[:, 0], z + e[:, 1], 1000 * (e[:, 0] - e[:, 1]), other], axis=1))
    noise = rounding_noise(statistics)
    assert noise > 1e-5
    covariance, mean = statistics.covariance, statistics.mean
    kept, dropped = np.array([0, 1, 3]), np.array([2])
    lean, _ = regression(covariance, mean, kept, dropped)
    calm, _ = regression(covariance, mean, kept, dropped, noise)
    assert np.abs(lean).max() > 500 and np.abs(calm).max() < 0.01 * np.abs(lean).max()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), taps=st.sampled_from([1, 4]), width=st.integers(1, 5))
def test_the_rounded_error_is_what_int8_rounding_adds_to_the_readers_output(seed, taps, width):
    """errors() with `rounded`: the error the narrowed readers add to the dense readers' when every input value
    carries rounding noise of variance `rounding_noise` (uniform within a step), checked on rows with that noise."""
    rng = np.random.default_rng(seed)
    channels = 6
    x = rng.standard_normal((60000, channels * taps)) @ rng.standard_normal((channels * taps, channels * taps))
    x[:, 0] *= 20  # one wide channel: a coarse int8 step, so the rounding matters against the signal
    statistics = _statistics(x)
    w, b = rng.standard_normal((5, channels * taps)), rng.standard_normal(5)
    elimination = ChannelElimination([Reader(w, taps, statistics, b)], channels, rounded=True)
    folded = elimination.fold(width)
    columns = (folded.kept[:, None] * taps + np.arange(taps)).reshape(-1)
    step = np.sqrt(12 * rounding_noise(statistics))
    noisy = x + rng.uniform(-0.5, 0.5, x.shape) * step
    y = x @ w.T + b
    dense = np.mean(np.sum((noisy @ w.T + b - y) ** 2, axis=1))
    narrowed = np.mean(np.sum((noisy[:, columns] @ folded.matrices[0].T + folded.biases[0] - y) ** 2, axis=1))
    measured = np.sqrt(max(narrowed - dense, 0.0) / np.sum(np.var(y, axis=0)))
    assert elimination.errors([width])[0] == pytest.approx(measured, rel=0.05, abs=2e-3)


def test_statistics_keep_the_range_an_int8_scale_is_calibrated_on():
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((500, 3)) * 2 + 1
    accumulator = StatisticsAccumulator(3)
    accumulator.add(rows[:200])
    accumulator.add(rows[200:])
    statistics = accumulator.result()
    assert (statistics.low, statistics.high) == (rows.min(), rows.max())
    halves = pooled([_statistics(rows[:100]), _statistics(rows[100:])])
    assert (halves.low, halves.high) == (rows.min(), rows.max())
    step = (rows.max() - min(rows.min(), 0.0)) / 255
    assert rounding_noise(statistics) == pytest.approx(step * step / 12)
    positive = _statistics(np.abs(rows) + 1)  # onnxruntime's range always includes 0
    assert rounding_noise(positive) == pytest.approx(((np.abs(rows) + 1).max() / 255) ** 2 / 12)
    assert rounding_noise(StatisticsAccumulator(3).result()) == 0.0
