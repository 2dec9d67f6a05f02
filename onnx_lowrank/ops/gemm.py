"""Gemm(A, B, C) with a constant weight B -> linear encoder + decoder Gemm that keeps alpha, beta and C.

Y = alpha * A @ B' + beta * C with B' = W (out, in) ~= decoder @ blockdiag(encoder), so
Y ~= alpha * (A @ blockdiag(encoder).T) @ decoder.T + beta * C: the encoder is the one MatMul uses (A is always 2-D),
and the decoder Gemm reads decoder.T (k*r, out) with transB=0, the original C and every other original attribute.
A bias correction (`Factors.shift`) is folded into C as beta * C + alpha * shift with beta = 1 when C is absent or
a constant vector, and added by an Add node otherwise.
"""

from __future__ import annotations

from onnx import helper

from onnx_lowrank.stages.discover import Layer
from onnx_lowrank.math.svd import Factors

from onnx_lowrank.graph.editor import GraphEditor
from onnx_lowrank.ops.matmul import linear_encoder

__all__ = ["rewrite_gemm"]


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
