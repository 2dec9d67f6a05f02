"""MatMul(X, W) with a constant 2-D weight W (in, out) -> grouped linear encoder + MatMul decoder.

ONNX has no grouped MatMul, and a dense block-diagonal encoder would give the saving back, so for k > 1 the encoder
splits the last axis into groups with a Reshape, (..., in) -> (..., k, 1, in/k), multiplies every group by its own
(in/k, r) block in one broadcast MatMul with a (k, in/k, r) weight, and merges the groups back, -> (..., k*r). Reshape's
0 copies a dimension, so any leading (batch, sequence) sizes pass through without being known. Gemm reuses the same
encoder.
"""

from __future__ import annotations

import onnx

from onnx_lowrank.stages.discover import Layer
from onnx_lowrank.math.svd import Factors

from onnx_lowrank.graph.editor import GraphEditor

__all__ = ["linear_encoder", "rewrite_matmul"]


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
