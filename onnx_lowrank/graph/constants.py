"""The one reader of a graph's constants: initializers and the outputs of Constant nodes, by name.

Discovery, narrowing (`folded.FoldedConstants`, which extends it to shape ops on constants) and the rewrites
(`editor.GraphEditor.constant_value`) all read constants through `ConstantTable`.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnx_lowrank.graph.runtime import tensor_array

__all__ = ["ConstantTable"]


class ConstantTable:
    """Initializers and Constant-node outputs by name; arrays are decoded only when asked for, and a weight stored
    as external data is read from its file only then (the model keeps only its header)."""

    def __init__(self, graph: onnx.GraphProto):
        self._tensors: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        self._tensors[node.output[0]] = attr.t

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def dtype(self, name: str) -> np.dtype:
        return onnx.helper.tensor_dtype_to_np_dtype(self._tensors[name].data_type)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].dims)

    def array(self, name: str) -> np.ndarray:
        return tensor_array(self._tensors[name])

    def tensor(self, name: str) -> onnx.TensorProto:
        return self._tensors[name]
