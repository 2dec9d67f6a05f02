"""Data-aware, output-optimal grouped low-rank decomposition of one layer (pure numpy, no ONNX).

A layer computes y = W x + b, W of shape (out, d), for every calibration row x (a Conv's im2col patch, a Gemm's
input). With k groups, W = [W_1 .. W_k] and x = [x_1 .. x_k] split into contiguous blocks of d/k columns, and the
factorized layer computes y_hat = sum_g D_g E_g x_g + b + shift (the `svd.Factors` layout).

Statistics: mu = mean of x, Sigma = centered covariance, regularised by shrinkage (calibration statistics are often
rank deficient): Sigma_s = Sigma + shrinkage * (trace(Sigma) / d) * I. No inverse of Sigma_s is ever taken, so
shrinkage 0 works too. When the inputs do not vary at all (one calibration row), trace(E[x x^T]) / d takes the
place of trace(Sigma) / d, so the layer falls back to the weight's own truncation instead of reporting error 0.

Per group, the output-optimal projection: U_g = eigenvectors, by descending eigenvalue, of the group's output
covariance Q_gg = W_g Sigma_s[g,g] W_g^T (the left singular vectors of W_g Sigma_s[g,g]^(1/2)); P_g = U_g,r U_g,r^T
with U_g,r its first r columns. Factors at rank r:

    D_g = U_g,r      E_g = U_g,r^T W_g   (W_hat_g = P_g W_g)      shift = sum_g (I - P_g) W_g mu_g

so the output mean is kept exactly. For k = 1 this is the best rank-r approximation of W in the Sigma_s norm.

Error at rank r, with E = W - W_hat = [(I - P_1) W_1 .. (I - P_k) W_k] (cross-group terms included):

    err2(r) = trace(E Sigma_s E^T)          variation = trace(W Sigma_s W^T)
    errors(r) = sqrt(err2(r) / variation)   dropped_energy(r) = err2(r) / variation

errors is the relative output error ||Y - Y_hat||_F / ||Y - mean(Y)||_F on the calibration rows (exactly so when
shrinkage is 0): relative to how much the output varies, not to its norm. The bias correction keeps the mean
exactly, and a constant part carries no information: measured against ||Y||, a layer whose outputs sit far from 0
(the class logits of a detector, around -8) could take errors that move its decisions. On YOLOv8n at 0.7 of the
params, this choice kept box F1 0.85 where the uncentered one kept 0.61 (benchmarks/RESULTS.md). All ranks at once: W_g Sigma_s[g,:] = U_g A_g Sigma_s[g,:] with A_g = U_g^T W_g (U_g spans every direction
Q_gg reaches), hence E = sum_g U_g (I - J_r) A_g [block g], J_r keeping the first r coordinates, and

    err2(r) = sum_{i,j >= r} F[i,j],    F = sum_{g,h} T_gh o O_gh,   T_gh = A_g Sigma_s[g,h] A_h^T,  O_gh = U_g^T U_h

(o: elementwise product; T_gg o O_gg = diag(eigenvalues of Q_gg)), a tail-tail sum over one n x n matrix. For k = 1
err2(r) is the sum of the dropped eigenvalues, decreasing in r; for k > 1 it can (rarely) rise with r, when the
truncation errors of different groups partly cancel. err2 is exact to round-off relative to the energy, so errors
near 0 are good to about 1e-8 (the square root of float64 precision).

Cost: with n = min(out, d/k) eigenvectors per group, out <= d/k diagonalises Q_gg (out x out); out > d/k takes the
SVD of W_g Sigma_s[g,g]^(1/2) (out x d/k) and never forms an out x out matrix.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from onnx_lowrank.math import lapack
from onnx_lowrank.math.statistics import InputStatistics
from onnx_lowrank.math.svd import Factors

__all__ = ["DEFAULT_SHRINKAGE", "shrunk_covariance", "oas_intensity", "adaptive_shrinkage", "OutputDecomposition"]

DEFAULT_SHRINKAGE = None
"""None: adaptive, per layer, from the layer's own statistics (`adaptive_shrinkage`, Oracle Approximating
Shrinkage); a number fixes it for every layer."""
_ROUND_OFF = 1e-12  # output variance below this fraction of the mean squared output is round-off, not variation


def oas_intensity(covariance: np.ndarray, rows: int) -> float:
    """The Oracle Approximating Shrinkage intensity rho in [0, 1] of a sample covariance S (d x d) of `rows` rows
    (Chen, Wiesel, Eldar, Hero 2010): the estimate (1 - rho) S + rho (trace(S) / d) I. Closed form in trace(S),
    trace(S^2) and the row count: near 1 with few rows against d (or isotropic inputs), near 0 with many."""
    d = covariance.shape[0]
    if d < 2 or rows < 1:
        return 1.0
    trace = float(np.trace(covariance))
    trace2 = float(np.einsum("ij,ij->", covariance, covariance))  # trace(S^2) of a symmetric S
    denominator = (rows + 1.0 - 2.0 / d) * (trace2 - trace * trace / d)
    if not trace > 0 or not denominator > 0:  # no variation, or perfectly isotropic: nothing but the target
        return 1.0
    return float(min(1.0, ((1.0 - 2.0 / d) * trace2 + trace * trace) / denominator))


def adaptive_shrinkage(intensity: float) -> float:
    """The OAS intensity rho as this module's shrinkage A (Sigma + A * trace(Sigma) / d * I is (1 - rho) S +
    rho * trace(S) / d * I up to a factor, which the decomposition ignores): A = rho / (1 - rho); inf at rho = 1."""
    return math.inf if intensity >= 1.0 - 1e-12 else intensity / (1.0 - intensity)


def shrunk_covariance(statistics: InputStatistics, shrinkage: float | None = DEFAULT_SHRINKAGE) -> np.ndarray:
    """Sigma + shrinkage * (trace(Sigma) / d) * I of the layer's input (float64, symmetric, d x d). None: the
    adaptive (OAS) shrinkage of these statistics; inf: only the isotropic part, (trace(Sigma) / d) * I, whose
    decomposition is the weight's own (Frobenius) truncation."""
    shrinkage = _check_shrinkage(shrinkage, special=True)
    # statistics.covariance (gram / count - mean mean^T), built in one d x d array: on large layers every extra
    # d x d temporary costs more (page faults) than the arithmetic
    count = max(statistics.count, 1)
    mean = np.asarray(statistics.mean, dtype=np.float64)
    covariance = np.divide(statistics.gram, count, dtype=np.float64)
    d = covariance.shape[0]
    step = 256
    for start in range(0, d, step):
        covariance[start : start + step] -= np.outer(mean[start : start + step], mean)
    if shrinkage is None:
        shrinkage = adaptive_shrinkage(oas_intensity(covariance, statistics.count))
    if shrinkage and d:
        variation = max(float(np.trace(covariance)), 0.0)
        if variation <= _ROUND_OFF * float(np.trace(statistics.gram)) / count:
            # one row, or inputs that never change: nothing says which directions matter, so regularise with the
            # inputs' size instead; the decomposition then falls back to the weight's own (Frobenius) truncation
            variation = float(np.trace(statistics.gram)) / count
        if shrinkage == math.inf:
            covariance[:] = 0.0
            shrinkage = 1.0
        covariance[np.diag_indices(d)] += shrinkage * variation / d
    return covariance


class OutputDecomposition:
    """Output-optimal grouped decomposition of one layer on its calibration statistics (see module docstring).

    The constructor does all the work (eigenvectors of every group and the error of every rank); `factors` only
    slices. Pass `covariance` (an already shrunk d x d covariance, see `shrunk_covariance`) to share it between
    group counts; otherwise it is computed from `statistics` with `shrinkage`.
    """

    measure = "relative output error on the calibration data"

    def __init__(
        self,
        matrix: np.ndarray,
        statistics: InputStatistics,
        k: int,
        bias: np.ndarray | None = None,
        shrinkage: float | None = DEFAULT_SHRINKAGE,
        covariance: np.ndarray | None = None,
    ) -> None:
        w = np.asarray(matrix, dtype=np.float64)
        if w.ndim != 2:
            raise ValueError(f"matrix must be 2-D (out, in), got shape {w.shape}")
        out, d = w.shape
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"k must be a whole number >= 1, got {k!r}")
        k = int(k)
        if d % k:
            raise ValueError(f"cannot split {d} input columns into {k} equal groups")
        if statistics.dim != d:
            raise ValueError(f"statistics are of dimension {statistics.dim}, the matrix has {d} input columns")
        shrinkage = _check_shrinkage(shrinkage, special=True)
        if bias is not None:
            bias = np.asarray(bias, dtype=np.float64).reshape(-1)
            if bias.shape != (out,):
                raise ValueError(f"bias must have {out} values, got shape {np.shape(bias)}")
        if covariance is None:
            sigma = shrunk_covariance(statistics, shrinkage)
        else:
            sigma = np.asarray(covariance, dtype=np.float64)
            if sigma.shape != (d, d):
                raise ValueError(f"covariance must be of shape {(d, d)}, got {sigma.shape}")

        self.k = k
        self.bias = bias
        self.shrinkage = shrinkage
        m = d // k
        n = min(out, m)
        self._out, self._cols, self._n = out, m, n
        mean = np.asarray(statistics.mean, dtype=np.float64)
        self._output_mean = w @ mean  # W mu: E[y] - b
        self._means = mean.reshape(k, m)

        blocks = [w[:, g * m : (g + 1) * m] for g in range(k)]
        vectors = []  # U_g (out, n)
        encoders = []  # A_g = U_g^T W_g (n, m)
        values = np.empty((k, n))  # eigenvalues of Q_gg, descending
        for g, block in enumerate(blocks):
            rows = slice(g * m, (g + 1) * m)
            if out <= m:
                # diagonalise Q_gg = W_g Sigma_s[g,g] W_g^T (out x out)
                q = (block @ sigma[rows, rows]) @ block.T
                lam, u = lapack.eigh(q)
                lam, u = lam[::-1], np.ascontiguousarray(u[:, ::-1])
            else:
                # SVD of W_g Sigma_s[g,g]^(1/2) (out x m): no out x out matrix
                ev, v = lapack.eigh(sigma[rows, rows])
                root = v * np.sqrt(np.clip(ev, 0.0, None))
                u, s, _ = lapack.svd(block @ root)
                lam = s * s
            vectors.append(u)
            encoders.append(u.T @ block)
            values[g] = lam
        self.eigenvalues = values  # (k, n): output-covariance spectrum of every group, descending
        self._vectors = vectors
        self._encoders = encoders

        # tail[r] = err2(r) = sum_{i,j>=r} F_ij, F = sum_{g,h} T_gh o O_gh. The diagonal blocks give diag(eigenvalues)
        # (T_gg = diag(eigenvalues), O_gg = I); the pair (h, g) gives the transpose of the pair (g, h).
        contribution = values.sum(axis=0)  # (n,): per i, F_ii + 2 sum_{j>i} F_ij of the symmetric F
        if k > 1:
            f = np.zeros((n, n))
            for g in range(k - 1):
                later = encoders[g] @ sigma[g * m : (g + 1) * m, (g + 1) * m :]  # A_g Sigma_s[g, h>g]
                for h in range(g + 1, k):
                    t = later[:, (h - g - 1) * m : (h - g) * m] @ encoders[h].T  # T_gh
                    f += t * (vectors[g].T @ vectors[h])  # o O_gh
            f += f.T
            contribution = contribution + np.diag(f) + 2.0 * np.triu(f, 1).sum(axis=1)
        tail = np.concatenate([np.cumsum(contribution[::-1])[::-1], [0.0]])  # tail[r], r = 0..n
        self._err2 = np.clip(tail, 0.0, None)
        self._err2[n] = 0.0
        self._weight_energy = float(self._err2[0])  # trace(W Sigma_s W^T)
        offset = self._output_mean if bias is None else self._output_mean + bias
        self._energy = self._weight_energy + float(offset @ offset)

    @property
    def max_rank(self) -> int:
        """Largest useful rank of one group: min(out, in/k)."""
        return self._n

    @property
    def weight_energy(self) -> float:
        """trace(W Sigma_s W^T): the output variance the layer produces on the calibration data."""
        return self._weight_energy

    @property
    def energy(self) -> float:
        """trace(W Sigma_s W^T) + ||W mu + b||^2: the mean squared output norm on the calibration data."""
        return self._energy

    def squared_errors(self, ranks: np.ndarray) -> np.ndarray:
        """err2(r) = trace(E Sigma_s E^T) for each rank (absolute, not relative)."""
        return self._err2[self._check_ranks(ranks)]

    def errors(self, ranks: np.ndarray) -> np.ndarray:
        """Relative output error sqrt(err2(r) / trace(W Sigma_s W^T)) of each rank in `ranks` (0..max_rank): the
        error relative to the output's variation (its mean is kept exactly by the bias correction)."""
        return np.sqrt(self.dropped_energy(ranks))

    def dropped_energy(self, ranks: np.ndarray) -> np.ndarray:
        """Fraction err2(r) / trace(W Sigma_s W^T) of the output variance each rank drops (0 when the output does
        not vary beyond round-off: the bias correction then reproduces it). Above 1 is possible with k > 1: groups
        truncated apart can lose correlated parts that cancelled in the dense output."""
        err2 = self.squared_errors(ranks)
        if self._weight_energy <= _ROUND_OFF * self._energy:
            return np.zeros(err2.shape)
        return err2 / self._weight_energy

    def factors(self, rank: int) -> Factors:
        """D_g = U_g,r, E_g = U_g,r^T W_g, shift = sum_g (I - P_g) W_g mu_g."""
        rank = self._check_rank(rank)
        k, m, out = self.k, self._cols, self._out
        encoder = np.empty((k, rank, m))
        decoder = np.empty((out, k * rank))
        kept = np.zeros(out)  # sum_g P_g W_g mu_g
        for g, (u, a) in enumerate(zip(self._vectors, self._encoders)):
            decoder[:, g * rank : (g + 1) * rank] = u[:, :rank]
            encoder[g] = a[:rank]
            kept += u[:, :rank] @ (a[:rank] @ self._means[g])
        return Factors(k=k, rank=rank, encoder=encoder, decoder=decoder, shift=self._output_mean - kept)

    def measured_error(self, rank: int) -> float:
        """The error of `factors(rank)`: `errors` is exact, so the same number."""
        return float(self.errors(np.array([self._check_rank(rank)]))[0])

    def written(self, rank: int) -> tuple[Factors, float]:
        return self.factors(rank), self.measured_error(rank)

    def _check_rank(self, rank) -> int:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= self._n:
            raise ValueError(f"rank must be a whole number in [1, {self._n}], got {rank!r}")
        return int(rank)

    def _check_ranks(self, ranks) -> np.ndarray:
        ranks = np.asarray(ranks)
        if ranks.size == 0:
            return np.zeros(ranks.shape, dtype=np.intp)
        if not np.issubdtype(ranks.dtype, np.integer):
            if not np.issubdtype(ranks.dtype, np.floating) or not np.all(ranks == np.round(ranks)):
                raise ValueError(f"ranks must be whole numbers, got {ranks!r}")
            ranks = ranks.astype(np.intp)
        if ranks.min() < 0 or ranks.max() > self._n:
            raise ValueError(f"ranks must be in [0, {self._n}], got values from {ranks.min()} to {ranks.max()}")
        return ranks


def _check_shrinkage(shrinkage, special: bool = False) -> float | None:
    """A finite shrinkage >= 0; with `special`, also None (adaptive) and inf (isotropic only)."""
    if special and (shrinkage is None or (isinstance(shrinkage, float) and shrinkage == math.inf)):
        return shrinkage
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, numbers.Real) or not np.isfinite(shrinkage):
        raise ValueError(f"shrinkage must be a finite number >= 0, got {shrinkage!r}")
    if shrinkage < 0:
        raise ValueError(f"shrinkage must be >= 0, got {shrinkage!r}")
    return float(shrinkage)
