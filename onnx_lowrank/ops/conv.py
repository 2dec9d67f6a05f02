"""The Conv family (`ConvFamily`): discovery (group 1, a following inference BatchNormalization folded in), costs,
narrowing (and the depthwise Conv a set of channels passes through), and the rewrite:

Conv (any spatial rank, optionally followed by a folded BatchNormalization) -> grouped encoder Conv + 1x1 decoder.

The encoder Conv(c -> k*r, group=k) keeps every original attribute (kernel, strides, pads, dilations, auto_pad), so
it produces the same spatial grid; its weight stacks the groups' encoders, (k*r, c/k, *kernel), which is the C-order
reshape of `encoder` (k, r, c/k*taps) because a layer's matrix flattens (c, *kernel) in C order. The decoder is a
1x1 Conv(k*r -> out) with default attributes and the bias, into which the factors' bias correction (`shift`) is
folded (or, when the bias is computed at run time, added by an Add node after the decoder).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from onnx_lowrank.graph.constants import ConstantTable
from onnx_lowrank.graph.editor import GraphEditor
from onnx_lowrank.graph.folded import FoldedConstants
from onnx_lowrank.graph.walk import node_attributes
from onnx_lowrank.math.patches import ConvGeometry
from onnx_lowrank.math.svd import Factors
from onnx_lowrank.ops.base import LayerContext, OpFamily, Skip, StoredWeight, constant_vector, own_size, slice_input
from onnx_lowrank.ops.layer import Layer

__all__ = ["ConvFamily", "rewrite_conv"]


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


class ConvFamily(OpFamily):
    """Conv with group 1 and any spatial rank; its weight (out, c, *kernel) is the layer's matrix reshaped."""

    op_type = "Conv"
    channel_axis = 1
    shared_attributes = ("group", "kernel_shape")  # strides, pads and dilations may differ between the nodes

    def layer(self, node: onnx.NodeProto, name: str, context: LayerContext) -> Layer:
        return _conv_layer(self, node, name, context)

    def sharing_problem(self, readers: Sequence[onnx.NodeProto], context: LayerContext) -> str | None:
        if any(_following_batchnorm(n, context.constants, context.consumers, context.boundary) for n in readers):
            return ("shared weight feeds a BatchNormalization after one of its Convs; folding it would give each Conv "
                    "a different weight")
        return None

    def geometry(self, node: onnx.NodeProto, layer: Layer) -> ConvGeometry:
        return ConvGeometry.from_attributes(node_attributes(node), layer.kernel_shape)

    def output_rank(self, layer: Layer) -> int:
        return 2 + len(layer.kernel_shape)

    def stored_weight(self, node: onnx.NodeProto, layer: Layer, matrix: np.ndarray) -> np.ndarray:
        return matrix.reshape(layer.out_channels, -1, *layer.kernel_shape)

    def node_macs(self, node, out_shape, in_shape, weight_shape) -> int:
        # every output element reads (c_in / group) * taps inputs; the weight's dims 1.. are exactly that
        return int(np.prod(out_shape, dtype=np.int64)) * int(np.prod(weight_shape[1:], dtype=np.int64))

    def blocked(self, layer: Layer) -> bool:
        """Every 2-D Conv with group 1 runs in onnxruntime's blocked NCHWc layout (channel counts off the block are
        padded up to it; checked on onnxruntime 1.32 with ORT_ENABLE_ALL). A grouped Conv needs input and output
        channels per group on the block, which `layer_timing._forms` enforces for the factorized forms."""
        return len(layer.kernel_shape) == 2

    def factorize(self, editor: GraphEditor, layer: Layer, factors: Factors) -> None:
        rewrite_conv(editor, layer, factors)

    def narrow_producer(self, editor, node, layer, kept, orphans) -> None:
        """The weight's rows and the bias, and the parameters of a folded BatchNormalization."""
        slice_input(editor, node, 1, kept, layer.out_channels, orphans, axis=0)
        if len(node.input) > 2 and node.input[2]:
            slice_input(editor, node, 2, kept, layer.out_channels, orphans, axis=0)
        batchnorm = editor.node(layer.batchnorm_output) if layer.batchnorm_output else None
        if batchnorm is not None and batchnorm.op_type == "BatchNormalization":  # not merged into it as a reader
            for index in range(1, 5):
                slice_input(editor, batchnorm, index, kept, layer.out_channels, orphans, axis=0)

    def refold_reader(self, editor, node, layer, matrix, bias, orphans) -> None:
        """With a folded BatchNormalization, the Conv with the folded weight and bias takes over its output."""
        super().refold_reader(editor, node, layer, matrix, bias, orphans)
        if layer.batchnorm_output:  # the folded weight and bias already hold the BatchNormalization
            batchnorm = editor.node(layer.batchnorm_output)
            orphans.extend(batchnorm.input[1:])
            conv_output = node.output[0]
            editor.replace([batchnorm], [])  # before the Conv takes over its output's name
            node.output[0] = layer.batchnorm_output
            editor.drop_value_info([conv_output])

    def channelwise(self, node: onnx.NodeProto, constants: FoldedConstants, channels: int, axis: int) -> bool:
        """A depthwise Conv (one filter per channel, group = channels) on the set's NCHW channels: it mixes no
        channels, so it is cut with the set (its filters of the dropped channels go, its group shrinks)."""
        if axis != 1:
            return False
        weight, bias = node.input[1], node.input[2] if len(node.input) > 2 else ""
        if weight not in constants or (bias and (bias not in constants or constants.shape(bias) != (channels,))):
            return False
        shape = constants.shape(weight)
        return node_attributes(node).get("group", 1) == channels and len(shape) >= 3 and shape[:2] == (channels, 1)

    def narrow_channelwise(self, node: onnx.NodeProto, width: int) -> None:
        for attribute in node.attribute:
            if attribute.name == "group":
                attribute.i = width


def _conv_layer(family: ConvFamily, node: onnx.NodeProto, name: str, context: LayerContext) -> Layer:
    constants, consumers, boundary, ranks = context.constants, context.consumers, context.boundary, context.ranks
    attrs = node_attributes(node)
    if attrs.get("group", 1) != 1:
        raise Skip("grouped or depthwise convolution (group > 1)")
    weight_shape = constants.shape(node.input[1])
    if len(weight_shape) < 3:
        raise Skip(f"weight of rank {len(weight_shape)} is not a convolution kernel")
    out_channels, in_channels, *kernel = weight_shape
    has_bias = len(node.input) > 2 and bool(node.input[2])
    bias = constant_vector(constants, node.input[2], out_channels) if has_bias else None
    folded_params = 0
    row_scale = None
    batchnorm = _following_batchnorm(node, constants, consumers, boundary)
    if batchnorm is not None:
        scale, shift = _batchnorm_affine(batchnorm, constants)
        if has_bias and node.input[2] not in constants:
            batchnorm = None  # the bias cannot be folded; factorize the Conv alone
        elif scale.shape == (out_channels,):
            conv_bias = constants.array(node.input[2]).astype(np.float64) if has_bias else 0.0
            row_scale = scale
            bias = conv_bias * scale + shift
            folded = list(batchnorm.input[1:5]) + ([node.input[2]] if has_bias else [])
            folded_params = sum(int(np.prod(constants.shape(name), dtype=np.int64)) for name in folded)
        else:
            batchnorm = None
    output = batchnorm.output[0] if batchnorm is not None else node.output[0]
    positions = family.positions(context.shapes, output)
    return Layer(
        name=name,
        op="Conv",
        node_output=node.output[0],
        input_name=node.input[0],
        weight_name=node.input[1],
        weight_shape=tuple(weight_shape),
        matrix_shape=(out_channels, int(np.prod(weight_shape[1:], dtype=np.int64))),
        source=StoredWeight(constants.tensor(node.input[1]), row_scale=row_scale),
        in_channels=in_channels,
        kernel_shape=tuple(kernel),
        dtype=constants.dtype(node.input[1]),
        batchnorm_output=batchnorm.output[0] if batchnorm is not None else None,
        bias=bias,
        folded_params=folded_params if batchnorm is not None else 0,
        bias_size=own_size(constants, consumers, node.input[2]) if batchnorm is None and bias is not None else 0,
        output_positions=positions,
        activation_rank=ranks.get(node.input[0]),
        geometry=ConvGeometry.from_attributes(attrs, kernel),
    )


def _following_batchnorm(node, constants, consumers, boundary) -> onnx.NodeProto | None:
    """The inference-mode BatchNormalization that is the Conv output's only reader, if any."""
    output = node.output[0]
    readers = consumers.get(output, [])
    if output in boundary or len(readers) != 1:
        return None
    bn = readers[0]
    if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or list(bn.input[:1]) != [output]:
        return None
    if node_attributes(bn).get("training_mode", 0) != 0 or any(o for o in bn.output[1:]):
        return None
    if len(bn.input) != 5 or not all(name in constants and name not in boundary for name in bn.input[1:]):
        return None
    return bn


def _batchnorm_affine(bn: onnx.NodeProto, constants: ConstantTable) -> tuple[np.ndarray, np.ndarray]:
    """BatchNormalization as y = scale * x + shift per channel."""
    gamma, beta, mean, var = (constants.array(n).astype(np.float64).reshape(-1) for n in bn.input[1:5])
    epsilon = node_attributes(bn).get("epsilon", 1e-5)
    scale = gamma / np.sqrt(var + epsilon)
    return scale, beta - mean * scale
