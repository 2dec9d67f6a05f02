"""What a layer or a model costs, in parameters and FLOPs: the one place every cost is computed.

Parameters count weight elements. A Conv with a BatchNormalization folded in also counts the BN parameters (and
its own bias), which the factorized form replaces by one folded bias of `out` elements. A data-aware factorization
carries a bias correction: a layer without a constant bias of `out` elements gains the difference. FLOPs count a multiply and an add as two operations (2 x MACs, the convention of
most detection papers) for every Conv, ConvTranspose, Gemm and MatMul node, from concrete tensor shapes; other
operators are not counted. A factorized layer costs its grouped encoder plus its decoder:

    params = r * (k * out + in_channels * taps)          (dense: out * in_channels * taps)
    flops  = 2 * positions * params                      (the encoder keeps the layer's strides and output size)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnx_lowrank.graph.constants import ConstantTable
from onnx_lowrank.graph.walk import nested_nodes, subgraphs
from onnx_lowrank.ops.base import FAMILIES, family_for
from onnx_lowrank.ops.layer import Chain, Layer

__all__ = ["dense_params", "factorized_params", "is_smaller", "dense_flops", "factorized_flops", "model_params",
           "model_flops", "narrowed_shapes", "narrowing_saving", "MIN_SAVING"]

MIN_SAVING = 0.1
"""A factorization must save at least this fraction of its layer's parameters (and FLOPs) to be a candidate. Below
it, the extra node, the extra pass over the activations and the approximation error buy almost nothing: the issue
that set this found a layer factorized for a 1% saving at error 0.25."""


def dense_params(layer: Layer) -> int:
    return layer.weight_size + layer.folded_params


def factorized_params(layer: Layer, k: int, rank: int, bias_correction: bool = False) -> int:
    """Weights of the factorized layer; with a bias correction, the bias it adds (or grows) counts too."""
    if layer.batchnorm_output:
        return _factor_elements(layer, k, rank) + layer.out_channels  # the folded bias, shift included
    added = layer.out_channels - layer.bias_size if bias_correction else 0
    return _factor_elements(layer, k, rank) + added


def dense_flops(layer: Layer) -> int | None:
    return None if layer.output_positions is None else 2 * layer.output_positions * layer.weight_size


def factorized_flops(layer: Layer, k: int, rank: int) -> int | None:
    if layer.output_positions is None:
        return None
    return 2 * layer.output_positions * _factor_elements(layer, k, rank)


def is_smaller(layer: Layer, k: int, rank: int, bias_correction: bool = False) -> bool:
    """A factorization is a candidate only if it keeps at most 1 - MIN_SAVING of the dense layer's parameters and
    of its FLOPs (FLOPs scale with the weight elements: both forms run at the layer's output positions)."""
    keep = 1.0 - MIN_SAVING
    return (_factor_elements(layer, k, rank) <= keep * layer.weight_size
            and factorized_params(layer, k, rank, bias_correction) <= keep * dense_params(layer))


def narrowed_shapes(cuts: Sequence[tuple[Chain, int]]) -> dict[str, tuple[Layer, int, int]]:
    """Every layer that narrowing every chain to its width changes: (layer, output channels kept, input channels
    kept). A layer that produces one cut chain and reads another (or reads and writes one set, inside a residual
    block) loses both."""
    shapes: dict[str, tuple[Layer, int, int]] = {}
    for chain, width in cuts:
        for producer in chain.producers:
            layer, _, columns = shapes.get(producer.name, (producer, producer.out_channels, producer.in_channels))
            shapes[producer.name] = (layer, width, columns)
        for reader in chain.readers:
            layer, rows, _ = shapes.get(reader.name, (reader, reader.out_channels, reader.in_channels))
            shapes[reader.name] = (layer, rows, width)
    return shapes


def narrowing_saving(cuts: Sequence[tuple[Chain, int]], metric: str) -> float | None:
    """Params or FLOPs that narrowing every chain to its width saves, counted exactly (`narrowed_shapes`): a layer
    that loses rows and columns keeps (kept rows) x (kept input channels) x taps weights, not the sum of the two
    savings. None when FLOPs are asked for and some layer's positions are unknown."""
    saving = 0.0
    if metric == "params":
        saving += sum((chain.channels - width) * chain.channel_params for chain, width in cuts)
    for layer, rows, columns in narrowed_shapes(cuts).values():
        kept = rows * columns * layer.taps
        if metric == "params":
            saving += layer.weight_size - kept
            if columns != layer.in_channels:
                saving -= _reader_bias_growth(layer, rows)
        elif layer.output_positions is None:
            return None
        else:
            saving += 2 * layer.output_positions * (layer.weight_size - kept)
    return saving


def _reader_bias_growth(layer: Layer, rows: int) -> int:
    """Parameters a reader gains when dropped channels are folded into it (`passes.eliminate`): their constant
    part becomes a bias of `rows` entries. A Conv or Gemm without a bias gets one; a MatMul gets an Add after it; a
    folded BatchNormalization and the Conv's bias become that one bias (its per-channel entries shrink to one)."""
    if not family_for(layer.op).bias_input:
        return rows
    if layer.batchnorm_output:
        return rows - (layer.folded_params // max(layer.out_channels, 1)) * rows
    return rows if layer.bias_size == 0 else 0


def _factor_elements(layer: Layer, k: int, rank: int) -> int:
    """Weights of the grouped encoder (k*r x in/k*taps) plus the decoder (out x k*r)."""
    return int(rank * (k * layer.out_channels + layer.columns))


def model_params(model: onnx.ModelProto) -> int:
    """Elements of every floating-point initializer and Constant-node tensor, in subgraphs too: the model's weight
    parameters."""
    tensors = list(_all_constant_tensors(model.graph))
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    return int(sum(int(np.prod(t.dims, dtype=np.int64)) for t in tensors if t.data_type in float_types))


def model_flops(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """FLOPs of one inference over every node of an op family (`OpFamily.node_macs`) and every ConvTranspose; None if
    a needed shape is unknown, or if such nodes live in If/Loop/Scan bodies (how often a body runs is not known
    before run time)."""
    if _counted_nodes_in_subgraphs(model.graph):
        return None
    constants = ConstantTable(model.graph)
    known = {**{name: constants.shape(name) for name in constants.names()}, **shapes}
    total = 0
    for node in model.graph.node:
        if not _counted(node.op_type):
            continue
        needed = [node.output[0], node.input[0], node.input[1]]
        if any(name not in known for name in needed):
            return None
        macs = FAMILIES[node.op_type].node_macs if node.op_type in FAMILIES else _conv_transpose_macs
        total += 2 * macs(node, *(known[name] for name in needed))
    return int(total)


def _counted(op_type: str) -> bool:
    return op_type in FAMILIES or op_type == "ConvTranspose"


def _counted_nodes_in_subgraphs(graph: onnx.GraphProto) -> bool:
    return any(_counted(inner.op_type) for inner, _ in nested_nodes(graph))


def _all_constant_tensors(graph: onnx.GraphProto):
    """Every initializer and Constant-node tensor of `graph` and of the If/Loop/Scan bodies inside it."""
    yield from graph.initializer
    for node in graph.node:
        if node.op_type == "Constant":
            yield from (a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR)
        for sub in subgraphs(node):
            yield from _all_constant_tensors(sub)


def _conv_transpose_macs(node, out_shape, in_shape, weight_shape) -> int:
    # every input element is scattered to (c_out / group) * taps outputs
    return int(np.prod(in_shape, dtype=np.int64)) * int(np.prod(weight_shape[1:], dtype=np.int64))
