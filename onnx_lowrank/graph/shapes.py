"""Concrete shapes of intermediate tensors at the shapes the user runs the model at.

Costs (MACs per layer, activation sizes) depend on the spatial size of each layer's input and output. ONNX shape
inference with data propagation gets most of them once the graph inputs are pinned to concrete shapes, and costs
nothing but CPU. It gives up on some shapes computed at run time: the Reshape targets that PaddleOCR exports build
with Shape -> Slice -> Concat (onnx 1.23 leaves them, and every MatMul after them, unknown), targets computed in
float, ops from custom domains. Whatever is still unknown or symbolic is then measured: the model runs once in
onnxruntime on random inputs with those tensors added as extra graph outputs. Both steps work on copies; the
caller's model is never touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx

from onnx_lowrank.graph import runtime
from onnx_lowrank.errors import InvalidModelError, InvalidOptionError
from onnx_lowrank.graph.inputs import random_feeds, resolve_shapes

__all__ = ["tensor_shapes"]


def tensor_shapes(
    model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]], names: Iterable[str]
) -> dict[str, tuple[int, ...]]:
    """Concrete shape of each tensor in `names` (graph inputs, initializers, node outputs of the main graph) when
    the model runs at `input_shapes`, in the order asked.

    `input_shapes` goes through `resolve_shapes`, so a dynamic batch defaults to 1 and other dynamic dims must be
    given. A name the main graph does not hold raises InvalidOptionError.
    """
    wanted = list(dict.fromkeys(names))
    resolved = resolve_shapes(model, input_shapes)
    graph = model.graph
    initializers = {t.name: tuple(int(d) for d in t.dims) for t in graph.initializer}
    produced = {out for node in graph.node for out in node.output if out}
    absent = [n for n in wanted if n not in resolved and n not in initializers and n not in produced]
    if absent:
        shown = ", ".join(map(repr, absent[:5])) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        raise InvalidOptionError(f"Tensor(s) {shown} are not in the model's main graph; ask only for existing tensors")

    shapes: dict[str, tuple[int, ...]] = {}
    pending = []
    inferred: dict[str, tuple[int, ...]] = {}
    elem_types: dict[str, int] = {}
    if any(n not in resolved and n not in initializers for n in wanted):
        inferred, elem_types = _inferred(model, resolved)
    for name in wanted:
        if name in resolved:
            shapes[name] = resolved[name]
        elif name in initializers:
            shapes[name] = initializers[name]
        elif name in inferred:
            shapes[name] = inferred[name]
        else:
            pending.append(name)
    if pending:
        shapes.update(_measured(model, resolved, pending, elem_types))
    return {name: shapes[name] for name in wanted}


def _inferred(
    model: onnx.ModelProto, input_shapes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Fully concrete shapes found by ONNX shape inference (data propagation on), and every known element type."""
    copy = runtime.header_copy(model)  # inference reads the weights' dims, not their values
    graph = copy.graph
    # Stale annotations (a static size from export time, a symbolic one) could clash with the pinned inputs.
    graph.ClearField("value_info")
    for value in graph.output:
        if value.type.HasField("tensor_type"):
            value.type.tensor_type.ClearField("shape")
    for value in graph.input:
        if value.name in input_shapes:
            shape = value.type.tensor_type.shape
            shape.ClearField("dim")
            for size in input_shapes[value.name]:
                shape.dim.add().dim_value = size
    try:
        # the copy holds no weights, so it fits one message unless its Constant nodes alone pass 2 GB (then the
        # shapes are measured instead)
        result = onnx.shape_inference.infer_shapes(copy, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # inference is only a shortcut: anything it cannot do is measured in onnxruntime instead
        return {}, {}
    shapes: dict[str, tuple[int, ...]] = {}
    elem_types: dict[str, int] = {}
    for value in (*result.graph.value_info, *result.graph.output):
        if not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type:
            elem_types[value.name] = tensor_type.elem_type
        if tensor_type.HasField("shape"):
            dims = tensor_type.shape.dim
            if all(d.WhichOneof("value") == "dim_value" and d.dim_value >= 0 for d in dims):
                shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    return shapes, elem_types


def _measured(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]],
    names: Sequence[str],
    elem_types: Mapping[str, int],
) -> dict[str, tuple[int, ...]]:
    """Shapes of `names` from one onnxruntime run on random inputs, with the names exposed as graph outputs.

    Optimizations are off so no fusion renames or removes a tensor we ask for.
    """
    copy = runtime.with_outputs(model, names, elem_types)
    feeds = random_feeds(model, input_shapes, count=1, seed=0)[0]
    sess = runtime.session(copy, optimize=False)
    outputs = runtime.run(sess, feeds)
    shapes = {}
    for name in names:
        value = outputs.get(name)
        if not isinstance(value, np.ndarray):
            raise InvalidModelError(f"Tensor {name!r} is not a plain tensor in onnxruntime; cannot measure its shape")
        shapes[name] = tuple(int(d) for d in value.shape)
    return shapes
