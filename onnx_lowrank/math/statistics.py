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

__all__ = ["InputStatistics", "StatisticsAccumulator", "pooled", "PooledStatistics"]


@dataclass(frozen=True, eq=False)
class InputStatistics:
    """Sums over the calibration rows of one layer's input: gram = sum x x^T (d, d), total = sum x (d,), count."""

    gram: np.ndarray  # (d, d) float64, symmetric
    total: np.ndarray  # (d,) float64
    count: int

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


class StatisticsAccumulator:
    """Adds rows into running float64 sums; `result()` gives the frozen `InputStatistics`.

    Each chunk's x^T x is computed in float32 by BLAS syrk (half the work of a full product, and twice the speed of
    float64) and added into the float64 sums, so rounding does not grow with the number of chunks. The rows are
    shifted by the first chunk's mean before that (and the sums shifted back in float64): float32 rounds x^T x
    relative to its own size, and activations whose mean is large against their spread (after a BatchNorm, a
    constant offset) would otherwise lose their covariance in the rounding of the mean's square (an exactly
    dependent channel measured at 1.4% error instead of 0).
    """

    def __init__(self, dim: int) -> None:
        self._gram = np.zeros((dim, dim), dtype=np.float64)
        self._total = np.zeros(dim, dtype=np.float64)
        self._count = 0
        self._shift: np.ndarray | None = None

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self._total.shape[0]:
            raise ValueError(f"expected rows of shape (n, {self._total.shape[0]}), got {rows.shape}")
        if rows.shape[0] == 0:
            return
        if self._shift is None:
            self._shift = np.asarray(rows.mean(axis=0, dtype=np.float64), dtype=np.float32).astype(np.float64)
        chunk = np.asarray(rows - self._shift.astype(np.float32), dtype=np.float32, order="F")
        self._gram += scipy.linalg.blas.ssyrk(1.0, chunk, trans=1, lower=0)  # upper triangle of chunk^T chunk
        self._total += chunk.sum(axis=0, dtype=np.float64)
        self._count += int(rows.shape[0])

    def result(self) -> InputStatistics:
        gram = np.triu(self._gram) + np.triu(self._gram, 1).T  # only the upper triangle was accumulated
        shift = np.zeros_like(self._total) if self._shift is None else self._shift
        # sum (y + c)(y + c)^T = sum y y^T + c (sum y)^T + (sum y) c^T + n c c^T, in float64
        cross = np.outer(shift, self._total)
        gram = gram + cross + cross.T + self._count * np.outer(shift, shift)
        return InputStatistics(gram=gram, total=self._total + self._count * shift, count=self._count)


def pooled(parts: Sequence[InputStatistics]) -> InputStatistics:
    """The statistics of all the parts' rows together (sums add): the input of a weight that several nodes read."""
    if len(parts) == 1:
        return parts[0]
    return InputStatistics(gram=sum(p.gram for p in parts), total=sum(p.total for p in parts),
                           count=sum(p.count for p in parts))


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
