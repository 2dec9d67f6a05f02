"""Initializers that are also listed as graph inputs become plain constants.

IR version 3 required every initializer to be a graph input too, and old PyTorch and Caffe2 exports still write
models that way. onnxruntime, onnxsim and onnxslim all read such an input as a constant with a default value: no
deployment feeds weights at run time. We do the same, once, right after loading: the inputs are dropped from the
graph's input list, so every later stage sees ordinary constant weights. A model below IR version 4 is raised to 4,
the first version that allows initializers that are not inputs; nothing else changes.
"""

from __future__ import annotations

import onnx

__all__ = ["constant_initializer_inputs", "FIRST_IR_WITHOUT_INPUT_INITIALIZERS"]

FIRST_IR_WITHOUT_INPUT_INITIALIZERS = 4


def constant_initializer_inputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[str, ...]]:
    """The model with its initializer inputs turned into constants, and their names in input order.

    The given model is returned unchanged (not copied) when no input is an initializer; otherwise a copy is edited.
    """
    initializers = {tensor.name for tensor in model.graph.initializer}
    names = tuple(value.name for value in model.graph.input if value.name in initializers)
    if not names:
        return model, ()
    result = onnx.ModelProto()
    result.CopyFrom(model)
    kept = [value for value in result.graph.input if value.name not in initializers]
    del result.graph.input[:]
    result.graph.input.extend(kept)
    result.ir_version = max(result.ir_version, FIRST_IR_WITHOUT_INPUT_INITIALIZERS)
    return result, names
