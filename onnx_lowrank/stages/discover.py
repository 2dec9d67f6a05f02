"""Find the layers we can factorize: nodes of a registered op family (`ops`: Conv with group 1, Gemm, MatMul) whose
weight is a constant.

A weight counts as constant when it is an initializer or the output of a `Constant` node (PaddlePaddle exports store
every weight that way). A Conv whose only consumer is an inference-mode BatchNormalization is seen with the BN
folded in, so its error is measured on what the pair really computes. A weight read by several nodes of one op in the
same way (an unrolled recurrent net's Gemm at every step) is one layer, whose nodes all get the same factors.
Everything else is listed as skipped, with the reason, and left untouched. What a layer of each op is, and what
keeps it from being one, is its family's (`OpFamily.layer`); the checks on the weight here are common to all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx

from onnx_lowrank.graph.constants import ConstantTable
from onnx_lowrank.graph.walk import nested_nodes, node_attributes, readers_of
from onnx_lowrank.ops.base import FAMILIES, NOT_REWRITTEN, LayerContext, OpFamily, Skip, layer_ops
from onnx_lowrank.ops.layer import Layer, Skipped

__all__ = ["Discovery", "discover"]


@dataclass(frozen=True)
class Discovery:
    layers: tuple[Layer, ...]
    skipped: tuple[Skipped, ...]


_SUPPORTED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
"""Weight dtypes we rewrite: factorized in float64, the factors written back in the weight's own dtype."""

def discover(
    model: onnx.ModelProto,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    exclude: str | None = None,
) -> Discovery:
    """List the factorizable layers of `model` and the nodes of the op families that are skipped, with reasons.

    `shapes` (concrete tensor shapes, optional) gives each layer's output positions, which FLOP counts need, and
    the rank of MatMul activations; without it ranks come from ONNX shape inference and FLOPs stay unknown.
    `exclude` is a regular expression: layers whose name it matches (re.search) are skipped.
    """
    graph = model.graph
    pattern = re.compile(exclude) if exclude else None
    constants = ConstantTable(graph)
    consumers = readers_of(graph)
    producers = {out: node for node in graph.node for out in node.output if out}
    boundary = {v.name for v in graph.input} | {v.name for v in graph.output}
    ranks = _activation_ranks(model) if shapes is None else {k: len(v) for k, v in shapes.items()}
    names = _unique_layer_names(graph)
    context = LayerContext(constants=constants, consumers=consumers, boundary=boundary, shapes=shapes, ranks=ranks)

    layers: list[Layer] = []
    skipped: list[Skipped] = []
    shared_reasons: dict[str, str | None] = {}  # shared weight -> why its first reader was skipped (None: a layer)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in NOT_REWRITTEN:
            skipped.append(Skipped(name=names[id(node)], op=node.op_type, reason=NOT_REWRITTEN[node.op_type]))
            continue
        family = FAMILIES.get(node.op_type)
        if family is None:
            continue
        name = names[id(node)]
        weight_index = 1
        reason = _weight_problem(node, weight_index, context, producers)
        readers = consumers.get(node.input[weight_index], []) if reason is None else []
        if len(readers) > 1 and readers[0] is not node:  # a later reader of a shared weight: its first reader decided
            if shared_reasons[node.input[weight_index]] is not None:
                skipped.append(Skipped(name=name, op=node.op_type, reason=shared_reasons[node.input[weight_index]]))
            continue
        if reason is None and pattern is not None:
            excluded = [names[id(n)] for n in readers or [node] if pattern.search(names[id(n)])]
            if excluded and len(readers) > 1:
                reason = f"excluded by the pattern {exclude!r} (it matches {excluded[0]!r}, which shares the weight)"
            elif excluded:
                reason = f"excluded by the pattern {exclude!r}"
        if reason is None:
            try:
                layer = family.layer(node, name, context)
                if len(readers) > 1:
                    layer = _shared_layer(family, layer, readers, names, context)
            except Skip as skip:
                reason = str(skip)
            if reason is None and not (np.isfinite(layer.read_matrix()).all() and (layer.bias is None
                                                                                  or np.isfinite(layer.bias).all())):
                reason = "weight or bias has NaN or infinite values (a damaged file?); it cannot be factorized"
        if len(readers) > 1:
            shared_reasons[node.input[weight_index]] = reason
        if reason is not None:
            skipped.append(Skipped(name=name, op=node.op_type, reason=reason))
        else:
            layers.append(layer)
    skipped.extend(_subgraph_layers(graph))
    return Discovery(layers=tuple(layers), skipped=tuple(skipped))


def _subgraph_layers(graph: onnx.GraphProto) -> list[Skipped]:
    """Layers with a weight (`ops.base.layer_ops`: the families' and NOT_REWRITTEN) inside If/Loop/Scan bodies, which
    are not rewritten: listed so that a model whose layers all live there is not reported as having none."""
    found = []
    ops = layer_ops()
    for inner, holder in nested_nodes(graph):
        if inner.op_type in ops and inner.domain in ("", "ai.onnx"):
            article = "an" if holder.op_type[0] in "AEIOU" else "a"
            reason = f"in {article} {holder.op_type} body: subgraphs are not rewritten"
            found.append(Skipped(name=inner.name or inner.output[0], op=inner.op_type, reason=reason))
    return found


def _unique_layer_names(graph: onnx.GraphProto) -> dict[int, str]:
    """Node name when it is set and unique, else the node's first output; '#<node index>' settles what still clashes
    (a node named like another node's output)."""
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.name] = counts.get(node.name, 0) + 1
    names = {id(n): n.name if n.name and counts[n.name] == 1 else n.output[0] for n in graph.node if n.output}
    taken: dict[str, int] = {}
    for name in names.values():
        taken[name] = taken.get(name, 0) + 1
    for index, node in enumerate(graph.node):
        if id(node) in names and taken[names[id(node)]] > 1:
            names[id(node)] = f"{names[id(node)]}#{index}"
    return names


def _weight_problem(node, index, context: LayerContext, producers) -> str | None:
    """Why the node's weight input cannot be rewritten, or None when it can."""
    constants, consumers, boundary = context.constants, context.consumers, context.boundary
    if len(node.input) <= index or not node.input[index]:
        return "has no weight input"
    weight = node.input[index]
    if weight not in constants:
        producer = producers.get(weight)
        if producer is not None and producer.op_type == "DequantizeLinear":
            return "weight is quantized (produced by DequantizeLinear)"
        if producer is not None:
            return f"weight is not a constant (produced by {producer.op_type})"
        return "weight is not a constant (it is a graph input)"
    if weight in boundary:
        return "weight is also a graph input or output, so it can change at run time"
    if list(node.input).count(weight) > 1:
        return "weight is read twice by the same node"
    if len(consumers.get(weight, [])) > 1:
        reason = _sharing_problem(weight, consumers[weight], context)
        if reason is not None:
            return reason
    dtype = constants.dtype(weight)
    if dtype.name == "bfloat16":
        return "bfloat16 weights: onnxruntime's CPU provider cannot run them, so the result could not be verified"
    if dtype not in _SUPPORTED_DTYPES:
        return f"unsupported weight dtype {dtype.name} (float16, float32 and float64 are supported)"
    return None


def _sharing_problem(weight, readers, context: LayerContext) -> str | None:
    """Why the nodes reading a shared weight cannot all be rewritten to one set of factors, or None when they can:
    they must be nodes of one op family, reading it as their weight only, with the same bias and the same
    attributes that shape the product (`OpFamily.shared_attributes`), and pass the family's own check."""
    first = readers[0]
    described = ", ".join(f"{n.op_type} {n.name or n.output[0]!r}" for n in readers[:3])
    if any(n.op_type != first.op_type or n.domain not in ("", "ai.onnx") for n in readers):
        return f"weight is shared by nodes of different ops ({described}, ...); only nodes of one op can share factors"
    if any(list(n.input).count(weight) != 1 or n.input[1] != weight for n in readers):
        return f"shared weight is read as another input than the weight by one of its readers ({described}, ...)"
    if any(list(n.input[2:3]) != list(first.input[2:3]) for n in readers):
        return "shared weight is read with different biases, which one set of factors and bias correction cannot serve"
    family = FAMILIES[first.op_type]
    kept = family.shared_attributes
    if any(_attribute_key(n, kept) != _attribute_key(first, kept) for n in readers):
        return f"shared weight is read with different attributes by its {first.op_type} nodes ({described}, ...)"
    return family.sharing_problem(readers, context)


def _attribute_key(node: onnx.NodeProto, names: tuple[str, ...] | None) -> dict:
    """The node's attributes that must agree between the readers of a shared weight (all of them when None)."""
    return {k: v for k, v in node_attributes(node).items() if names is None or k in names}


def _shared_layer(family: OpFamily, layer: Layer, readers, names, context: LayerContext) -> Layer:
    """`layer` (built from the first reader) extended to every reader of its weight: one matrix and one set of
    factors, FLOPs counted for every node (each runs), and the bias, read by these nodes alone, replaced once."""
    constants, consumers = context.constants, context.consumers
    others = [family.consumer(node, names[id(node)], layer, context) for node in readers[1:]]
    positions = [layer.output_positions] + [c.output_positions for c in others]
    bias_size = layer.bias_size
    bias = readers[0].input[2] if len(readers[0].input) > 2 else ""
    only_ours = {id(n) for n in consumers.get(bias, [])} == {id(n) for n in readers}
    if layer.bias is not None and bias in constants and only_ours:
        bias_size = int(np.prod(constants.shape(bias), dtype=np.int64))
    return replace(layer, shared=tuple(others), bias_size=bias_size,
                   output_positions=None if None in positions else sum(positions))


def _activation_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor ONNX shape inference can tell, without concrete input shapes."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # shape inference is a convenience here: a model it cannot handle simply has unknown ranks
        inferred = model
    ranks = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            ranks[info.name] = len(tensor_type.shape.dim)
    return ranks
