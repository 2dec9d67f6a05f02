"""Graph rewrite passes: factorize layers, narrow sets of channels.

Each op family (`ops`) rewrites a single layer in place through the shared `GraphEditor` (`OpFamily.factorize`);
`factorize_layers` copies the model once and dispatches, `eliminate_channels` likewise for `narrow`. Plain protobuf
surgery keeps everything that is not rewritten byte-identical (metadata_props, opsets, doc strings, value_info, node
order).
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx

from onnx_lowrank.graph.editor import GraphEditor, default_opset
from onnx_lowrank.math.elimination import Folded
from onnx_lowrank.math.svd import Factors
from onnx_lowrank.ops.base import FAMILIES
from onnx_lowrank.ops.layer import Chain, Layer
from onnx_lowrank.passes.narrow import narrow_layers

__all__ = ["factorize_layers", "eliminate_channels"]


def factorize_layers(model: onnx.ModelProto, rewrites: Iterable[tuple[Layer, Factors]]) -> tuple[onnx.ModelProto, int]:
    """Return a NEW model (the input is never mutated: deep-copy it) in which every listed layer is replaced by its
    factorized form, and the number of layers rewritten (a shared weight is one layer, however many nodes read it;
    its factors are added once). `rewrites` may be an iterator: each layer's factors are written as they come and
    not kept (the new weights are kept in the model's own dtype)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    editor = None  # made at the first rewrite: a model without a default-domain opset has no opset to read
    count = 0
    for layer, factors in rewrites:
        editor = editor or GraphEditor(result.graph, default_opset(result))
        if layer.op not in FAMILIES:
            raise ValueError(f"layer {layer.name!r}: cannot rewrite a {layer.op!r}, only {sorted(FAMILIES)}")
        _check_factors(layer, factors)
        with editor.sharing():  # a shared weight: every node reading it is rewritten to the same factors
            for view in layer.views():
                FAMILIES[layer.op].factorize(editor, view, factors)
        count += 1
    return result, count


def _check_factors(layer: Layer, factors: Factors) -> None:
    """The factors must come from this layer's matrix: catch a mix-up before it becomes a wrong but valid model."""
    k, r = factors.k, factors.rank
    out, cols = layer.matrix_shape
    if k < 1 or layer.in_channels % k:
        raise ValueError(f"layer {layer.name!r}: k={k} does not divide its {layer.in_channels} input channels")
    if factors.encoder.shape != (k, r, cols // k) or factors.decoder.shape != (out, k * r):
        raise ValueError(f"layer {layer.name!r}: factors of shapes {factors.encoder.shape} and "
                         f"{factors.decoder.shape} do not fit its ({out}, {cols}) matrix with k={k}, rank={r}")


def eliminate_channels(model: onnx.ModelProto, cuts: Iterable[tuple[Chain, Folded]]) -> tuple[onnx.ModelProto, int]:
    """Return a NEW model in which every chain keeps only its `Folded.kept` channels (see `eliminate`), and the
    number of chains narrowed."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    cuts = list(cuts)
    if cuts:
        narrow_layers(GraphEditor(result.graph, default_opset(result)), cuts)
    return result, len(cuts)
