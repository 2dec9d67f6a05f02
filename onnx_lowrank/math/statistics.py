"""Second-moment statistics of a layer's input, accumulated one chunk of rows at a time.

A layer computes y = W x (+ b) for every row x of its input: a Conv's im2col patch (c_in * taps values, in the
C order of the layer matrix's columns), a Gemm/MatMul's input vector. What the data-aware decomposition needs from the
calibration data is the sum of x x^T, the sum of x and the number of rows: memory is d x d whatever the number of
samples, and adding chunks in any split gives the same result as adding all rows at once (to float32 rounding).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg.blas

__all__ = ["InputStatistics", "StatisticsAccumulator", "pooled", "PooledStatistics", "rounding_noise", "INT8_LEVELS"]


@dataclass(frozen=True, eq=False)
class InputStatistics:
    """Sums over the calibration rows of one layer's input: gram = sum x x^T (d, d), total = sum x (d,), count; and
    the smallest and largest value seen, the range an int8 deployment's per-tensor scale is calibrated on
    (`rounding_noise`)."""

    gram: np.ndarray  # (d, d) float64, symmetric
    total: np.ndarray  # (d,) float64
    count: int
    low: float = 0.0  # smallest value in any row (0.0 when there were none)
    high: float = 0.0  # largest value in any row

    @property
    def dim(self) -> int:
        return self.total.shape[0]

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def covariance(self) -> np.ndarray:
        """Centered second moment E[(x - mean)(x - mean)^T] (float64, symmetric)."""
        mean = self.mean
        return self.gram / max(self.count, 1) - np.outer(mean, mean)


INT8_LEVELS = 256


def rounding_noise(statistics: InputStatistics, levels: int = INT8_LEVELS) -> float:
    """The variance of the rounding error an activation quantized per tensor to `levels` levels carries: a step of
    (max - min) / (levels - 1) over the calibrated range (which onnxruntime's MinMax calibration widens to include
    0), and the error uniform within a step, step^2 / 12. What an int8 model adds to every value a layer reads."""
    step = (max(statistics.high, 0.0) - min(statistics.low, 0.0)) / (levels - 1)
    return step * step / 12.0


class StatisticsAccumulator:
    """Adds rows into running sums; `result()` gives the frozen `InputStatistics`.

    Rows are gathered in a float32 buffer of at least `dim` rows (`BUFFER_ROWS` for narrow inputs) and each full
    buffer's x^T x is computed in float32 (twice the speed of float64; numpy's product, which releases the GIL, so
    layers are summed on every core) and added into float64 sums, so rounding does not grow with the number of
    samples. The buffer is what makes it fast:
    a deep layer sees ~100 positions per sample against thousands of input values, and a product of that few rows
    is bound by reading and writing the d x d sum, not by arithmetic (YOLOv8n: 2 s of a 3 s calibration pass).
    The rows are shifted by the first chunk's mean before that (and the sums shifted back in float64): float32 rounds
    x^T x relative to its own size, and activations whose mean is large against their spread (after a BatchNorm, a
    constant offset) would otherwise lose their covariance in the rounding of the mean's square (an exactly
    dependent channel measured at 1.4% error instead of 0).
    """

    BUFFER_ROWS = 2048

    def __init__(self, dim: int) -> None:
        self._gram = np.zeros((dim, dim), dtype=np.float64)  # only its upper triangle is read (`result`)
        self._total = np.zeros(dim, dtype=np.float64)
        self._count = 0
        self._shift: np.ndarray | None = None
        self._buffer: np.ndarray | None = None  # (capacity, dim) float32, shifted rows not yet in the sums
        self._filled = 0
        self._low, self._high = np.inf, -np.inf

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        dim = self._total.shape[0]
        if rows.ndim != 2 or rows.shape[1] != dim:
            raise ValueError(f"expected rows of shape (n, {dim}), got {rows.shape}")
        if rows.shape[0] == 0:
            return
        self._low = min(self._low, float(rows.min()))
        self._high = max(self._high, float(rows.max()))
        if self._shift is None:
            self._shift = np.asarray(rows.mean(axis=0, dtype=np.float64), dtype=np.float32).astype(np.float64)
            self._buffer = np.empty((max(dim, self.BUFFER_ROWS), dim), dtype=np.float32)
        shift = self._shift.astype(np.float32)
        capacity = self._buffer.shape[0]
        start = 0
        while start < rows.shape[0]:
            taken = min(capacity - self._filled, rows.shape[0] - start)
            np.subtract(rows[start : start + taken], shift, out=self._buffer[self._filled : self._filled + taken],
                        dtype=np.float32, casting="unsafe")
            self._filled += taken
            start += taken
            if self._filled == capacity:
                self._flush()
        self._count += int(rows.shape[0])

    def _flush(self) -> None:
        if not self._filled:
            return
        chunk = self._buffer[: self._filled]
        # numpy's product, not BLAS syrk through scipy (half the arithmetic): scipy holds the GIL through the call
        self._gram += np.matmul(chunk.T, chunk)
        self._total += chunk.sum(axis=0, dtype=np.float64)
        self._filled = 0

    def result(self) -> InputStatistics:
        self._flush()
        gram = self._gram.copy()
        total = self._total.copy()
        if self._shift is not None:
            # sum (y + c)(y + c)^T = sum y y^T + c (sum y)^T + (sum y) c^T + n c c^T, in float64: a rank-2 update
            # (BLAS syr2) of the upper triangle, the lower one of the transposed (Fortran) view; the lower triangle
            # is then mirrored from it, so the result is exactly symmetric
            half = self._total + 0.5 * self._count * self._shift
            scipy.linalg.blas.dsyr2(1.0, self._shift, half, a=gram.T, lower=1, overwrite_a=1)
            total += self._count * self._shift
        _mirror_upper(gram)
        seen = self._count > 0
        return InputStatistics(gram=gram, total=total, count=self._count, low=self._low if seen else 0.0,
                               high=self._high if seen else 0.0)


_BLOCK = 256


def _mirror_upper(matrix: np.ndarray) -> None:
    """Copies the upper triangle of a square matrix onto its lower one, in place, block by block: a whole-matrix
    transpose reads memory out of order and took 3x longer on wide layers."""
    n = matrix.shape[0]
    for i in range(0, n, _BLOCK):
        diagonal = matrix[i : i + _BLOCK, i : i + _BLOCK]
        lower = np.tril_indices(diagonal.shape[0], -1)
        diagonal[lower] = diagonal.T[lower]
        for j in range(i + _BLOCK, n, _BLOCK):
            matrix[j : j + _BLOCK, i : i + _BLOCK] = matrix[i : i + _BLOCK, j : j + _BLOCK].T


def pooled(parts: Sequence[InputStatistics]) -> InputStatistics:
    """The statistics of all the parts' rows together (sums add): the input of a weight that several nodes read."""
    if len(parts) == 1:
        return parts[0]
    return InputStatistics(gram=sum(p.gram for p in parts), total=sum(p.total for p in parts),
                           count=sum(p.count for p in parts), low=min(p.low for p in parts),
                           high=max(p.high for p in parts))


class PooledStatistics(Mapping):
    """name -> the statistics of several parts' rows together (`pooled`), made when asked for and not kept: one
    calibration pass collects its rows in parts (the judge's folds, `calibrate`), and the whole is their sum, so
    neither the whole nor the parts need a pass of their own and only the parts are held."""

    def __init__(self, parts: Sequence[Mapping[str, InputStatistics]]) -> None:
        self.parts = tuple(parts)

    def __getitem__(self, name: str) -> InputStatistics:
        return pooled([part[name] for part in self.parts])

    def __iter__(self) -> Iterator[str]:
        return iter(self.parts[0]) if self.parts else iter(())

    def __len__(self) -> int:
        return len(self.parts[0]) if self.parts else 0
