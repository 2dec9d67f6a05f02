"""One streaming pass of the original model over calibration samples: the input statistics of every layer.

The model runs in onnxruntime with every layer's input tensor added as an extra graph output. For each sample, each
layer's input is turned into rows (`patches`: a Conv's im2col patches with its own strides, pads, dilations and
auto_pad; a Gemm/MatMul's input vectors), at most `max_rows` positions of a big feature map drawn at random with a
fixed seed, and added into that layer's running sums (`statistics`). Samples are read one at a time and dropped
after use, so peak memory is one sample's activations plus d x d sums per layer, whatever the number of samples.
Layers that read the same tensor with the same geometry (detection heads) share one set of sums. A weight shared by
several nodes gets the sums of all their inputs pooled: its factors serve every one of them.

With `part_of`, the rows are summed in parts: unit u (a row of a batch when `by_row`, else a feed) goes to part
`part_of(u)`, and the statistics of the whole are the parts added up (`statistics.PooledStatistics`). That is how
the `auto` judge gets the statistics of its fit rows from the same pass (`judge.calibration_split`). A batch whose
rows go to several parts runs as one sub-batch per part (an activation's first axis need not be the batch, so the
activations are not cut afterwards).
"""

from __future__ import annotations

import zlib
from functools import partial
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_lowrank.graph import runtime
from onnx_lowrank.ops.layer import Layer
from onnx_lowrank.errors import InputDataError
from onnx_lowrank.math.patches import ConvGeometry, input_rows
from onnx_lowrank.graph.inputs import feed_rows
from onnx_lowrank.stages.parallel import map_all, single_threaded_blas
from onnx_lowrank.math.statistics import InputStatistics, PooledStatistics, StatisticsAccumulator, pooled

__all__ = ["DEFAULT_MAX_ROWS", "Calibration", "calibrate", "collect_statistics", "sample_seed"]

DEFAULT_MAX_ROWS = 2048
"""Positions per sample and layer: enough rows for stable statistics, few enough that a 320x320 detector's early
layers (25,600 positions) cost no more than its deep ones."""


@dataclass(frozen=True)
class Calibration:
    """What one calibration pass collected: every layer's input statistics, and the channel statistics of the
    tensors asked for (their channel vectors at every position: what narrowing fits its regressions on)."""

    layers: Mapping[str, InputStatistics]  # by layer name (with parts: pooled from them when read)
    tensors: Mapping[str, InputStatistics] = field(default_factory=dict)  # by tensor name
    parts: tuple[Mapping[str, InputStatistics], ...] = ()  # by layer name, per part (`part_of`); () without parts
    tensor_parts: tuple[Mapping[str, InputStatistics], ...] = ()  # by tensor name, per part; () without parts


def collect_statistics(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, InputStatistics]:
    """Input statistics of every layer (by layer name) over `feeds`, streamed one sample at a time."""
    return dict(calibrate(model, layers, feeds, max_rows=max_rows, threads=threads, progress=progress).layers)


def calibrate(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    feeds: Iterable[Mapping[str, np.ndarray]],
    *,
    tensors: Mapping[str, ConvGeometry | None] | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
    part_of: Callable[[int], int] | None = None,
    by_row: bool = False,
) -> Calibration:
    """Input statistics of every layer and channel statistics of every tensor of `tensors` (name -> the window of
    its channel rows: 1 x 1 on NCHW, None for the last axis), in one streaming pass over `feeds`; with `part_of`,
    the layers' statistics also by part (module docstring)."""
    tensors = dict(tensors or {})
    if not layers and not tensors:
        return Calibration(layers={})
    graph_inputs = {value.name for value in model.graph.input}
    views = [view for layer in layers for view in layer.views()]  # a shared weight: every node that reads it
    keys = {view.name: (view.input_name, view.geometry) for view in views}
    wanted = [*(view.input_name for view in views), *tensors]
    captured = [name for name in dict.fromkeys(wanted) if name not in graph_inputs]
    sess = runtime.session(runtime.with_outputs(model, captured), threads)
    unique = _unique(views, keys)
    requests = {(name, geometry): None for name, geometry in tensors.items()}
    requests.update({key: layer.columns for key, layer in unique.items()})  # a layer's input may be a tensor too
    accumulators: dict[tuple, StatisticsAccumulator] = {}  # (part, request key) -> sums

    def add(part: int, index: int, values: Mapping[str, np.ndarray], key: tuple) -> None:
        """One request's rows of one piece of sample `index` into part `part`'s sums (one thread per key)."""
        name, geometry = key
        rows = input_rows(values[name], geometry, max_rows, sample_seed(name, index))
        columns = requests[key]
        if columns is not None and rows.shape[1] != columns:
            layer = unique[key]
            raise InputDataError(
                f"Layer {layer.name!r} reads {name!r} with {rows.shape[1]} values per position on these "
                f"samples, but its weight expects {layer.columns}; give samples the model accepts"
            )
        accumulator = accumulators.get((part, key))
        if accumulator is None:  # no other thread adds this key
            accumulator = accumulators[(part, key)] = StatisticsAccumulator(rows.shape[1])
        accumulator.add(rows)

    samples = units = 0
    for index, feed in enumerate(feeds):
        for part, piece, count in _pieces(feed, part_of, by_row, units):
            values = {**runtime.run(sess, piece), **{name: piece[name] for name in graph_inputs if name in piece}}
            with single_threaded_blas():
                map_all(partial(add, part, index, values), requests)
            del values
            units += count
        samples += 1
        if progress is not None:
            progress(index + 1)
    if samples == 0:
        raise InputDataError("No calibration samples: give at least one .npz sample with --calibration")
    with single_threaded_blas():
        results = dict(zip(accumulators, map_all(StatisticsAccumulator.result, accumulators.values())))
    count = 1 + max((part for part, _ in results), default=0)
    missing = [part for part in range(count) if any((part, key) not in results for key in requests)]
    if missing:  # a part no unit went to: the caller's split does not fit these samples
        raise ValueError(f"calibration parts {missing} received no rows")
    parts = tuple({layer.name: pooled([results[(part, keys[view.name])] for view in layer.views()])
                   for layer in layers} for part in range(count))
    return Calibration(
        layers=parts[0] if count == 1 else PooledStatistics(parts),
        tensors={name: pooled([results[(part, (name, geometry))] for part in range(count)])
                 for name, geometry in tensors.items()},
        parts=parts if part_of is not None else (),
        tensor_parts=tuple({name: results[(part, (name, geometry))] for name, geometry in tensors.items()}
                           for part in range(count)) if part_of is not None else (),
    )


def _pieces(feed: Mapping[str, np.ndarray], part_of: Callable[[int], int] | None, by_row: bool, first: int
            ) -> list[tuple[int, Mapping[str, np.ndarray], int]]:
    """(part, the feed's rows that go to it, how many units they are): the whole feed in part 0 without `part_of`;
    with it, the feed (one unit, unless `by_row` and it holds a batch) in the part of its unit, or a batch cut into
    one sub-batch per part its rows go to (an activation's first axis need not be the batch: the model runs each)."""
    if part_of is None:
        return [(0, feed, 1)]
    rows = feed_rows(feed) if by_row else 1
    if rows == 1:
        return [(part_of(first), feed, 1)]
    by_part: dict[int, list[int]] = {}
    for row in range(rows):
        by_part.setdefault(part_of(first + row), []).append(row)
    return [(part, feed if len(kept) == rows else {name: array[kept] for name, array in feed.items()}, len(kept))
            for part, kept in sorted(by_part.items())]


def sample_seed(tensor: str, index: int) -> int:
    """The seed that picks which positions of `tensor` are kept for sample `index`: different per sample and tensor,
    the same on every run and whatever other layers are collected alongside (crc32, unlike hash(), is stable)."""
    return zlib.crc32(f"{tensor}#{index}".encode())


def _unique(layers: Sequence[Layer], keys: Mapping[str, tuple]) -> dict[tuple, Layer]:
    """One layer per distinct (input tensor, geometry): they see the same rows."""
    unique: dict[tuple, Layer] = {}
    for layer in layers:
        unique.setdefault(keys[layer.name], layer)
    return unique
