"""The rows a layer multiplies by its weight matrix, taken from the layer's input (pure numpy, no ONNX).

A layer is seen as a matrix W of shape (out, c_in * taps): a Conv weight (out, c_in, *kernel) reshaped in C order,
a Gemm/MatMul weight as (out, in). Data-aware compression needs the second moments of the vectors x that W
multiplies, so that W @ x is the layer's output (without bias) at one position:

- Conv: x is the im2col patch at one output position, the c_in * taps input values that position reads, in the
  same C order as W's columns (channel-major, then kernel dims), zeros where the window lies in the padding.
- Gemm/MatMul: x is the input vector over the last axis.

`conv_rows` and `linear_rows` return those rows, optionally a seeded random subset of them; the subset is gathered
directly at the chosen positions, so a large feature map never has all of its patches built at once. The rows go
to `statistics.StatisticsAccumulator`.

Padding follows the ONNX Conv spec (and `onnx.reference`): for SAME_UPPER/SAME_LOWER the total pad along an axis is
(ceil(in / stride) - 1) * stride + (kernel - 1) * dilation + 1 - in, clamped at 0. onnxruntime (1.32) does not
clamp it: where it is -3 or less (SAME_UPPER) or -4 or less (SAME_LOWER), which needs stride >= kernel + 3, its
windows start one or more positions later than the spec's, so its output differs from W @ rows there. It also
refuses SAME_* with dilations > 1, which the spec allows and these rows follow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

__all__ = ["AUTO_PADS", "ConvGeometry", "conv_rows", "linear_rows", "input_rows"]

AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")


@dataclass(frozen=True)
class ConvGeometry:
    """A Conv's sliding-window attributes, as ONNX defines them (defaults filled in)."""

    kernel_shape: tuple[int, ...]  # spatial kernel dims (from the weight shape)
    strides: tuple[int, ...]  # default all 1
    dilations: tuple[int, ...]  # default all 1
    pads: tuple[int, ...]  # ONNX layout: begins then ends, default all 0 (ignored unless auto_pad is NOTSET)
    auto_pad: str = "NOTSET"  # NOTSET, SAME_UPPER, SAME_LOWER or VALID

    def __post_init__(self) -> None:
        for name in ("kernel_shape", "strides", "dilations", "pads"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        auto_pad = self.auto_pad.decode() if isinstance(self.auto_pad, bytes) else str(self.auto_pad)
        object.__setattr__(self, "auto_pad", auto_pad)
        dims = len(self.kernel_shape)
        if dims < 1:
            raise ValueError("a Conv needs at least one spatial dimension")
        if len(self.strides) != dims or len(self.dilations) != dims or len(self.pads) != 2 * dims:
            raise ValueError(
                f"kernel {self.kernel_shape} needs {dims} strides, {dims} dilations and {2 * dims} pads, "
                f"got {self.strides}, {self.dilations}, {self.pads}"
            )
        if min(self.kernel_shape) < 1 or min(self.strides) < 1 or min(self.dilations) < 1 or min(self.pads) < 0:
            raise ValueError(f"invalid Conv geometry: {self}")
        if auto_pad not in AUTO_PADS:
            raise ValueError(f"unknown auto_pad {auto_pad!r}; expected one of {', '.join(AUTO_PADS)}")

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, object], kernel_shape: Sequence[int]) -> ConvGeometry:
        """From a Conv node's {name: value} attributes (as `onnx.helper.get_attribute_value` gives them) and the
        spatial dims of its weight; missing attributes get the ONNX defaults."""
        kernel = tuple(int(k) for k in kernel_shape)
        dims = len(kernel)
        if _ints(attributes.get("kernel_shape"), kernel) != kernel:
            raise ValueError(f"kernel_shape attribute {attributes['kernel_shape']} does not match the weight's {kernel}")
        auto_pad = attributes.get("auto_pad") or "NOTSET"
        return cls(
            kernel_shape=kernel,
            strides=_ints(attributes.get("strides"), (1,) * dims),
            dilations=_ints(attributes.get("dilations"), (1,) * dims),
            pads=_ints(attributes.get("pads"), (0,) * (2 * dims)),
            auto_pad=auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad),
        )

    def resolved_pads(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Concrete pads (begins then ends) for an input of this spatial size, `auto_pad` applied."""
        dims = self._check(spatial)
        if self.auto_pad == "NOTSET":
            return self.pads
        if self.auto_pad == "VALID":
            return (0,) * (2 * dims)
        begins, ends = [], []
        for size, kernel, stride, dilation in zip(spatial, self.kernel_shape, self.strides, self.dilations):
            out = -(-int(size) // stride)
            total = max(0, (out - 1) * stride + (kernel - 1) * dilation + 1 - int(size))
            begin = (total + 1) // 2 if self.auto_pad == "SAME_LOWER" else total // 2
            begins.append(begin)
            ends.append(total - begin)
        return tuple(begins + ends)

    def output_shape(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Spatial size of the Conv output for an input of this spatial size."""
        pads = self.resolved_pads(spatial)
        dims = len(self.kernel_shape)
        shape = tuple(
            (int(size) + pads[i] + pads[dims + i] - (kernel - 1) * dilation - 1) // stride + 1
            for i, (size, kernel, stride, dilation) in enumerate(
                zip(spatial, self.kernel_shape, self.strides, self.dilations)
            )
        )
        if min(shape) < 1:
            raise ValueError(f"input of spatial size {tuple(spatial)} is smaller than the (dilated) kernel of {self}")
        return shape

    def _check(self, spatial: Sequence[int]) -> int:
        dims = len(self.kernel_shape)
        if len(spatial) != dims:
            raise ValueError(f"a {dims}-D Conv needs a {dims}-D input, got spatial size {tuple(spatial)}")
        return dims


def conv_rows(x: np.ndarray, geometry: ConvGeometry, max_rows: int | None = None, seed: int = 0) -> np.ndarray:
    """im2col rows of a Conv input x (N, C, *spatial): shape (P, C * prod(kernel)), columns in C order
    (c, k1, k2, ...), rows in C order of (n, o1, o2, ...), so that W.reshape(out, -1) @ rows.T is the Conv output
    (without bias). With `max_rows` and more positions than that, only a sorted, seeded random subset of exactly
    `max_rows` positions is gathered."""
    x = _as_float(x)
    dims = len(geometry.kernel_shape)
    if x.ndim != dims + 2:
        raise ValueError(f"a {dims}-D Conv needs an input of rank {dims + 2}, got shape {x.shape}")
    batch, channels, *spatial = x.shape
    out = geometry.output_shape(spatial)
    padded = _padded_channels_last(x, geometry.resolved_pads(spatial))
    taps = list(np.ndindex(*geometry.kernel_shape))
    chosen = _chosen(batch * math.prod(out), max_rows, seed)

    if chosen is None:  # every position: one strided slice per kernel tap
        rows = np.empty((batch, *out, channels, len(taps)), dtype=x.dtype)
        for t, tap in enumerate(taps):
            window = tuple(
                slice(k * d, k * d + (o - 1) * s + 1, s)
                for k, d, o, s in zip(tap, geometry.dilations, out, geometry.strides)
            )
            rows[..., t] = padded[(slice(None), *window)]
        return rows.reshape(-1, channels * len(taps))

    n_index, *positions = np.unravel_index(chosen, (batch, *out))
    starts = [p * s for p, s in zip(positions, geometry.strides)]
    rows = np.empty((chosen.size, channels, len(taps)), dtype=x.dtype)
    for t, tap in enumerate(taps):
        coords = tuple(start + k * d for start, k, d in zip(starts, tap, geometry.dilations))
        rows[:, :, t] = padded[(n_index, *coords)]
    return rows.reshape(chosen.size, channels * len(taps))


def linear_rows(x: np.ndarray, max_rows: int | None = None, seed: int = 0) -> np.ndarray:
    """Rows of a Gemm/MatMul input: x reshaped to (-1, x.shape[-1]), or a sorted, seeded random subset of exactly
    `max_rows` of them when there are more. Without subsampling this is a view of a float x, not a copy."""
    x = _as_float(x)
    if x.ndim < 1:
        raise ValueError("a Gemm/MatMul input has at least one axis")
    rows = x.reshape(-1, x.shape[-1])
    chosen = _chosen(rows.shape[0], max_rows, seed)
    return rows if chosen is None else rows[chosen]


def input_rows(x: np.ndarray, geometry: ConvGeometry | None, max_rows: int | None = None, seed: int = 0) -> np.ndarray:
    """The rows a layer reads from its input `x`: im2col patches for a Conv (`geometry`), vectors otherwise."""
    x = np.asarray(x)
    return linear_rows(x, max_rows, seed) if geometry is None else conv_rows(x, geometry, max_rows, seed)


def _ints(value: object, default: tuple[int, ...]) -> tuple[int, ...]:
    """An ONNX ints attribute as a tuple; absent or empty: the default."""
    return tuple(int(v) for v in cast(Sequence[int], value)) if value else default


def _as_float(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)


def _chosen(total: int, max_rows: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of `max_rows` of `total` rows drawn without replacement, or None to keep them all."""
    if max_rows is None:
        return None
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    if total <= max_rows:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=max_rows, replace=False))


def _padded_channels_last(x: np.ndarray, pads: Sequence[int]) -> np.ndarray:
    """x (N, C, *spatial) zero-padded once and laid out (N, *padded, C), so one patch tap is a contiguous C-vector."""
    dims = x.ndim - 2
    begins, ends = pads[:dims], pads[dims:]
    shape = [size + b + e for size, b, e in zip(x.shape[2:], begins, ends)]
    padded = np.zeros((x.shape[0], *shape, x.shape[1]), dtype=x.dtype)
    inner = tuple(slice(b, b + size) for b, size in zip(begins, x.shape[2:]))
    padded[(slice(None), *inner)] = np.moveaxis(x, 1, -1)
    return padded
