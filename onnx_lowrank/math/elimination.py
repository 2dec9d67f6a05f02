"""Neuron elimination by linear dependence: drop the channels that the other channels reproduce (pure numpy).

"Exploiting Non-Linear Redundancy for Neural Model Compression" (Shah, Olivier, Raj, 2020): when a channel h_d of a
layer's output (after its activation) is a linear combination of other channels plus a constant,
h_d = a_d^T h_S + c_d, every layer reading it can read the kept channels alone. A consumer computes
y = W x + b from its input patch x (a Conv's im2col patch: channel-major, `taps` positions per channel; a Gemm or
MatMul's input vector: one tap), so with A (dropped x kept) and c stacked over the dropped channels:

    W x = sum_t W_S,t h_S,t + W_D,t h_D,t  ~  sum_t (W_S,t + W_D,t A) h_S,t + (sum_t W_D,t) c

The kept columns absorb W_D,t A tap by tap and the bias absorbs (sum_t W_D,t) c. Exact when the dependence is
exact; at a Conv's zero-padded border the dropped channel was 0 where its reconstruction gives c, which the measured
error includes (it is computed on the consumer's real input patches, padding and all).

Which channels to keep: a pivoted Cholesky factorization (QR with column pivoting on the centred activations) of
the channel covariance C, each channel scaled by the energy of the consumer weights that read it, D C D with
D = diag(||W[:, channel c]||): each step keeps the channel whose part not explained by those already kept carries
the most output energy. It is greedy, deterministic, costs one n x n factorization for every width at once, and
gives nested kept sets, so the error of a width never depends on how other widths were chosen. A channel that the
consumers do not read at all is dropped first; channels past the numerical rank of C are reproduced exactly.
Readers that read the channels in different tensors (after other per-channel ops, or a coupled set's tensors) are
fitted on each tensor's own statistics, with one kept set: the pivoted Cholesky then carries one factorization per
tensor (each scaled by the energy of its own readers) and keeps at each step the channel whose unexplained output
energy, summed over the tensors, is largest.
Given the kept set, A and c are the least-squares regression of the dropped channels on the kept ones (with an
intercept), per tensor: C_DS C_SS^-1 and mean_D - A mean_S.

For an int8 deployment (`rounded`) every value a reader reads carries rounding noise of variance sigma^2 =
step^2 / 12, the step of its tensor's calibrated range (`statistics.rounding_noise`). The regression is then of h_D
on the rounded h_S, A = C_DS (C_SS + sigma^2 I)^-1 (a ridge), and the error adds sigma^2 (||W'||^2 - ||W||^2): what
the folded weights W' carry of the rounding beyond what the dense reader carried. Without it, near-copies among the
kept channels let the fold reproduce a dropped channel from their tiny differences, with coefficients that int8 then
multiplies its rounding by (PP-OCRv4 rec: a reader's weights grew 4x in norm, 14x in row maximum, char accuracy in
int8 0.74 against int8 alone's 0.96, and 0.976 with the ridge).

The error of a width is the consumers' exact relative output error on the calibration statistics,
sqrt(sum E||y - y'||^2 / sum trace(W Sigma W^T)), the measure of `projection.OutputDecomposition`, so widths and
low-rank candidates can share one allocation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from onnx_lowrank.math import lapack
from onnx_lowrank.math.statistics import InputStatistics, rounding_noise

__all__ = ["Reader", "Folded", "ChannelElimination", "keep_order", "regression", "WIDTH_STEPS", "widths"]

WIDTH_STEPS = 16
"""Widths considered per narrowable layer: the multiples of 1/16 of its channels (and its exact numerical rank),
rounded to the channel block where onnxruntime's blocked convolutions would pad them (`widths`)."""

_PSEUDO_INVERSE_RTOL = 1e-9
"""Eigenvalues of the kept channels' covariance below this fraction of the largest count as zero in the fit."""
_RANK_TOLERANCE = 1e-6
"""A channel whose unexplained (weighted) variance is below this fraction of the largest counts as reproduced
exactly (the statistics sum float32 products, so exact dependence leaves about 1e-7 of round-off)."""


@dataclass(frozen=True, eq=False)
class Reader:
    """One layer that reads the channels: its matrix (out, channels * taps), its bias and its input statistics."""

    matrix: np.ndarray  # columns in (channel, tap) C order, as `ops.layer.Layer` lays a Conv out
    taps: int
    statistics: InputStatistics  # of its input patches (dimension channels * taps)
    bias: np.ndarray | None = None
    fit: int = 0  # which of the elimination's `fits` its fold is fitted on


@dataclass(frozen=True, eq=False)
class Folded:
    """The result of keeping `kept` channels: each reader's new matrix (out, len(kept) * taps) and bias."""

    kept: np.ndarray  # channel indices, ascending
    matrices: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]


class ChannelElimination:
    """Which channels of one set to keep at every width, and how its readers absorb the others.

    `fits` are the channel statistics (dimension `channels`) of the tensors the readers are fitted on, each reader's
    `fit` naming its own: readers of one tensor share a regression, readers of different tensors (after other
    per-channel ops, or of coupled producers) get their own, all with one kept set. Without `fits`, every reader is
    fitted on its own patches' centre tap, which in a 'same' or 'valid' convolution always reads the activation
    itself, never the zero padding around it (a border of zeros would otherwise look like a relation between
    channels)."""

    def __init__(self, readers: Sequence[Reader], channels: int,
                 fits: Sequence[InputStatistics] | None = None, rounded: bool = False) -> None:
        if not readers:
            raise ValueError("channel elimination needs at least one reader")
        for reader in readers:
            if reader.matrix.shape[1] != channels * reader.taps or reader.statistics.dim != reader.matrix.shape[1]:
                raise ValueError(f"a reader of shape {reader.matrix.shape} with {reader.taps} taps does not read "
                                 f"{channels} channels (statistics of dimension {reader.statistics.dim})")
        if fits is None:
            readers = [replace(reader, fit=index) for index, reader in enumerate(readers)]
            self._moments = [_centre_moments(r.statistics, channels, r.taps) for r in readers]
        else:
            if any(f.dim != channels for f in fits) or any(not 0 <= r.fit < len(fits) for r in readers):
                raise ValueError(f"fits must be statistics of the {channels} channels, one for every reader's fit")
            self._moments = [(_symmetric(f.covariance), f.mean) for f in fits]
        # with `rounded`, the rounding noise of an int8 deployment on each fitted tensor and on each reader's input
        self.rounded = rounded
        fitted_on = [r.statistics for r in readers] if fits is None else fits
        self._fit_noise = [rounding_noise(f) if rounded else 0.0 for f in fitted_on]
        self._reader_noise = [rounding_noise(r.statistics) if rounded else 0.0 for r in readers]
        self.readers = tuple(readers)
        self.channels = channels
        energies = np.zeros((len(self._moments), channels))  # per fit: the weight energy reading each channel
        for r in readers:
            energies[r.fit] += np.square(r.matrix).reshape(r.matrix.shape[0], channels, r.taps).sum(axis=(0, 2))
        self.order, self.rank = keep_order([covariance for covariance, _ in self._moments], np.sqrt(energies))
        self._variance = sum(_output_variance(r) for r in readers)

    def fold(self, width: int) -> Folded:
        """Keep `width` channels (the first `width` of `order`, in ascending channel order) and fold the others."""
        if not 1 <= width <= self.channels:
            raise ValueError(f"width must be in [1, {self.channels}], got {width}")
        kept = np.sort(self.order[:width])
        dropped = np.setdiff1d(np.arange(self.channels), kept)
        fitted = [regression(covariance, mean, kept, dropped, noise)
                  for (covariance, mean), noise in zip(self._moments, self._fit_noise)]
        matrices, biases = [], []
        for reader in self.readers:
            a, c = fitted[reader.fit]
            out = reader.matrix.shape[0]
            w = reader.matrix.reshape(out, self.channels, reader.taps)
            folded = w[:, kept, :] + np.einsum("odt,ds->ost", w[:, dropped, :], a)
            bias = np.zeros(out) if reader.bias is None else np.asarray(reader.bias, dtype=np.float64)
            matrices.append(folded.reshape(out, width * reader.taps))
            biases.append(bias + np.einsum("odt,d->o", w[:, dropped, :], c))
        return Folded(kept=kept, matrices=tuple(matrices), biases=tuple(biases))

    def errors(self, widths: Sequence[int]) -> np.ndarray:
        """The readers' relative output error at each width (see module docstring); 0 at full width."""
        return np.array([self.error_of(self.fold(int(w))) for w in widths])

    def error_of(self, folded: Folded) -> float:
        """The readers' relative output error with `folded` written in (see module docstring)."""
        if self._variance <= 0:
            return 0.0
        total = 0.0
        for reader, matrix, bias, noise in zip(self.readers, folded.matrices, folded.biases, self._reader_noise):
            out, taps = reader.matrix.shape[0], reader.taps
            embedded = np.zeros((out, self.channels, taps))
            embedded[:, folded.kept, :] = matrix.reshape(out, len(folded.kept), taps)
            difference = reader.matrix - embedded.reshape(out, self.channels * taps)
            shift = (np.zeros(out) if reader.bias is None else reader.bias) - bias
            total += _mean_square(difference, shift, reader.statistics)
            if noise:  # the rounding noise the folded weights carry, beyond what the dense reader's carried
                total += noise * (_energy(matrix) - _energy(reader.matrix))
        return float(np.sqrt(max(total, 0.0) / self._variance))


def widths(channels: int, rank: int, align: int = 1) -> list[int]:
    """The widths a chain of `channels` channels may keep: the multiples of channels / WIDTH_STEPS and the numerical
    rank of its activations (below it the others reproduce the dropped channels exactly), each rounded up to a
    multiple of `align`. A narrowed blocked Conv (onnxruntime's NCHWc layout) pads its channels up to the block, so an
    unaligned width would cost as much as the next aligned one and keep less."""
    steps = {max(1, round(channels * step / WIDTH_STEPS)) for step in range(1, WIDTH_STEPS)}
    if 0 < rank < channels:
        steps.add(rank)
    return sorted({-(-w // align) * align for w in steps} - {0} if align > 1 else steps)


def keep_order(covariances: np.ndarray | Sequence[np.ndarray], scales: np.ndarray | Sequence[np.ndarray]
               ) -> tuple[np.ndarray, int]:
    """Channels in the order a pivoted Cholesky of diag(scale) C diag(scale) keeps them, and its numerical rank.

    With several tensors (a covariance and a scale each), one Cholesky factorization per tensor is carried along
    and each step keeps the channel with the most unexplained scaled variance summed over the tensors: what their
    separate regressions leave of it. The first `rank` channels are pivots; the rest, which the pivots reproduce
    in every tensor, follow in ascending order."""
    if isinstance(covariances, np.ndarray) and covariances.ndim == 2:
        covariances, scales = [covariances], [scales]
    weighted = [c * np.outer(s, s) for c, s in zip(covariances, scales)]
    n = weighted[0].shape[0]
    residuals = [np.diag(w).astype(np.float64).copy() for w in weighted]
    total = sum(residuals)
    limit = _RANK_TOLERANCE * max(float(total.max(initial=0.0)), 0.0)
    factors = [np.zeros((n, n)) for _ in weighted]
    order: list[int] = []
    free = np.ones(n, dtype=bool)
    for step in range(n):
        pivot = int(np.argmax(np.where(free, total, -np.inf)))
        if not free[pivot] or total[pivot] <= limit or total[pivot] <= 0:
            break
        for w, factor, residual in zip(weighted, factors, residuals):
            if residual[pivot] > 0:  # else this tensor's other pivots reproduce it already: nothing to add
                column = (w[:, pivot] - factor[:, :step] @ factor[pivot, :step]) / np.sqrt(residual[pivot])
                factor[:, step] = column
                residual -= column * column
        total = sum(residuals)
        free[pivot] = False
        order.append(pivot)
    rank = len(order)
    order.extend(int(i) for i in np.flatnonzero(free))
    return np.array(order, dtype=np.intp), rank


def regression(covariance: np.ndarray, mean: np.ndarray, kept: np.ndarray, dropped: np.ndarray,
               noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Least squares h_D ~ A h_S + c over the calibration statistics: A = C_DS C_SS^-1, c = mean_D - A mean_S; with
    `noise` (the variance of rounding noise on every kept value), of h_D on the rounded h_S: A = C_DS (C_SS + noise
    I)^-1, a ridge that does not lean on directions the rounding drowns."""
    if len(dropped) == 0:
        return np.zeros((0, len(kept))), np.zeros(0)
    c_ss = covariance[np.ix_(kept, kept)]
    if noise:
        c_ss = c_ss + noise * np.eye(len(kept))
    # a pseudo-inverse: past the numerical rank the kept channels include copies and dead ones (C_SS singular)
    a_t = lapack.pinvh(c_ss, rtol=_PSEUDO_INVERSE_RTOL) @ covariance[np.ix_(kept, dropped)]
    a = a_t.T
    return a, mean[dropped] - a @ mean[kept]


def _centre_moments(statistics: InputStatistics, channels: int, taps: int) -> tuple[np.ndarray, np.ndarray]:
    """Channel covariance and mean from patch statistics: those of the centre tap (see `ChannelElimination`)."""
    centre = taps // 2
    sigma = statistics.covariance.reshape(channels, taps, channels, taps)[:, centre, :, centre]
    return _symmetric(sigma), statistics.mean.reshape(channels, taps)[:, centre]


def _energy(matrix: np.ndarray) -> float:
    """||matrix||_F^2."""
    return float(np.einsum("ij,ij->", matrix, matrix))


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    return (matrix + matrix.T) / 2


def _mean_square(difference: np.ndarray, shift: np.ndarray, statistics: InputStatistics) -> float:
    """E|D x + s|^2 over the calibration rows, from the raw sums: tr(D (G/n) D^T) + 2 s^T D mean + s^T s.

    The same number as tr(D Sigma D^T) + |D mean + s|^2 without forming the covariance (a (d, d) copy per call)."""
    moved = difference @ statistics.mean
    square = float(np.einsum("ij,ij->", difference @ statistics.gram, difference)) / max(statistics.count, 1)
    return square + 2.0 * float(shift @ moved) + float(shift @ shift)


def _output_variance(reader: Reader) -> float:
    """trace(W Sigma W^T): the output variance the reader produces on the calibration data."""
    return _mean_square(reader.matrix, -(reader.matrix @ reader.statistics.mean), reader.statistics)
