"""Tensors whose value is known before run time: constants, and what shape ops compute from constants alone.

PaddlePaddle exports write a Conv's bias as Add(conv, Reshape(bias, [1, C, 1, 1])): the Add's operand is computed,
but only from constants. Narrowing (`chains`, `passes.eliminate`) cuts such a bias like any per-channel constant, so
it needs its value and shape: `FoldedConstants` works them out for the shape ops below (numpy, no onnxruntime),
and a cut replaces the computed operand by a new constant, leaving the shape op unread (`passes._graph` removes it).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from onnx_lowrank.graph.constants import ConstantTable
from onnx_lowrank.graph.walk import node_attributes

__all__ = ["SHAPE_OPS", "FoldedConstants", "fold"]

SHAPE_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Cast"})
"""Ops whose output from constant inputs is worked out here."""


def fold(node: onnx.NodeProto, inputs: list[np.ndarray | None]) -> np.ndarray:
    """The output of a shape op on constant inputs (None for an omitted optional input)."""
    attributes = node_attributes(node)
    x = inputs[0]
    second = inputs[1] if len(inputs) > 1 else None
    if node.op_type == "Identity":
        return x
    if node.op_type == "Cast":
        return x.astype(onnx.helper.tensor_dtype_to_np_dtype(attributes["to"]))
    if node.op_type == "Flatten":
        axis = attributes.get("axis", 1) % max(x.ndim, 1) if x.ndim else 0
        return x.reshape(int(np.prod(x.shape[:axis], dtype=np.int64)), -1)
    if node.op_type == "Reshape":
        shape = [int(v) for v in (second if second is not None else attributes["shape"])]
        if not attributes.get("allowzero", 0):
            shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
        return x.reshape(shape)
    axes = attributes.get("axes", None if second is None else [int(v) for v in second.reshape(-1)])
    if node.op_type == "Unsqueeze":
        rank = x.ndim + len(axes)
        for axis in sorted(a % rank for a in axes):
            x = np.expand_dims(x, axis)
        return x
    if node.op_type == "Squeeze":
        return np.squeeze(x) if not axes else np.squeeze(x, axis=tuple(a % x.ndim for a in axes))
    raise ValueError(f"{node.op_type} is not a shape op")


class FoldedConstants:
    """`ConstantTable`'s view (membership, shape, value) extended to the outputs of shape ops on constants."""

    def __init__(self, constants: ConstantTable, made_by: Mapping[str, onnx.NodeProto]) -> None:
        self._constants = constants
        self._made_by = made_by
        self._values: dict[str, np.ndarray | None] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._constants or self._folded(name) is not None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._constants.shape(name) if name in self._constants else tuple(self._folded(name).shape)

    def array(self, name: str) -> np.ndarray:
        return self._constants.array(name) if name in self._constants else self._folded(name)

    def _folded(self, name: str) -> np.ndarray | None:
        if name not in self._values:
            self._values[name] = None  # a cycle cannot occur in a valid graph, but never recurse forever
            node = self._made_by.get(name)
            if node is not None and node.op_type in SHAPE_OPS and node.domain in ("", "ai.onnx") and node.input:
                values = [None if not i else self._constants.array(i) if i in self._constants else self._folded(i)
                          for i in node.input]
                if all(v is not None for v, i in zip(values, node.input) if i):
                    try:
                        self._values[name] = fold(node, values)
                    except (ValueError, KeyError, TypeError):
                        self._values[name] = None
        return self._values[name]
