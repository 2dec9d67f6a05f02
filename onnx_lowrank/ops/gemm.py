"""The Gemm family (`GemmFamily`): discovery (transA = 0, B stored per transB, C folded into the bias), costs,
narrowing, and the rewrite:

Gemm(A, B, C) with a constant weight B -> linear encoder + decoder Gemm that keeps alpha, beta and C.

Y = alpha * A @ B' + beta * C with B' = W (out, in) ~= decoder @ blockdiag(encoder), so
Y ~= alpha * (A @ blockdiag(encoder).T) @ decoder.T + beta * C: the encoder is the one MatMul uses (A is always 2-D),
and the decoder Gemm reads decoder.T (k*r, out) with transB=0, the original C and every other original attribute.
A bias correction (`Factors.shift`) is folded into C as beta * C + alpha * shift with beta = 1 when C is absent or
a constant vector, and added by an Add node otherwise.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnx_lowrank.graph.editor import GraphEditor
from onnx_lowrank.graph.walk import node_attributes
from onnx_lowrank.math.svd import Factors
from onnx_lowrank.ops.base import LayerContext, OpFamily, Skip, constant_vector, own_size
from onnx_lowrank.ops.layer import Layer
from onnx_lowrank.ops.matmul import linear_encoder, matrix_layer

__all__ = ["GemmFamily", "rewrite_gemm"]


def rewrite_gemm(editor: GraphEditor, layer: Layer, factors: Factors) -> None:
    """Replace the Gemm producing `layer.node_output` in place."""
    gemm = editor.node(layer.node_output)
    attributes = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    hidden, nodes = linear_encoder(editor, layer, factors, gemm.input[0], activation_rank=2)
    decoder = editor.add_initializer(f"{layer.weight_name}_lowrank_decoder", factors.decoder.T, layer.dtype)
    c_input, kept = list(gemm.input[2:3]), [a for a in gemm.attribute if a.name != "transB"]  # transB defaults to 0
    output, shift = layer.node_output, factors.shift
    if shift is not None:
        alpha = attributes.get("alpha", 1.0)
        if not c_input or layer.bias is not None:  # C is absent or a constant vector: C' = alpha (bias + shift)
            base = 0.0 if not c_input else layer.bias  # layer.bias = beta / alpha * C
            c_input = [editor.add_initializer(f"{layer.weight_name}_lowrank_bias", alpha * (base + shift), layer.dtype)]
            kept = [a for a in kept if a.name != "beta"]
            shift = None
        else:  # C is computed at run time (or is not a vector): add the correction after the decoder
            output = editor.fresh(f"{layer.node_output}_lowrank_unshifted")
            shift = alpha * shift
    decoder_node = editor.make_node("Gemm", [hidden, decoder, *c_input], [output], f"{layer.name}/lowrank_decoder")
    decoder_node.attribute.extend(kept)
    nodes.append(decoder_node)
    if shift is not None:
        nodes.append(editor.output_shift(output, layer.node_output, shift, layer))
    editor.replace([gemm], nodes)
    editor.remove_orphans([layer.weight_name, *gemm.input[2:3]])


class GemmFamily(OpFamily):
    """Gemm(A, B, C) with transA = 0 and a constant 2-D weight B: (out, in) with transB = 1, else (in, out)."""

    op_type = "Gemm"

    def layer(self, node: onnx.NodeProto, name: str, context: LayerContext) -> Layer:
        constants, consumers = context.constants, context.consumers
        attrs = node_attributes(node)
        if attrs.get("transA", 0) != 0:
            raise Skip("transA=1 is not supported")
        weight_shape = constants.shape(node.input[1])
        if len(weight_shape) != 2:
            raise Skip(f"weight of rank {len(weight_shape)} is not a matrix")
        out_channels = weight_shape[self.weight_axes(node)[0]]
        alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
        bias, bias_size = None, 0
        if len(node.input) > 2 and node.input[2] and alpha != 0:
            c = constant_vector(constants, node.input[2], out_channels)
            if c is not None:
                # Y = alpha (W x + beta / alpha C)
                bias, bias_size = c * (beta / alpha), own_size(constants, consumers, node.input[2])
        return matrix_layer(self, node, name, context, bias, bias_size)

    def weight_axes(self, node: onnx.NodeProto) -> tuple[int, int]:
        """transB = 1: B is (out, in), the layer's matrix; else (in, out)."""
        return (0, 1) if node_attributes(node).get("transB", 0) else (1, 0)

    def node_macs(self, node, out_shape, a_shape, b_shape) -> int:
        inner = a_shape[0] if node_attributes(node).get("transA", 0) else a_shape[-1]
        return int(np.prod(out_shape, dtype=np.int64)) * int(inner)

    def factorize(self, editor: GraphEditor, layer: Layer, factors: Factors) -> None:
        rewrite_gemm(editor, layer, factors)

    def reader_problem(self, layer: Layer, node: onnx.NodeProto, described: str) -> str | None:
        attributes = node_attributes(node)
        if attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
            return f"its channels are read by {described} with alpha or beta other than 1"
        return None
