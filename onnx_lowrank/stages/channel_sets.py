"""Find the sets of channels that can be narrowed: producers -> per-channel ops -> readers.

A set of channels is written by producers (discovered Conv, Gemm or MatMul layers, with any BatchNormalization
folded into a Conv), carried by ops that act on each channel alone, and read by layers that take them as their input
channels (readers: a Conv with group 1 on NCHW channels, a Gemm or MatMul on the last axis). Dropping a channel then
removes a row of every producer, the channel's entry in every per-channel constant, and a column (a column per
kernel tap) of every reader, which absorbs the dropped channel's reconstruction from the kept ones (`elimination`).
Nothing else changes: every op between acts on each channel alone, so the kept channels are computed exactly as
before.

Ops that act on each channel alone: activations, BatchNormalization, a bias or a scale constant per channel (or any
constant whose channel axis is 1 or the channels, such as a position embedding), products and sums of two tensors of
the set (x * sigmoid(x), an exported GELU's x * (erf(x / sqrt 2) + 1)), pooling and resizing over the spatial axes
(MaxPool, AveragePool, GlobalAveragePool, Resize, ReduceMean over the spatial axes), and a depthwise Conv (one filter
per channel, as in MobileNet blocks), which is cut with the set, losing the filters of the dropped channels.

Channels are **coupled** when one op joins two tensors of the set: a residual Add joins the channels of the layer
before the block with those of the block's last layer, and a squeeze-excite gate x * hardsigmoid(conv(...)) joins
the channels of x with those of the layer that writes the gate. Such a set has several producers and is cut
together: every producer loses the same channels and every reader of every tensor of the set folds them. A set is
listed as not narrowable, with the op that stops it, when its channels also reach anything else: a Concat, a Split,
a Reshape or Transpose, a graph output or input, a reader with a shared weight or a runtime bias, a layer on another
axis, an op whose parameters are not per channel.

Which channels the others reproduce is judged where the readers read them (after every op between). A reader that
reads them after a global or average pooling (a squeeze-excite reader sees one row per sample) is fitted on the
tensor before the pooling: an average of a linear combination is the same combination of the averages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_lowrank.graph.constants import ConstantTable
from onnx_lowrank.graph.folded import FoldedConstants
from onnx_lowrank.graph.walk import node_attributes, readers_of
from onnx_lowrank.ops.base import FAMILIES, family_for, layer_ops
from onnx_lowrank.ops.layer import Chain, Cut, Layer, Skipped
from onnx_lowrank.stages.discover import Discovery

__all__ = ["Chains", "find_chains", "UNARY_OPS", "BINARY_OPS", "SPATIAL_OPS"]

UNARY_OPS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Gelu", "HardSwish", "HardSigmoid", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Mish", "Erf", "Clip", "Identity", "Neg", "Abs", "Exp", "Sqrt", "Reciprocal",
    "BatchNormalization", "Cast",
})
"""Ops that act on each channel alone (their other inputs, if any, must be constants of one value per channel)."""
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"})
"""Elementwise ops that act channel by channel when both operands are of the set or one is a constant whose channel
axis is 1 or the channels (x * sigmoid(x); a bias; a scale; a residual Add; a squeeze-excite gate)."""
SPATIAL_OPS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
                         "Resize", "Upsample", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum"})
"""Ops over the spatial axes of NCHW channels, each channel alone (Resize only with scales of 1 on N and C, the
reductions only over axes other than C, keeping them)."""
_AVERAGES = frozenset({"GlobalAveragePool", "AveragePool", "ReduceMean"})
"""Linear and the same on every channel: a reader after them is fitted on the tensor before them."""


@dataclass(frozen=True)
class Chains:
    chains: tuple[Chain, ...]
    skipped: tuple[Skipped, ...]  # producers whose channels cannot be cut, with the reason


def find_chains(model: onnx.ModelProto, discovery: Discovery) -> Chains:
    """Every set of channels that can be cut (each producer in exactly one), and why the other producers' cannot."""
    graph = model.graph
    made_by = {output: node for node in graph.node for output in node.output if output}
    context = _Graph(
        constants=FoldedConstants(ConstantTable(graph), made_by),
        readers=readers_of(graph),
        made_by=made_by,
        outputs={value.name for value in graph.output},
        reader_layers={view.node_output: layer for layer in discovery.layers for view in layer.views()},
        written_by={layer.output: layer for layer in discovery.layers},
        order={id(node): index for index, node in enumerate(graph.node)},
    )
    chains, skipped, settled = [], [], set()
    for layer in discovery.layers:
        if layer.name in settled:
            continue
        found, seen = _chain(layer, context)
        settled.update(p.name for p in seen)
        if isinstance(found, str):
            skipped += [Skipped(name=p.name, op=p.op, reason=found) for p in seen]
        else:
            chains.append(found)
    order = {layer.name: index for index, layer in enumerate(discovery.layers)}
    skipped.sort(key=lambda s: order[s.name])
    return Chains(chains=tuple(chains), skipped=tuple(skipped))


@dataclass(frozen=True)
class _Graph:
    constants: FoldedConstants  # initializers, Constant nodes, and shape ops on them (a Paddle bias's Reshape)
    readers: Mapping[str, list[onnx.NodeProto]]
    made_by: Mapping[str, onnx.NodeProto]
    outputs: set[str]
    reader_layers: Mapping[str, Layer]  # a node's first output -> the layer whose node (or a sharing node) it is
    written_by: Mapping[str, Layer]  # the tensor a layer writes (its BatchNormalization's output when folded)
    order: Mapping[int, int]


def _chain(start: Layer, graph: _Graph) -> tuple[Chain | str, list[Layer]]:
    """The set of channels `start` writes and the producers found, or why they cannot be cut."""
    family = family_for(start.op)
    axis, rank = family.channel_axis, family.output_rank(start)
    channels = start.out_channels
    producers: dict[str, Layer] = {start.name: start}
    region = [start.output]
    passes: dict[int, onnx.NodeProto] = {}
    found: dict[str, Layer] = {}
    cuts: list[Cut] = []

    via: dict[str, onnx.NodeProto] = {}  # the op through which a tensor joined the set, to name in a reason

    def join(tensor: str, node: onnx.NodeProto) -> None:
        if tensor not in region:
            region.append(tensor)
            via[tensor] = node

    def by(tensor: str) -> str:
        node = via.get(tensor)
        return "" if node is None else f" by {node.op_type} {node.name or node.output[0]!r}"

    index = 0
    while index < len(region):
        tensor = region[index]
        index += 1
        seen = list(producers.values())
        if tensor in graph.outputs:
            return f"its channels reach the graph output {tensor!r}", seen
        # how the tensor is made: by a producer, or by a per-channel op whose inputs are of the set too
        layer = graph.written_by.get(tensor)
        node = graph.made_by.get(tensor)
        if layer is not None:
            problem = _producer_problem(layer, channels, axis, by(tensor))
            if problem:
                return problem, seen
            producers.setdefault(layer.name, layer)
        elif node is None:
            if tensor not in graph.constants:
                return (f"its channels are joined{by(tensor)} with the graph input {tensor!r}, which cannot lose "
                        "channels (coupled channels are cut together or not at all)"), seen
        elif id(node) not in passes:
            problem = _pass_problem(node, set(region) | {tensor}, graph.constants, channels, axis, rank, joined=True)
            if problem:
                return problem.replace("joined with", f"joined{by(tensor)} with", 1), seen
            passes[id(node)] = node
            cuts += _cuts(node, graph.constants, channels, axis, rank)
            for name in _channel_inputs(node, graph.constants):
                join(name, node)
        # who reads it: readers, or per-channel ops whose output (and other operand) join the set
        for node in graph.readers.get(tensor, []):
            if id(node) not in graph.order:  # read from inside a subgraph
                return f"its channels are read inside the body of {node.op_type} {node.name or node.output[0]!r}", seen
            reader = graph.reader_layers.get(node.output[0]) if node.output else None
            if reader is not None and node.input[0] == tensor and list(node.input).count(tensor) == 1:
                problem = _reader_problem(reader, node, axis)
                if problem:
                    return problem, seen
                found[reader.name] = reader
                continue
            if id(node) in passes:
                continue
            problem = _pass_problem(node, set(region), graph.constants, channels, axis, rank)
            if problem:
                return problem, seen
            passes[id(node)] = node
            cuts += _cuts(node, graph.constants, channels, axis, rank)
            for name in (*_channel_inputs(node, graph.constants), node.output[0]):
                join(name, node)
    ordered = sorted(producers.values(), key=lambda layer: _position(layer, graph))
    if not found:
        return "its channels reach no layer that reads them as input channels", ordered
    readers = sorted(found.values(), key=lambda layer: _position(layer, graph))
    per_channel = sum((p.folded_params or p.bias_size) // max(channels, 1) for p in ordered)
    per_channel += sum(int(np.prod(graph.constants.shape(name), dtype=np.int64)) // channels
                       for name in dict.fromkeys(_input(graph, cut) for cut in cuts))
    return Chain(producers=tuple(ordered), channels=channels, axis=axis,
                 passes=tuple(n.output[0] for n in sorted(passes.values(), key=lambda n: graph.order[id(n)])),
                 readers=tuple(readers), fitted_on=tuple(_fitted_on(r, set(region), graph) for r in readers),
                 region=tuple(region), cuts=tuple(cuts), channel_params=per_channel), ordered


def _input(graph: _Graph, cut: Cut) -> str:
    return graph.made_by[cut.node].input[cut.index]


def _position(layer: Layer, graph: _Graph) -> int:
    node = graph.made_by.get(layer.node_output)
    return graph.order.get(id(node), 0) if node is not None else 0


def _fitted_on(reader: Layer, region: set[str], graph: _Graph) -> str:
    """The reader's input, or the tensor before the averages that lead to it (see the module docstring)."""
    tensor = reader.input_name
    node = graph.made_by.get(tensor)
    while node is not None and node.op_type in _AVERAGES and node.input[0] in region:
        tensor = node.input[0]
        node = graph.made_by.get(tensor)
    return tensor


def _channel_inputs(node: onnx.NodeProto, constants: FoldedConstants) -> list[str]:
    """The inputs of a per-channel op that carry the channels: the first of a unary, spatial or depthwise op (the
    others are its parameters), every computed operand of a binary one."""
    if node.op_type in BINARY_OPS:
        return [name for name in node.input if name and name not in constants]
    return [node.input[0]]


def _producer_problem(layer: Layer, channels: int, axis: int, how: str = "") -> str | None:
    """Why `layer` cannot lose the set's channels, or None. `how` names the op through which its output joined."""
    described = f"{layer.op} {layer.name!r}"
    if layer.shared:
        return ("its weight is shared by several nodes" if not how else
                f"its channels are joined{how} with those of {described}, whose weight is shared by several nodes")
    if family_for(layer.op).channel_axis != axis:
        return f"its channels are joined{how} with those of {described}, on another axis"
    if layer.out_channels != channels:  # a broadcast: one channel added to all (or a shape the rank hides)
        return f"its channels are joined{how} with the {layer.out_channels} channels of {described}"
    return None


def _reader_problem(reader: Layer, node: onnx.NodeProto, axis: int) -> str | None:
    described = f"{reader.op} {reader.name!r}"
    if reader.shared:
        return f"its channels are read by {described}, whose weight is shared by several nodes"
    family = family_for(reader.op)
    if family.channel_axis != axis:
        return f"its channels are read by {described} on another axis"
    bias = node.input[2] if len(node.input) > 2 else ""
    if bias and reader.bias is None and not reader.batchnorm_output:
        return f"its channels are read by {described}, whose bias is computed at run time"
    return family.reader_problem(reader, node, described)


def _pass_problem(node: onnx.NodeProto, region: set[str], constants: FoldedConstants, channels: int, axis: int,
                  rank: int, joined: bool = False) -> str | None:
    """Why `node` does not act on the set's channels one by one, or None when it does. The node reads a tensor of
    the set (`region`); `joined`: its output is of the set (reached backwards, from an op joining two tensors), so
    the inputs that carry its channels join the set too."""
    described = f"{node.op_type} {node.name or node.output[0]!r}"
    if joined:
        coupled = (f"its channels are joined with the output of {described}, which does not act on each channel alone "
                   "(coupled channels are cut together or not at all)")
    else:
        coupled = f"its channels reach {described}, which does not act on each channel alone"
    if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return coupled
    if not joined and not any(name in region for name in _channel_inputs(node, constants)):
        return coupled  # read as a parameter (a Clip bound, a Resize scale, a Conv weight)
    parameters = f"its channels reach {described}, whose parameters are not constant per channel"
    if node.op_type in UNARY_OPS:
        others = [name for name in node.input[1:] if name]
        if node.op_type == "BatchNormalization":
            per_channel = axis == 1 and all(name in constants and constants.shape(name) == (channels,)
                                            for name in others[:4])
            return None if per_channel and len(others) == 4 else parameters
        if not all(_separable(name, constants, channels, axis, rank) is not None for name in others):
            return parameters
        return None
    family = FAMILIES.get(node.op_type)
    if family is not None and family.channelwise(node, constants, channels, axis):
        return None
    if node.op_type in layer_ops():  # a layer discovery skipped (or --exclude kept dense) cannot lose channels
        role = "joined with those of" if joined else "read by"
        return (f"its channels are {role} {described}, which is not a layer this tool rewrites (see the skipped "
                "layers)")
    if node.op_type in SPATIAL_OPS:
        return None if axis == 1 and _spatial(node, constants, rank) else coupled
    if node.op_type in BINARY_OPS and len(node.input) == 2:
        for name in node.input:
            if name in constants and _separable(name, constants, channels, axis, rank) is None:
                return f"its channels reach {described}, whose other operand is not constant per channel"
        return None
    return coupled


def _cuts(node: onnx.NodeProto, constants: FoldedConstants, channels: int, axis: int, rank: int) -> list[Cut]:
    """The constant inputs of a per-channel op that hold entries per channel, and the axis each is cut along."""
    # BN parameters; the filters and bias of a layer op between, which its family finds `channelwise` (depthwise)
    if node.op_type == "BatchNormalization" or node.op_type in FAMILIES:
        return [Cut(node.output[0], index, 0) for index, name in enumerate(node.input)
                if index > 0 and name and name in constants]
    if node.op_type in SPATIAL_OPS:
        return []
    cuts = []
    for index, name in enumerate(node.input):
        if name in constants:
            position = _separable(name, constants, channels, axis, rank)
            if position is not None and position >= 0:
                cuts.append(Cut(node.output[0], index, position))
    return cuts


def _spatial(node: onnx.NodeProto, constants: FoldedConstants, rank: int) -> bool:
    """A pooling, resizing or reduction over the spatial axes only, each channel alone."""
    attributes = node_attributes(node)
    if node.op_type in ("Resize", "Upsample"):
        names = list(node.input)
        scales = names[2] if node.op_type == "Resize" and len(names) > 2 else names[1] if len(names) > 1 else ""
        sizes = names[3] if node.op_type == "Resize" and len(names) > 3 else ""
        if sizes or not scales or scales not in constants:
            return False  # sizes name the channel count, which the cut would change
        values = constants.array(scales).reshape(-1)
        return len(values) == rank and bool(values[0] == 1 and values[1] == 1)
    if node.op_type.startswith("Reduce"):
        axes = attributes.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            if node.input[1] not in constants:
                return False
            axes = constants.array(node.input[1]).reshape(-1).tolist()
        if not axes or attributes.get("keepdims", 1) != 1:
            return False  # no axes: every axis, the channels too
        return 1 not in {int(a) % rank for a in axes}
    return True


def _separable(name: str, constants: FoldedConstants, channels: int, axis: int, rank: int) -> int | None:
    """For a constant operand of an elementwise op on the set's rank-`rank` tensors: the axis of the constant that
    lines up with the channels (ONNX broadcasts right-aligned) when it holds `channels` entries along it (cut along
    it), -1 when it broadcasts over the channels (one value for all), None when it cannot act on each channel alone
    (more dimensions than the tensors, or another count on the channel axis)."""
    if name not in constants:
        return None
    shape = constants.shape(name)
    if len(shape) > rank:
        return None
    position = (1 if axis == 1 else rank - 1) - (rank - len(shape))
    if position < 0 or shape[position] == 1:
        return -1
    return position if shape[position] == channels else None
