"""Narrow a layer: drop output channels of its producers and fold them into the layers that read them.

For a `Chain` (found by `stages.channel_sets`) and the `elimination.Folded` result of cutting it: every producer
keeps the output channels `kept` (rows of its weight and bias, entries of a BatchNormalization folded into it); every
per-channel constant of the elementwise ops between (`Chain.cuts`, as discovery found them) keeps the same entries (a
scalar stays as it is), and a depthwise Conv between keeps the filters of the kept channels; every reader gets its
new weight (the kept channels' columns with the dropped ones folded in) and its new bias. A reader with a folded
BatchNormalization becomes one Conv with the folded weight and bias, writing the BatchNormalization's output. New
constants get new names (a constant shared with other nodes is never edited), what the rewrite orphans is removed,
and the value_info of every tensor whose channel count changed is dropped.
"""

from __future__ import annotations

import onnx

from onnx_lowrank.graph.editor import GraphEditor
from onnx_lowrank.math.elimination import Folded
from onnx_lowrank.ops.base import FAMILIES, family_for, slice_input
from onnx_lowrank.ops.layer import Chain, Layer

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
            node = editor.node(reader.node_output)
            orphans.extend(node.input[1:])
            family_for(reader.op).refold_reader(editor, node, reader, matrix, bias, orphans)
    for chain, folded in cuts:
        for producer in chain.producers:
            family_for(producer.op).narrow_producer(editor, _conv_or_merged(editor, producer), producer, folded.kept,
                                                    orphans)
        sliced: dict[tuple[str, int], str] = {}  # a constant two ops share is cut once
        for cut in chain.cuts:
            node = editor.node(cut.node)
            slice_input(editor, node, cut.index, folded.kept, chain.channels, orphans, axis=cut.axis, done=sliced)
        for output in chain.passes:
            node = editor.node(output)
            family = FAMILIES.get(node.op_type)
            if family is not None:  # a layer op between acts on each channel alone (`channelwise`: a depthwise Conv)
                family.narrow_channelwise(node, len(folded.kept))
        editor.drop_value_info([*(p.node_output for p in chain.producers), *chain.region])
    editor.remove_orphans(orphans)


def _conv_or_merged(editor: GraphEditor, layer: Layer) -> onnx.NodeProto:
    """The layer's node; a Conv that, narrowed as a reader, took over its BatchNormalization's output is found
    under that name."""
    node = editor.find(layer.node_output)
    return node if node is not None or not layer.batchnorm_output else editor.node(layer.batchnorm_output)
