"""The MatMul family (`MatMulFamily`): discovery (a 2-D weight, stored (in, out)), costs, narrowing, the k > 1 rule,
and the rewrite:

MatMul(X, W) with a constant 2-D weight W (in, out) -> grouped linear encoder + MatMul decoder.

ONNX has no grouped MatMul, and a dense block-diagonal encoder would give the saving back, so for k > 1 the encoder
splits the last axis into groups with a Reshape, (..., in) -> (..., k, 1, in/k), multiplies every group by its own
(in/k, r) block in one broadcast MatMul with a (k, in/k, r) weight, and merges the groups back, -> (..., k*r). Reshape's
0 copies a dimension, so any leading (batch, sequence) sizes pass through without being known. Gemm reuses the same
encoder.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_lowrank.graph.editor import GraphEditor
from onnx_lowrank.math.svd import Factors
from onnx_lowrank.ops.base import LayerContext, OpFamily, Skip, StoredWeight, slice_input
from onnx_lowrank.ops.layer import Consumer, Layer

__all__ = ["MatMulFamily", "matrix_layer", "linear_encoder", "rewrite_matmul"]


def linear_encoder(editor: GraphEditor, layer: Layer, factors: Factors, x: str,
                   activation_rank: int | None) -> tuple[str, list[onnx.NodeProto]]:
    """Nodes computing H = X @ blockdiag(encoder).T over the last axis of X; returns (H's name, nodes)."""
    k, r = factors.k, factors.rank
    hidden = editor.fresh(f"{layer.node_output}_lowrank_hidden")
    if k == 1:
        encoder = editor.add_initializer(f"{layer.weight_name}_lowrank_encoder", factors.encoder[0].T, layer.dtype)
        return hidden, [editor.make_node("MatMul", [x, encoder], [hidden], f"{layer.name}/lowrank_encoder")]
    if activation_rank is None:
        raise ValueError(f"layer {layer.name!r}: the activation rank must be known to build a grouped encoder (k={k})")

    keep = [0] * (activation_rank - 1)
    grouped = editor.fresh(f"{layer.node_output}_lowrank_grouped")
    grouped_hidden = editor.fresh(f"{layer.node_output}_lowrank_grouped_hidden")
    group = editor.reshape(x, keep + [k, 1, factors.encoder.shape[2]], grouped, f"{layer.name}/lowrank_group",
                           f"{layer.weight_name}_lowrank_group_shape")
    encoder = editor.add_initializer(f"{layer.weight_name}_lowrank_encoder", factors.encoder.transpose(0, 2, 1),
                                     layer.dtype)
    multiply = editor.make_node("MatMul", [grouped, encoder], [grouped_hidden], f"{layer.name}/lowrank_encoder")
    ungroup = editor.reshape(grouped_hidden, keep + [k * r], hidden, f"{layer.name}/lowrank_ungroup",
                             f"{layer.weight_name}_lowrank_ungroup_shape")
    return hidden, [group, multiply, ungroup]


def rewrite_matmul(editor: GraphEditor, layer: Layer, factors: Factors) -> None:
    """Replace the MatMul producing `layer.node_output` in place: Y = (X @ E) @ decoder.T (+ shift)."""
    matmul = editor.node(layer.node_output)
    hidden, nodes = linear_encoder(editor, layer, factors, matmul.input[0], layer.activation_rank)
    decoder = editor.add_initializer(f"{layer.weight_name}_lowrank_decoder", factors.decoder.T, layer.dtype)
    output = layer.node_output if factors.shift is None else editor.fresh(f"{layer.node_output}_lowrank_unshifted")
    nodes.append(editor.make_node("MatMul", [hidden, decoder], [output], f"{layer.name}/lowrank_decoder"))
    if factors.shift is not None:  # MatMul has no bias input: the bias correction is an Add
        nodes.append(editor.output_shift(output, layer.node_output, factors.shift, layer))
    editor.replace([matmul], nodes)
    editor.remove_orphans([layer.weight_name])


class MatMulFamily(OpFamily):
    """MatMul(X, W) with a constant 2-D weight W stored as (in, out), the transpose of the layer's matrix, on an
    activation of rank 2 or more; no bias input."""

    op_type = "MatMul"
    bias_input = False
    shared_attributes = ()

    def layer(self, node: onnx.NodeProto, name: str, context: LayerContext) -> Layer:
        weight_shape = context.constants.shape(node.input[1])
        if len(weight_shape) != 2:
            raise Skip(f"weight of rank {len(weight_shape)} is a batch of matrices, not one matrix")
        rank = context.ranks.get(node.input[0])
        if rank is not None and rank < 2:
            raise Skip("activation is a vector (rank 1)")
        return matrix_layer(self, node, name, context)

    def consumer(self, node: onnx.NodeProto, name: str, layer: Layer, context: LayerContext) -> Consumer:
        if context.ranks.get(node.input[0]) is not None and context.ranks[node.input[0]] < 2:
            raise Skip(f"shared weight is also read by {name!r}, whose activation is a vector (rank 1)")
        return super().consumer(node, name, layer, context)

    def weight_axes(self, node: onnx.NodeProto) -> tuple[int, int]:
        return 1, 0

    def node_macs(self, node, out_shape, a_shape, b_shape) -> int:
        return int(np.prod(out_shape, dtype=np.int64)) * int(a_shape[-1])

    def plan_problem(self, layer: Layer, k: int) -> str | None:
        """A grouped encoder reshapes the activation, which needs its rank (`linear_encoder`)."""
        if k > 1 and layer.activation_rank is None:
            return "can only take k=1: the rank of its input is unknown (give --input-shape)"
        return None

    def factorize(self, editor: GraphEditor, layer: Layer, factors: Factors) -> None:
        rewrite_matmul(editor, layer, factors)

    def narrow_producer(self, editor, node, layer, kept, orphans) -> None:
        """The weight's columns; a shift this layer got as a reader of another cut (an Add after it) too."""
        if node.op_type == "Add":  # the shift this layer got as a reader of another cut: per output channel too
            slice_input(editor, node, 1, kept, layer.out_channels, orphans)
            node = editor.node(node.input[0])
        slice_input(editor, node, 1, kept, layer.out_channels, orphans, axis=1)

    def refold_reader(self, editor, node, layer, matrix, bias, orphans) -> None:
        """No bias input, so a shift goes into an Add after it."""
        node.input[1] = editor.add_initializer(f"{layer.weight_name}_narrowed", matrix.T, layer.dtype)
        if np.any(bias):
            unshifted = onnx.NodeProto()
            unshifted.CopyFrom(node)
            unshifted.output[0] = editor.fresh(f"{layer.node_output}_narrowed_unshifted")
            shift = editor.output_shift(unshifted.output[0], layer.node_output, bias, layer)
            editor.replace([node], [unshifted, shift])


def matrix_layer(family: OpFamily, node: onnx.NodeProto, name: str, context: LayerContext, bias=None,
                 bias_size=0) -> Layer:
    """A Gemm or MatMul layer, its weight stored in the orientation `family.weight_axes` gives."""
    constants = context.constants
    transposed = family.weight_axes(node)[0] == 1  # the stored weight is (in, out), the transpose of the matrix
    weight_shape = constants.shape(node.input[1])
    matrix_shape = weight_shape[::-1] if transposed else weight_shape
    return Layer(
        name=name,
        op=family.op_type,
        node_output=node.output[0],
        input_name=node.input[0],
        weight_name=node.input[1],
        weight_shape=weight_shape,
        matrix_shape=matrix_shape,
        source=StoredWeight(constants.tensor(node.input[1]), transposed=transposed),
        in_channels=matrix_shape[1],
        kernel_shape=(),
        dtype=constants.dtype(node.input[1]),
        bias=bias,
        bias_size=bias_size,
        output_positions=family.positions(context.shapes, node.output[0]),
        activation_rank=context.ranks.get(node.input[0]),
    )
