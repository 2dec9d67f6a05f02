"""Find the layers whose output channels can be narrowed: producer -> per-channel ops -> readers.

A producer (a discovered Conv, Gemm or MatMul layer, with any BatchNormalization folded into a Conv) can lose
output channels when every path from its output reaches only per-channel elementwise ops (an activation, a bias or
scale that is constant per channel or a scalar, a BatchNormalization, x * sigmoid(x) and other products of two
tensors of the region) and ends in readers that take the channels as their input channels: a Conv (group 1) on
NCHW channels, a Gemm or MatMul on the last axis, each a discovered layer of its own. A channel cut then removes
a row of the producer, the channel's entry in every per-channel constant, and a column (a column per kernel tap) of
every reader, which absorbs the dropped channels' reconstruction (`elimination`).

A depthwise Conv between (one filter per channel, as in MobileNet blocks: 1x1 Conv -> BN -> act -> depthwise Conv ->
BN -> act -> 1x1 Conv) mixes no channels either: it is cut with the chain, losing the filters of the dropped
channels, and which channels the others reproduce is judged where the readers read them, after it.

Channels that also reach anything else are coupled to other tensors (a residual Add, a Concat, a Split, a
Reshape/Flatten, a graph output): such a producer is listed as skipped with the op that couples it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from .discover import ConstantTable, Discovery, Layer, Skipped, node_attributes, readers_of

__all__ = ["Chain", "Chains", "find_chains", "UNARY_OPS", "BINARY_OPS"]

UNARY_OPS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Gelu", "HardSwish", "HardSigmoid", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Mish", "Erf", "Clip", "Identity", "Neg", "Abs", "Exp", "Sqrt", "Reciprocal",
    "BatchNormalization", "Cast",
})
"""Ops that act on each channel alone (their other inputs, if any, must be constants of one value per channel)."""
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
"""Elementwise ops that act channel by channel when both operands are of the region or one is a per-channel
constant (x * sigmoid(x); a bias; a scale)."""


@dataclass(frozen=True, eq=False)
class Chain:
    """A producer whose `channels` output channels reach `readers` only through the per-channel ops `passes`."""

    producer: Layer
    channels: int
    axis: int  # the channel axis of the region: 1 (NCHW) after a Conv, -1 after a Gemm or MatMul
    passes: tuple[str, ...]  # first outputs of the elementwise nodes between, in graph order
    readers: tuple[Layer, ...]  # in graph order
    region: tuple[str, ...]  # every tensor whose channels are the producer's: its output and the passes' outputs
    channel_params: int = 0  # parameters per channel besides the weights: the producer's bias, BN, pass constants

    @property
    def name(self) -> str:
        return self.producer.name


@dataclass(frozen=True)
class Chains:
    chains: tuple[Chain, ...]
    skipped: tuple[Skipped, ...]  # producers whose channels cannot be cut, with the reason


def find_chains(model: onnx.ModelProto, discovery: Discovery) -> Chains:
    """Every discovered layer whose output channels can be cut, and why the others cannot."""
    graph = model.graph
    constants = ConstantTable(graph)
    readers = readers_of(graph)
    outputs = {value.name for value in graph.output}
    layers_by_output = {view.node_output: layer for layer in discovery.layers for view in layer.views()}
    order = {id(node): index for index, node in enumerate(graph.node)}
    chains, skipped = [], []
    for layer in discovery.layers:
        found = _chain(layer, readers, constants, outputs, layers_by_output, order)
        if isinstance(found, str):
            skipped.append(Skipped(name=layer.name, op=layer.op, reason=found))
        else:
            chains.append(found)
    return Chains(chains=tuple(chains), skipped=tuple(skipped))


def _chain(producer: Layer, readers: Mapping[str, list[onnx.NodeProto]], constants: ConstantTable, outputs,
           layers_by_output: Mapping[str, Layer], order: Mapping[int, int]) -> Chain | str:
    """The producer's chain, or why its channels cannot be cut."""
    if producer.shared:
        return "its weight is shared by several nodes"
    axis = 1 if producer.op == "Conv" else -1
    rank = 2 + len(producer.kernel_shape) if producer.op == "Conv" else (producer.activation_rank or 2)
    channels = producer.out_channels
    region = [producer.output]
    passes: list[onnx.NodeProto] = []
    found: dict[str, Layer] = {}
    waiting: list[onnx.NodeProto] = []  # two-input ops whose other operand may still join the region (GELU's x * ...)
    index = 0
    while index < len(region) or waiting:
        if index == len(region):  # nothing left to visit: the waiting ops are decided on the region as it is
            node = waiting.pop(0)
            problem = _elementwise_problem(node, set(region), constants, channels, axis, rank)
            if problem:
                return problem
            passes.append(node)
            region.extend(o for o in node.output[:1] if o not in region)
            continue
        tensor = region[index]
        index += 1
        if tensor in outputs:
            return f"its channels reach the graph output {tensor!r}"
        for node in readers.get(tensor, []):
            if id(node) not in order:  # read from inside a subgraph
                return f"its channels are read inside the body of {node.op_type} {node.name or node.output[0]!r}"
            reader = layers_by_output.get(node.output[0]) if node.output else None
            if reader is not None and node.input[0] == tensor and list(node.input).count(tensor) == 1:
                problem = _reader_problem(reader, node, axis)
                if problem:
                    return problem
                found[reader.name] = reader
                continue
            if any(p is node for p in passes + waiting):
                continue
            if _operand_may_join(node, set(region), constants):
                waiting.append(node)
                continue
            problem = _elementwise_problem(node, set(region), constants, channels, axis, rank)
            if problem:
                return problem
            passes.append(node)
            region.extend(o for o in node.output[:1] if o not in region)
        still = [n for n in waiting if not all(name in region for name in n.input)]
        for node in waiting:
            if all(name in region for name in node.input):  # both operands are of the region now
                passes.append(node)
                region.extend(o for o in node.output[:1] if o not in region)
        waiting = still
    if not found:
        return "its channels reach no layer that reads them as input channels"
    ordered_readers = sorted(found.values(), key=lambda layer: _position(layer, order, readers))
    per_channel = (producer.folded_params or producer.bias_size) // max(channels, 1)
    per_channel += sum(int(np.prod(constants.shape(name), dtype=np.int64)) // channels
                       for node in passes for name in node.input if name not in region and name in constants
                       and _channel_constant(node, name, constants, channels))
    return Chain(producer=producer, channels=channels, axis=axis,
                 passes=tuple(n.output[0] for n in sorted(passes, key=lambda n: order[id(n)])),
                 readers=tuple(ordered_readers), region=tuple(region), channel_params=per_channel)


def _channel_constant(node: onnx.NodeProto, name: str, constants: ConstantTable, channels: int) -> bool:
    """Whether constant input `name` of a pass holds entries per channel (cut with the channels): one per channel,
    or a depthwise Conv's filters."""
    size = int(np.prod(constants.shape(name), dtype=np.int64))
    return size == channels > 1 or (node.op_type == "Conv" and size % channels == 0 and channels > 1)


def _position(layer: Layer, order, readers) -> int:
    for node in readers.get(layer.input_name, []):
        if node.output and node.output[0] == layer.node_output:
            return order[id(node)]
    return 0


def _operand_may_join(node: onnx.NodeProto, region: set[str], constants: ConstantTable) -> bool:
    """A two-input elementwise op with one operand of the region and one computed elsewhere, not yet visited: that
    operand may be the region too, reached by another path (x * erf(x / sqrt 2) in an exported GELU)."""
    return (node.op_type in BINARY_OPS and len(node.input) == 2 and node.domain in ("", "ai.onnx")
            and any(name not in region and name not in constants for name in node.input))


def _reader_problem(reader: Layer, node: onnx.NodeProto, axis: int) -> str | None:
    described = f"{reader.op} {reader.name!r}"
    if reader.shared:
        return f"its channels are read by {described}, whose weight is shared by several nodes"
    if (reader.op == "Conv") != (axis == 1):
        return f"its channels are read by {described} on another axis"
    bias = node.input[2] if len(node.input) > 2 else ""
    if bias and reader.bias is None and not reader.batchnorm_output:
        return f"its channels are read by {described}, whose bias is computed at run time"
    if reader.op == "Gemm":
        attributes = node_attributes(node)
        if attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
            return f"its channels are read by {described} with alpha or beta other than 1"
    return None


def _elementwise_problem(node: onnx.NodeProto, region: set[str], constants: ConstantTable, channels: int,
                         axis: int, rank: int) -> str | None:
    """Why `node` does not act on the region channel by channel, or None when it does."""
    described = f"{node.op_type} {node.name or node.output[0]!r}"
    coupled = (f"its channels reach {described}, which does not act on each channel alone (coupled channels are "
               "not cut)")
    if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return coupled
    if node.op_type in UNARY_OPS:
        if node.input[0] not in region or any(name in region for name in node.input[1:]):
            return coupled
        others = [name for name in node.input[1:] if name]
        if not all(_per_channel(name, constants, channels, axis, rank) for name in others):
            return f"its channels reach {described}, whose parameters are not constant per channel"
        if node.op_type == "BatchNormalization" and axis != 1:
            return coupled
        return None
    if node.op_type == "Conv":
        return None if _depthwise(node, region, constants, channels, axis) else coupled
    if node.op_type in BINARY_OPS and len(node.input) == 2:
        inside = [name in region for name in node.input]
        if all(inside):
            return None
        other = node.input[inside.index(False)]
        if _per_channel(other, constants, channels, axis, rank):
            return None
        return coupled
    return coupled


def _depthwise(node: onnx.NodeProto, region: set[str], constants: ConstantTable, channels: int, axis: int) -> bool:
    """A depthwise Conv (one filter per channel, group = channels) on the region's NCHW channels: it mixes no channels,
    so it is cut with the chain (its filters of the dropped channels go, its group shrinks). Which channels the others
    reproduce is judged where the readers read them, after it."""
    if axis != 1 or node.input[0] not in region or any(name in region for name in node.input[1:]):
        return False
    weight, bias = node.input[1], node.input[2] if len(node.input) > 2 else ""
    if weight not in constants or (bias and (bias not in constants or constants.shape(bias) != (channels,))):
        return False
    shape = constants.shape(weight)
    return node_attributes(node).get("group", 1) == channels and len(shape) >= 3 and shape[:2] == (channels, 1)


def _per_channel(name: str, constants: ConstantTable, channels: int, axis: int, rank: int) -> bool:
    """A constant that holds one value, or one value per channel that broadcasts onto the channel axis of a
    rank-`rank` activation (right-aligned, as ONNX broadcasts: (C, 1, 1) or (1, C, 1, 1) on NCHW, (C,) last)."""
    if name not in constants:
        return False
    shape = constants.shape(name)
    size = int(np.prod(shape, dtype=np.int64))
    if size == 1:
        return True
    if size != channels or len(shape) > rank:
        return False
    position = shape.index(channels)  # the only dimension that is not 1
    return position == len(shape) - 1 if axis == -1 else rank - len(shape) + position == 1
