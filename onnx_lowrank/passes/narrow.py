"""Narrow a layer: drop output channels of its producers and fold them into the layers that read them.

For a `chains.Chain` and the `elimination.Folded` result of cutting it: every producer keeps the output channels
`kept` (rows of its weight and bias, entries of a BatchNormalization folded into it); every per-channel constant of
the elementwise ops between (`Chain.cuts`, as discovery found them) keeps the same entries (a scalar stays as it
is), and a depthwise Conv between keeps the filters of the kept channels; every reader gets its new weight (the kept
channels' columns with the dropped ones folded in) and its new bias. A reader with a folded BatchNormalization
becomes one Conv with the folded weight and bias, writing the BatchNormalization's output. New constants get new
names (a constant shared with other nodes is never edited), what the rewrite orphans is removed, and the value_info
of every tensor whose channel count changed is dropped.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_lowrank.stages.channel_sets import Chain
from onnx_lowrank.stages.discover import Layer, node_attributes
from onnx_lowrank.math.elimination import Folded

from onnx_lowrank.graph.editor import GraphEditor

__all__ = ["narrow_layers"]


def narrow_layers(editor: GraphEditor, cuts: list[tuple[Chain, Folded]]) -> None:
    """Rewrite every chain in place to keep its channels `folded.kept`.

    Readers are rewritten first, producers after: a layer both reads one cut chain and produces another (or reads
    and writes one set, inside a residual block) gets the folded columns first, then loses the rows (each read from
    the graph as it then is).
    """
    orphans: list[str] = []
    for chain, folded in cuts:
        for reader, matrix, bias in zip(chain.readers, folded.matrices, folded.biases):
            _refold_reader(editor, reader, matrix, bias, len(folded.kept), orphans)
    for chain, folded in cuts:
        for producer in chain.producers:
            _narrow_producer(editor, producer, folded.kept, orphans)
        sliced: dict[tuple[str, int], str] = {}  # a constant two ops share is cut once
        for cut in chain.cuts:
            node = editor.node(cut.node)
            _slice_input(editor, node, cut.index, folded.kept, chain.channels, orphans, axis=cut.axis, done=sliced)
        for output in chain.passes:
            node = editor.node(output)
            if node.op_type == "Conv":  # depthwise (chains allow no other Conv between producers and readers)
                _set_group(node, len(folded.kept))
        editor.drop_value_info([*(p.node_output for p in chain.producers), *chain.region])
    editor.remove_orphans(orphans)


def _narrow_producer(editor: GraphEditor, layer: Layer, kept: np.ndarray, orphans: list[str]) -> None:
    node = _conv_or_merged(editor, layer)
    if layer.op == "Conv":
        _slice_input(editor, node, 1, kept, layer.out_channels, orphans, axis=0)
        if len(node.input) > 2 and node.input[2]:
            _slice_input(editor, node, 2, kept, layer.out_channels, orphans, axis=0)
        batchnorm = editor.node(layer.batchnorm_output) if layer.batchnorm_output else None
        if batchnorm is not None and batchnorm.op_type == "BatchNormalization":  # not merged into it as a reader
            for index in range(1, 5):
                _slice_input(editor, batchnorm, index, kept, layer.out_channels, orphans, axis=0)
    elif layer.op == "Gemm":
        transposed = node_attributes(node).get("transB", 0) == 1
        _slice_input(editor, node, 1, kept, layer.out_channels, orphans, axis=0 if transposed else 1)
        if len(node.input) > 2 and node.input[2]:
            _slice_input(editor, node, 2, kept, layer.out_channels, orphans)
    else:  # MatMul: (in, out)
        if node.op_type == "Add":  # the shift this layer got as a reader of another cut: per output channel too
            _slice_input(editor, node, 1, kept, layer.out_channels, orphans)
            node = editor.node(node.input[0])
        _slice_input(editor, node, 1, kept, layer.out_channels, orphans, axis=1)


def _conv_or_merged(editor: GraphEditor, layer: Layer) -> onnx.NodeProto:
    """The layer's node; a Conv that, narrowed as a reader, took over its BatchNormalization's output is found
    under that name."""
    node = editor.find(layer.node_output)
    return node if node is not None or not layer.batchnorm_output else editor.node(layer.batchnorm_output)


def _set_group(node: onnx.NodeProto, group: int) -> None:
    for attribute in node.attribute:
        if attribute.name == "group":
            attribute.i = group


def _slice_input(editor: GraphEditor, node: onnx.NodeProto, index: int, kept: np.ndarray, channels: int,
                 orphans: list[str], axis: int | None = None, done: dict[tuple[str, int], str] | None = None) -> None:
    """Replace constant input `index` of `node` by its entries `kept` along `axis` (default: the one axis of length
    `channels`); a constant with one value is left alone. `done` remembers what was cut already."""
    name = node.input[index]
    value = editor.constant_value(name)
    if value is None or value.size == 1:
        return
    if axis is None:
        axis = list(value.shape).index(channels)
    key = (name, axis)
    if done is None or key not in done:
        narrowed = editor.add_initializer(f"{name}_narrowed", np.take(value, kept, axis=axis), value.dtype)
        if done is not None:
            done[key] = narrowed
    node.input[index] = narrowed if done is None else done[key]
    orphans.append(name)


def _refold_reader(editor: GraphEditor, layer: Layer, matrix: np.ndarray, bias: np.ndarray, width: int,
                   orphans: list[str]) -> None:
    node = editor.node(layer.node_output)
    orphans.extend(node.input[1:])
    if layer.op == "Conv":
        weight = matrix.reshape(layer.out_channels, width, *layer.kernel_shape)
        node.input[1] = editor.add_initializer(f"{layer.weight_name}_narrowed", weight, layer.dtype)
        _set_bias(editor, node, layer, bias)
        if layer.batchnorm_output:  # the folded weight and bias already hold the BatchNormalization
            batchnorm = editor.node(layer.batchnorm_output)
            orphans.extend(batchnorm.input[1:])
            conv_output = node.output[0]
            editor.replace([batchnorm], [])  # before the Conv takes over its output's name
            node.output[0] = layer.batchnorm_output
            editor.drop_value_info([conv_output])
    elif layer.op == "Gemm":
        weight = matrix if node_attributes(node).get("transB", 0) == 1 else matrix.T
        node.input[1] = editor.add_initializer(f"{layer.weight_name}_narrowed", weight, layer.dtype)
        _set_bias(editor, node, layer, bias)
    else:  # MatMul: (in, out); no bias input, so a shift goes into an Add after it
        node.input[1] = editor.add_initializer(f"{layer.weight_name}_narrowed", matrix.T, layer.dtype)
        if np.any(bias):
            unshifted = onnx.NodeProto()
            unshifted.CopyFrom(node)
            unshifted.output[0] = editor.fresh(f"{layer.node_output}_narrowed_unshifted")
            editor.replace([node], [unshifted, editor.output_shift(unshifted.output[0], layer.node_output, bias, layer)])


def _set_bias(editor: GraphEditor, node: onnx.NodeProto, layer: Layer, bias: np.ndarray) -> None:
    """Give a Conv or Gemm reader its new bias as input 2, added when it had none."""
    name = editor.add_initializer(f"{layer.weight_name}_narrowed_bias", bias, layer.dtype)
    if len(node.input) > 2:
        node.input[2] = name
    else:
        node.input.append(name)
