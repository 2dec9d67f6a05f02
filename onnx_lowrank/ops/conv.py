"""Conv (any spatial rank, optionally followed by a folded BatchNormalization) -> grouped encoder Conv + 1x1 decoder.

The encoder Conv(c -> k*r, group=k) keeps every original attribute (kernel, strides, pads, dilations, auto_pad), so
it produces the same spatial grid; its weight stacks the groups' encoders, (k*r, c/k, *kernel), which is the C-order
reshape of `encoder` (k, r, c/k*taps) because a layer's matrix flattens (c, *kernel) in C order. The decoder is a
1x1 Conv(k*r -> out) with default attributes and the bias, into which the factors' bias correction (`shift`) is
folded (or, when the bias is computed at run time, added by an Add node after the decoder).
"""

from __future__ import annotations

from onnx import helper

from onnx_lowrank.stages.discover import Layer
from onnx_lowrank.math.svd import Factors

from onnx_lowrank.graph.editor import GraphEditor

__all__ = ["rewrite_conv"]


def _plus(bias, shift):
    """The decoder's bias: the layer's constant bias (or none) plus the bias correction (or none)."""
    if shift is None:
        return bias
    return shift if bias is None else bias + shift


def rewrite_conv(editor: GraphEditor, layer: Layer, factors: Factors) -> None:
    """Replace the Conv producing `layer.node_output` (and its BatchNormalization, if folded) in place."""
    conv = editor.node(layer.node_output)
    k, r = factors.k, factors.rank
    c, kernel = layer.in_channels, tuple(layer.kernel_shape)
    old_nodes = [conv]
    orphan_candidates = list(conv.input[1:])
    bias = list(conv.input[2:3])
    shift = factors.shift
    output = layer.output
    extra: list = []
    if layer.batchnorm_output:
        bn = editor.node(layer.batchnorm_output)  # discovery matched it: the Conv output's only reader
        old_nodes.append(bn)
        orphan_candidates += list(bn.input[1:])
        bias = [editor.add_initializer(f"{layer.weight_name}_lowrank_bias", _plus(layer.bias, shift), layer.dtype)]
    elif shift is not None and (not bias or layer.bias is not None):  # no bias, or a constant one: fold the shift in
        base = layer.bias if bias else None
        bias = [editor.add_initializer(f"{layer.weight_name}_lowrank_bias", _plus(base, shift), layer.dtype)]
    elif shift is not None:  # a bias computed at run time: add the shift after the decoder
        output = editor.fresh(f"{layer.node_output}_lowrank_unshifted")
        extra = [editor.output_shift(output, layer.output, shift.reshape(-1, *[1] * len(kernel)), layer)]

    encoder = editor.add_initializer(f"{layer.weight_name}_lowrank_encoder",
                                     factors.encoder.reshape(k * r, c // k, *kernel), layer.dtype)
    decoder = editor.add_initializer(f"{layer.weight_name}_lowrank_decoder",
                                     factors.decoder.reshape(layer.out_channels, k * r, *[1] * len(kernel)),
                                     layer.dtype)
    hidden = editor.fresh(f"{layer.node_output}_lowrank_hidden")

    encoder_node = editor.make_node("Conv", [conv.input[0], encoder], [hidden], f"{layer.name}/lowrank_encoder")
    encoder_node.attribute.extend(a for a in conv.attribute if a.name != "group")
    encoder_node.attribute.append(helper.make_attribute("group", k))
    decoder_node = editor.make_node("Conv", [hidden, decoder, *bias], [output], f"{layer.name}/lowrank_decoder")

    conv_output = conv.output[0]
    editor.replace(old_nodes, [encoder_node, decoder_node, *extra])
    if layer.batchnorm_output:
        editor.drop_value_info([conv_output])  # the tensor between Conv and BatchNormalization is gone
    editor.remove_orphans(orphan_candidates)
