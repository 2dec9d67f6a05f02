"""One streaming pass of the original model over calibration samples: the input statistics of every layer.

The model runs in onnxruntime with every layer's input tensor added as an extra graph output. For each sample, each
layer's input is turned into rows (`patches`: a Conv's im2col patches with its own strides, pads, dilations and
auto_pad; a Gemm/MatMul's input vectors), at most `max_rows` positions of a big feature map drawn at random with a
fixed seed, and added into that layer's running sums (`statistics`). Samples are read one at a time and dropped
after use, so peak memory is one sample's activations plus d x d sums per layer, whatever the number of samples.
Layers that read the same tensor with the same geometry (detection heads) share one set of sums. A weight shared by
several nodes gets the sums of all their inputs pooled: its factors serve every one of them.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnx_lowrank.graph import runtime
from onnx_lowrank.ops.layer import Layer
from onnx_lowrank.errors import InputDataError
from onnx_lowrank.math.patches import ConvGeometry, input_rows
from onnx_lowrank.math.statistics import InputStatistics, StatisticsAccumulator, pooled

__all__ = ["DEFAULT_MAX_ROWS", "Calibration", "calibrate", "collect_statistics", "sample_seed"]

DEFAULT_MAX_ROWS = 2048
"""Positions per sample and layer: enough rows for stable statistics, few enough that a 320x320 detector's early
layers (25,600 positions) cost no more than its deep ones."""


@dataclass(frozen=True)
class Calibration:
    """What one calibration pass collected: every layer's input statistics, and the channel statistics of the
    tensors asked for (their channel vectors at every position: what narrowing fits its regressions on)."""

    layers: Mapping[str, InputStatistics]  # by layer name
    tensors: Mapping[str, InputStatistics] = field(default_factory=dict)  # by tensor name


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
) -> Calibration:
    """Input statistics of every layer and channel statistics of every tensor of `tensors` (name -> the window of
    its channel rows: 1 x 1 on NCHW, None for the last axis), in one streaming pass over `feeds`."""
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
    requests = {**{key: layer.columns for key, layer in unique.items()},
                **{(name, geometry): None for name, geometry in tensors.items()}}
    accumulators: dict[tuple, StatisticsAccumulator] = {}
    samples = 0
    for index, feed in enumerate(feeds):
        outputs = runtime.run(sess, feed)
        for key, columns in requests.items():
            name, geometry = key
            value = feed[name] if name in graph_inputs else outputs[name]
            seed = sample_seed(name, index)
            rows = input_rows(value, geometry, max_rows, seed)
            if columns is not None and rows.shape[1] != columns:
                layer = unique[key]
                raise InputDataError(
                    f"Layer {layer.name!r} reads {name!r} with {rows.shape[1]} values per position on these samples, "
                    f"but its weight expects {layer.columns}; give samples the model accepts"
                )
            if key not in accumulators:
                accumulators[key] = StatisticsAccumulator(rows.shape[1])
            accumulators[key].add(rows)
        del outputs
        samples += 1
        if progress is not None:
            progress(index + 1)
    if samples == 0:
        raise InputDataError("No calibration samples: give at least one .npz sample with --calibration")
    results = {key: accumulator.result() for key, accumulator in accumulators.items()}
    return Calibration(
        layers={layer.name: pooled([results[keys[view.name]] for view in layer.views()]) for layer in layers},
        tensors={name: results[(name, geometry)] for name, geometry in tensors.items()},
    )


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
