"""The data-aware, output-optimal decomposition (`projection`): exactness of the all-ranks errors, optimality,
robustness on rank-deficient statistics, and argument checks.

Statistics are built in float64 from explicit rows X, so that with shrinkage 0 the errors can be compared with the
explicit relative output error on those rows.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from onnx_lowrank.math.projection import OutputDecomposition, shrunk_covariance

FIXED_SHRINKAGE = 0.001  # the default before the adaptive one (issue 19)
from onnx_lowrank.math.statistics import InputStatistics, StatisticsAccumulator
from onnx_lowrank.math.svd import factorize, group_blocks, reconstruct

SETTINGS = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------------- helpers


def statistics_of(rows: np.ndarray) -> InputStatistics:
    rows = np.asarray(rows, dtype=np.float64)
    return InputStatistics(gram=rows.T @ rows, total=rows.sum(axis=0), count=rows.shape[0])


def direct_err2(matrix: np.ndarray, factors, covariance: np.ndarray) -> float:
    """trace(E Sigma_s E^T) with E = W - W_hat, from the written factors."""
    residual = matrix - reconstruct(factors)
    return float(np.trace(residual @ covariance @ residual.T))


def energy_of(matrix, statistics, covariance, bias=None) -> float:
    offset = matrix @ statistics.mean + (0 if bias is None else bias)
    return float(np.trace(matrix @ covariance @ matrix.T) + offset @ offset)


def output_error(rows, matrix, bias, factors) -> float:
    """||(X W^T + b) - (X W_hat^T + b + shift)||_F / ||Y - mean(Y)||_F: the error relative to the output's variation."""
    y = rows @ matrix.T + bias
    shift = 0 if factors.shift is None else factors.shift
    y_hat = rows @ reconstruct(factors).T + bias + shift
    variation = np.linalg.norm(y - y.mean(axis=0))
    if variation <= 1e-6 * np.linalg.norm(y):  # no variation: only the (exactly kept) mean is left
        return float(np.linalg.norm(y - y_hat) / max(np.linalg.norm(y), 1e-300))
    return float(np.linalg.norm(y - y_hat) / variation)


def correlated_rows(rng, n: int, d: int, k: int, strength: float = 1.0) -> np.ndarray:
    """Rows whose k groups repeat the same signal (plus noise): large cross-group covariance."""
    m = d // k
    base = rng.standard_normal((n, m)) @ rng.standard_normal((m, m))
    rows = np.tile(base, (1, k)) * strength + rng.standard_normal((n, d)) * 0.3
    return rows + rng.standard_normal(d)  # nonzero mean


# ------------------------------------------------------------------------------------------------ 1. full rank exact


@pytest.mark.parametrize("out, d, k", [(5, 12, 1), (5, 12, 2), (5, 12, 4), (20, 12, 1), (20, 12, 2), (20, 12, 4),
                                       (12, 12, 1), (6, 12, 2), (3, 24, 4)])
@pytest.mark.parametrize("rows", [4, 200])
def test_full_rank_reproduces_weight(out, d, k, rows):
    rng = np.random.default_rng(out * 100 + d + k + rows)
    matrix = rng.standard_normal((out, d))
    statistics = statistics_of(correlated_rows(rng, rows, d, k))
    decomposition = OutputDecomposition(matrix, statistics, k, bias=rng.standard_normal(out))
    full = decomposition.factors(decomposition.max_rank)
    assert decomposition.max_rank == min(out, d // k)
    assert full.encoder.shape == (k, decomposition.max_rank, d // k)
    assert full.decoder.shape == (out, k * decomposition.max_rank)
    assert full.shift.shape == (out,)
    assert np.linalg.norm(reconstruct(full) - matrix) <= 1e-9 * np.linalg.norm(matrix)
    assert np.abs(full.shift).max() <= 1e-9 * np.abs(matrix).sum()
    assert decomposition.errors(np.array([decomposition.max_rank]))[0] == 0.0
    assert decomposition.measured_error(decomposition.max_rank) == 0.0


# ----------------------------------------------------------------------------------- 2. all-ranks errors are exact


@SETTINGS
@given(
    out=st.integers(1, 12),
    width=st.integers(1, 8),
    k=st.integers(1, 4),
    rows=st.integers(1, 30),
    correlated=st.booleans(),
    shrinkage=st.sampled_from([0.0, FIXED_SHRINKAGE, 0.3]),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_errors_equal_direct_computation(out, width, k, rows, correlated, shrinkage, with_bias, seed):
    rng = np.random.default_rng(seed)
    d = width * k
    matrix = rng.standard_normal((out, d)) * rng.uniform(0.1, 3.0, d)
    data = correlated_rows(rng, rows, d, k, 3.0) if correlated else rng.standard_normal((rows, d)) + 0.5
    statistics = statistics_of(data)
    bias = rng.standard_normal(out) if with_bias else None
    covariance = shrunk_covariance(statistics, shrinkage)
    decomposition = OutputDecomposition(matrix, statistics, k, bias=bias, shrinkage=shrinkage)
    energy = energy_of(matrix, statistics, covariance, bias)
    weight_energy = float(np.trace(matrix @ covariance @ matrix.T))
    ranks = np.arange(0, decomposition.max_rank + 1)
    errors = decomposition.errors(ranks)
    dropped = decomposition.dropped_energy(ranks)
    assert errors.shape == dropped.shape == ranks.shape
    assert np.all(np.isfinite(errors)) and np.all(errors >= 0)
    assert abs(decomposition.energy - energy) <= 1e-10 * max(energy, 1e-300)
    # rank 0 drops everything
    if weight_energy > 1e-12 * energy:
        assert abs(errors[0] - 1.0) <= 1e-8
    for r in ranks[1:]:
        err2 = direct_err2(matrix, decomposition.factors(int(r)), covariance)
        # squared errors are exact to round-off relative to the energy (the square root amplifies it near 0)
        if weight_energy > 1e-12 * energy:
            assert abs(errors[r] ** 2 * weight_energy - err2) <= 1e-10 * energy
            assert abs(dropped[r] * weight_energy - err2) <= 1e-10 * energy
        assert decomposition.measured_error(int(r)) == errors[r]


def test_cross_group_terms_matter():
    """Strongly correlated groups: dropping the cross-group terms would give a very different error."""
    rng = np.random.default_rng(7)
    out, d, k = 8, 24, 3
    matrix = np.tile(rng.standard_normal((out, d // k)), (1, k)) + 0.3 * rng.standard_normal((out, d))
    statistics = statistics_of(correlated_rows(rng, 300, d, k, 3.0))
    covariance = shrunk_covariance(statistics)
    decomposition = OutputDecomposition(matrix, statistics, k)
    blocks = group_blocks(matrix, k)
    m = d // k
    for r in (1, 3, 5):
        factors = decomposition.factors(r)
        err2 = direct_err2(matrix, factors, covariance)
        without_cross = 0.0
        for g in range(k):
            u = factors.decoder[:, g * r : (g + 1) * r]
            residual = blocks[g] - u @ (u.T @ blocks[g])
            without_cross += np.trace(residual @ covariance[g * m : (g + 1) * m, g * m : (g + 1) * m] @ residual.T)
        assert abs(err2 - without_cross) > 0.1 * err2
        assert decomposition.squared_errors(np.array([r]))[0] == pytest.approx(err2, rel=1e-9)


def test_given_covariance_is_used_as_is():
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((10, 16))
    statistics = statistics_of(rng.standard_normal((40, 16)) + 1)
    covariance = shrunk_covariance(statistics, 0.2)
    for k in (1, 2, 4):
        computed = OutputDecomposition(matrix, statistics, k, shrinkage=0.2)
        given_ = OutputDecomposition(matrix, statistics, k, covariance=covariance)
        ranks = np.arange(1, computed.max_rank + 1)
        np.testing.assert_array_equal(computed.errors(ranks), given_.errors(ranks))
    # the shrunk covariance: Sigma + shrinkage * trace(Sigma) / d * I
    sigma = statistics.covariance
    expected = sigma + 0.2 * np.trace(sigma) / 16 * np.eye(16)
    np.testing.assert_allclose(covariance, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(shrunk_covariance(statistics, 0.0), sigma, rtol=1e-12, atol=1e-12)


def test_accumulated_statistics():
    """Statistics from `StatisticsAccumulator` (float32 rows) work the same way."""
    rng = np.random.default_rng(5)
    rows = (rng.standard_normal((500, 18)) + 0.5).astype(np.float32)
    accumulator = StatisticsAccumulator(18)
    for chunk in np.array_split(rows, 7):
        accumulator.add(chunk)
    matrix = rng.standard_normal((9, 18))
    bias = rng.standard_normal(9)
    decomposition = OutputDecomposition(matrix, accumulator.result(), 3, bias=bias, shrinkage=0.0)
    for r in range(1, decomposition.max_rank + 1):
        explicit = output_error(rows.astype(np.float64), matrix, bias, decomposition.factors(r))
        assert decomposition.errors(np.array([r]))[0] == pytest.approx(explicit, rel=1e-4, abs=1e-4)


# ------------------------------------------------------------------------- 3. shrinkage 0: the real output error


@example(out=2, width=3, k=4, rows=6, correlated=True, seed=1040)  # k > 1 can lose more than the variance
@SETTINGS
@given(
    out=st.integers(1, 12),
    width=st.integers(1, 8),
    k=st.integers(1, 4),
    rows=st.integers(1, 40),
    correlated=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_errors_are_relative_output_error_without_shrinkage(out, width, k, rows, correlated, seed):
    rng = np.random.default_rng(seed)
    d = width * k
    matrix = rng.standard_normal((out, d))
    bias = rng.standard_normal(out)
    data = correlated_rows(rng, rows, d, k, 2.0) if correlated else rng.standard_normal((rows, d)) * 2 - 1
    decomposition = OutputDecomposition(matrix, statistics_of(data), k, bias=bias, shrinkage=0.0)
    errors = decomposition.errors(np.arange(1, decomposition.max_rank + 1))
    for r in range(1, decomposition.max_rank + 1):
        explicit = output_error(data, matrix, bias, decomposition.factors(r))
        assert abs(errors[r - 1] ** 2 - explicit**2) <= 1e-10


# ----------------------------------------------------------------------------------------------------- 4. optimality


def _optimality_case(seed: int = 11):
    rng = np.random.default_rng(seed)
    out, d, n = 6, 8, 60
    matrix = rng.standard_normal((out, d))
    bias = rng.standard_normal(out)
    rows = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + rng.standard_normal(d)
    return matrix, bias, rows


@pytest.mark.parametrize("rank", [1, 2, 4])
@pytest.mark.parametrize("shrinkage", [0.0, 0.05])
def test_optimal_against_svd_llm_and_random_candidates(rank, shrinkage):
    matrix, bias, rows = _optimality_case()
    statistics = statistics_of(rows)
    covariance = shrunk_covariance(statistics, shrinkage)
    decomposition = OutputDecomposition(matrix, statistics, 1, bias=bias, shrinkage=shrinkage)
    ours = decomposition.squared_errors(np.array([rank]))[0]
    assert ours > 0

    def objective(candidate):  # the best shift E mu is implied: err2 of any (out, d) candidate
        residual = matrix - candidate
        return float(np.trace(residual @ covariance @ residual.T))

    # (a) SVD-LLM closed form: whiten with the Cholesky factor, truncate, unwhiten
    lower = np.linalg.cholesky(covariance)
    u, s, vt = np.linalg.svd(matrix @ lower)
    svd_llm = (u[:, :rank] * s[:rank]) @ scipy.linalg.solve_triangular(lower, vt[:rank].T, lower=True, trans="T").T
    assert np.linalg.matrix_rank(svd_llm) == rank
    assert objective(svd_llm) == pytest.approx(ours, rel=1e-9)

    # (b) random rank-r candidates: plain ones and the best decoder for a random encoder
    rng = np.random.default_rng(rank)
    for _ in range(200):
        encoder = rng.standard_normal((rank, matrix.shape[1]))
        plain = rng.standard_normal((matrix.shape[0], rank)) @ encoder
        decoder = matrix @ covariance @ encoder.T @ np.linalg.inv(encoder @ covariance @ encoder.T)
        assert objective(plain) >= ours * (1 - 1e-9)
        assert objective(decoder @ encoder) >= ours * (1 - 1e-9)
    # ... and local perturbations of ours
    factors = decomposition.factors(rank)
    for scale in (1e-2, 1e-4, 1e-6):
        for _ in range(50):
            d_ = factors.decoder + scale * rng.standard_normal(factors.decoder.shape)
            e_ = factors.encoder[0] + scale * rng.standard_normal(factors.encoder[0].shape)
            assert objective(d_ @ e_) >= ours * (1 - 1e-9)


@pytest.mark.parametrize("rank", [1, 3])
def test_optimal_against_numerical_optimiser(rank):
    """Minimise the real output error over decoder, encoder and shift from several random starts."""
    matrix, bias, rows = _optimality_case(seed=12)
    out, d = matrix.shape
    decomposition = OutputDecomposition(matrix, statistics_of(rows), 1, bias=bias, shrinkage=0.0)
    ours = decomposition.errors(np.array([rank]))[0]
    target = rows @ matrix.T + bias
    norm2 = float(np.sum((target - target.mean(axis=0)) ** 2))  # errors are relative to the output's variation

    def loss(theta):
        dec = theta[: out * rank].reshape(out, rank)
        enc = theta[out * rank : out * rank + rank * d].reshape(rank, d)
        shift = theta[out * rank + rank * d :]
        residual = rows @ (dec @ enc).T + shift - target  # (n, out)
        grad_full = residual.T @ rows  # d loss / d (dec @ enc), up to the factor 2
        grad = np.concatenate([(grad_full @ enc.T).ravel(), (dec.T @ grad_full).ravel(), residual.sum(axis=0)])
        return float(np.sum(residual**2)) / norm2, 2 * grad / norm2

    rng = np.random.default_rng(rank)
    found = []
    for _ in range(6):
        start = rng.standard_normal(out * rank + rank * d + out)
        result = scipy.optimize.minimize(loss, start, jac=True, method="L-BFGS-B",
                                         options={"maxiter": 5000, "gtol": 1e-12, "ftol": 1e-15})
        found.append(np.sqrt(result.fun))
        assert np.sqrt(result.fun) >= ours * (1 - 1e-9)
    assert min(found) == pytest.approx(ours, rel=1e-5)  # the optimiser does reach our optimum


# ------------------------------------------------------------------------------------ 5. rank-deficient statistics


@pytest.mark.parametrize("shrinkage", [FIXED_SHRINKAGE, 0.0])
@pytest.mark.parametrize("kind", ["one row", "few rows", "zero inputs", "no rows", "constant rows"])
@pytest.mark.parametrize("out, d, k", [(4, 12, 1), (4, 12, 3), (20, 12, 1), (20, 12, 2), (5, 10, 2)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_rank_deficient_statistics(shrinkage, kind, out, d, k, with_bias):
    rng = np.random.default_rng(out + d + k)
    rows = {
        "one row": rng.standard_normal((1, d)),
        "few rows": rng.standard_normal((3, d)),
        "zero inputs": np.zeros((5, d)),
        "no rows": np.zeros((0, d)),
        "constant rows": np.tile(rng.standard_normal(d), (4, 1)),
    }[kind]
    matrix = rng.standard_normal((out, d))
    bias = rng.standard_normal(out) if with_bias else None
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        decomposition = OutputDecomposition(matrix, statistics_of(rows), k, bias=bias, shrinkage=shrinkage)
        ranks = np.arange(0, decomposition.max_rank + 1)
        errors = decomposition.errors(ranks)
        dropped = decomposition.dropped_energy(ranks)
        assert np.all(np.isfinite(errors)) and np.all(np.isfinite(dropped))
        assert np.all(errors >= 0) and np.all(dropped >= 0)
        for r in ranks[1:]:
            factors = decomposition.factors(int(r))
            assert all(np.all(np.isfinite(a)) for a in (factors.encoder, factors.decoder, factors.shift))
            assert np.isfinite(decomposition.measured_error(int(r)))
    if kind != "few rows":
        # no variation in the inputs (up to round-off in gram / count - mean mean^T): the shift keeps outputs exact
        if shrinkage == 0 or kind in ("zero inputs", "no rows"):
            assert np.all(errors[1:] <= 1e-6)
        else:  # nothing says which directions matter: the weight's own truncation, exact at full rank
            assert errors[-1] <= 1e-6 and np.all(np.diff(errors) <= 1e-12)
        offset = 0 if bias is None else bias
        if len(rows) and np.linalg.norm(rows @ matrix.T + offset) > 0:
            assert output_error(rows, matrix, offset, decomposition.factors(1)) < 1e-6
    if kind == "few rows":
        # 3 rows span 2 centered directions: rank 2 is exact on the data
        assert np.all(errors[min(2, decomposition.max_rank):] ** 2 <= 1e-12 + (shrinkage > 0))


# ----------------------------------------------------------------------------------------- 6. output mean preserved


@pytest.mark.parametrize("k, rank", [(1, 1), (2, 1), (2, 3), (4, 2)])
def test_output_mean_is_preserved(k, rank):
    rng = np.random.default_rng(k * 10 + rank)
    out, d = 10, 16
    matrix = rng.standard_normal((out, d))
    rows = correlated_rows(rng, 50, d, k) + 3.0
    decomposition = OutputDecomposition(matrix, statistics_of(rows), k)
    factors = decomposition.factors(rank)
    approx = rows @ reconstruct(factors).T + factors.shift
    np.testing.assert_allclose(approx.mean(axis=0), (rows @ matrix.T).mean(axis=0), rtol=1e-10, atol=1e-10)
    assert np.linalg.norm(reconstruct(factors) - matrix) > 0.1  # the weight did change


# ------------------------------------------------------------------------------------- 7. data-aware vs weight-only


@pytest.mark.parametrize("k", [1, 2])
def test_data_aware_beats_weight_truncation(k):
    rng = np.random.default_rng(21)
    out, d, n, directions = 16, 32, 400, 3
    matrix = rng.standard_normal((out, d))
    bias = rng.standard_normal(out)
    rows = rng.standard_normal((n, directions)) @ rng.standard_normal((directions, d)) * 2
    rows += 1e-3 * rng.standard_normal((n, d)) + rng.standard_normal(d)
    weight_only = output_error(rows, matrix, bias, factorize(matrix, k, directions))
    assert weight_only > 0.5
    exact = OutputDecomposition(matrix, statistics_of(rows), k, bias=bias, shrinkage=0.0)
    assert exact.errors(np.array([directions]))[0] < 0.001 * weight_only
    # the default shrinkage adds isotropic variance: its planning error overstates the real one here, yet the
    # factors are nearly as good
    shrunk = OutputDecomposition(matrix, statistics_of(rows), k, bias=bias)
    assert shrunk.errors(np.array([directions]))[0] < 0.2 * weight_only
    assert output_error(rows, matrix, bias, shrunk.factors(directions)) < 0.005 * weight_only


# ----------------------------------------------------------------------------------------------- 8. bad arguments


def test_bad_arguments():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((6, 12))
    statistics = statistics_of(rng.standard_normal((20, 12)))
    with pytest.raises(ValueError, match="equal groups"):
        OutputDecomposition(matrix, statistics, 5)
    with pytest.raises(ValueError, match="k must be"):
        OutputDecomposition(matrix, statistics, 0)
    with pytest.raises(ValueError, match="dimension 10"):
        OutputDecomposition(matrix, statistics_of(rng.standard_normal((20, 10))), 1)
    with pytest.raises(ValueError, match="shrinkage"):
        OutputDecomposition(matrix, statistics, 1, shrinkage=-0.1)
    with pytest.raises(ValueError, match="shrinkage"):
        OutputDecomposition(matrix, statistics, 1, shrinkage=float("nan"))
    with pytest.raises(ValueError, match="shrinkage"):
        shrunk_covariance(statistics, -1.0)
    with pytest.raises(ValueError, match="2-D"):
        OutputDecomposition(matrix.ravel(), statistics, 1)
    with pytest.raises(ValueError, match="bias"):
        OutputDecomposition(matrix, statistics, 1, bias=np.zeros(5))
    with pytest.raises(ValueError, match="covariance"):
        OutputDecomposition(matrix, statistics, 1, covariance=np.eye(11))
    decomposition = OutputDecomposition(matrix, statistics, 2)
    assert decomposition.max_rank == 6
    for rank in (0, 7, -1, 2.5):
        with pytest.raises(ValueError, match="rank"):
            decomposition.factors(rank)
        with pytest.raises(ValueError, match="rank"):
            decomposition.measured_error(rank)
    for ranks in ([-1, 2], [7], [1.5]):
        with pytest.raises(ValueError, match="ranks"):
            decomposition.errors(np.array(ranks))
        with pytest.raises(ValueError, match="ranks"):
            decomposition.dropped_energy(np.array(ranks))
    assert decomposition.errors(np.array([], dtype=int)).shape == (0,)


def test_protocol_surface():
    rng = np.random.default_rng(1)
    decomposition = OutputDecomposition(rng.standard_normal((4, 8)), statistics_of(rng.standard_normal((9, 8))), 2)
    assert decomposition.k == 2 and decomposition.max_rank == 4
    assert decomposition.measure == "relative output error on the calibration data"
    errors = decomposition.errors(np.arange(1, 5))
    assert errors.dtype == np.float64 and errors.shape == (4,)
    single = OutputDecomposition(rng.standard_normal((4, 8)), statistics_of(rng.standard_normal((9, 8))), 1)
    assert np.all(np.diff(single.errors(np.arange(0, 5))) <= 0)  # k = 1: more rank, less error
    factors = decomposition.factors(2)
    assert factors.encoder.dtype == factors.decoder.dtype == factors.shift.dtype == np.float64
    assert factors.k == 2 and factors.rank == 2


def test_one_calibration_row_falls_back_to_the_weight():
    """A single row (a classifier head fed one pooled sample) must not make every rank look free."""
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((8, 4))
    statistics = statistics_of(rng.standard_normal((1, 4)))
    decomposition = OutputDecomposition(matrix, statistics, 1)
    assert decomposition.errors(np.array([1]))[0] > 0.1  # not "error 0 at every rank"
    full = decomposition.factors(decomposition.max_rank)
    np.testing.assert_allclose(reconstruct(full), matrix, rtol=1e-9, atol=1e-9)  # W itself, not only the row
