"""A one-layer model: the layer's node alone, fed by a graph input of its real shape — what latency is measured on.

The node keeps every attribute (strides, pads, dilations, group, transA/transB, alpha/beta), its weight and a
constant bias of the same shapes; the values are random because dense kernels do not care about them. A folded
BatchNormalization is left out: onnxruntime fuses it into the Conv, and the factorized form folds it too. The
factorized variants are written from this model by the real rewrite passes, so what is timed is what is written.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_lowrank.graph.editor import default_opset
from onnx_lowrank.ops.base import family_for
from onnx_lowrank.ops.layer import Layer

__all__ = ["isolate_layer", "ISOLATED_INPUT"]

ISOLATED_INPUT = "x"


def isolate_layer(model: onnx.ModelProto, layer: Layer, input_shape: Sequence[int], seed: int = 0,
                  rows: int | None = None, columns: int | None = None) -> onnx.ModelProto:
    """A model computing only `layer`'s node on an input of `input_shape` (the caller's model is not modified).

    With `rows` or `columns`, the layer narrowed (`passes.eliminate`): that many output channels, or input channels
    (the input's channel axis shrinks with them)."""
    node = next((n for n in model.graph.node if n.output and n.output[0] == layer.node_output), None)
    if node is None:
        raise ValueError(f"layer {layer.name!r}: no node produces {layer.node_output!r}")
    rng = np.random.default_rng(seed)
    out = layer.out_channels if rows is None else rows
    weight_shape, input_shape = _narrowed_shapes(node, layer, list(input_shape), out, columns)
    weight = rng.standard_normal(weight_shape).astype(layer.dtype)
    initializers = [numpy_helper.from_array(weight, "w")]
    inputs = [ISOLATED_INPUT, "w"]
    if len(node.input) > 2 and node.input[2]:  # a Conv bias or a Gemm C: constant, of the layer's output size
        initializers.append(numpy_helper.from_array(np.zeros(out, dtype=layer.dtype), "b"))
        inputs.append("b")
    copy = helper.make_node(node.op_type, inputs, ["y"], name=layer.name)
    copy.attribute.extend(node.attribute)
    element = helper.np_dtype_to_tensor_dtype(np.dtype(layer.dtype))
    graph = helper.make_graph(
        [copy],
        "isolated",
        [helper.make_tensor_value_info(ISOLATED_INPUT, element, list(input_shape))],
        [helper.make_tensor_value_info("y", element, None)],
        initializers,
    )
    isolated = helper.make_model(graph, opset_imports=[helper.make_opsetid("", default_opset(model))])
    isolated.ir_version = model.ir_version
    inferred = onnx.shape_inference.infer_shapes(isolated).graph  # the output's shape, for a valid model
    known = [v for v in list(inferred.output) + list(inferred.value_info)
             if v.name == "y" and v.type.tensor_type.HasField("shape")]
    if known:
        isolated.graph.output[0].CopyFrom(known[0])
    return isolated


def _narrowed_shapes(node: onnx.NodeProto, layer: Layer, input_shape: list[int], rows: int, columns: int | None
                     ) -> tuple[tuple[int, ...], list[int]]:
    """The weight shape with `rows` outputs and `columns` inputs (None: as it is), and the input shape to match."""
    shape = list(layer.weight_shape)
    family = family_for(layer.op)
    (out_axis, in_axis), channel_axis = family.weight_axes(node), family.channel_axis
    shape[out_axis] = rows
    if columns is not None:
        shape[in_axis] = columns
        input_shape[channel_axis] = columns
    return tuple(shape), input_shape
