"""Plain protobuf helpers shared by the rewrite passes.

The passes edit a `GraphProto` in place through a `GraphEditor`, which knows every name already used in the graph
(so new names never collide), the default-domain opset (Reshape changed signature at opset 5), and how to remove
exactly what a rewrite orphaned. We use `onnx` directly rather than onnx-graphsurgeon because its export drops
`metadata_props`, and everything we do not rewrite has to stay byte-identical.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnx_lowrank.graph.constants import ConstantTable
from onnx_lowrank.graph.folded import SHAPE_OPS, FoldedConstants
from onnx_lowrank.graph.walk import consumed_names, subgraphs

__all__ = ["GraphEditor", "default_opset", "all_names"]


def default_opset(model: onnx.ModelProto) -> int:
    """Version of the default ("" / "ai.onnx") operator set the model imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ValueError("the model imports no default-domain opset, so it has no Conv/Gemm/MatMul to rewrite")


def all_names(graph: onnx.GraphProto) -> set[str]:
    """Every node and tensor name in `graph` and its subgraphs: new names must avoid all of them."""
    names: set[str] = set()
    names.update(t.name for t in graph.initializer)
    names.update(t.values.name for t in graph.sparse_initializer)
    for infos in (graph.input, graph.output, graph.value_info):
        names.update(v.name for v in infos)
    for node in graph.node:
        names.add(node.name)
        names.update(node.input)
        names.update(node.output)
        for sub in subgraphs(node):
            names |= all_names(sub)
    names.discard("")
    return names


class GraphEditor:
    """Edits one graph in place: finds nodes, adds uniquely named initializers and nodes, removes orphans."""

    def __init__(self, graph: onnx.GraphProto, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self._taken = all_names(graph)
        self._reusable: dict[str, list[tuple[np.ndarray, str]]] | None = None  # see `sharing`

    def fresh(self, base: str) -> str:
        """`base`, or `base_1`, `base_2`, ... when that name is already used anywhere in the graph."""
        name, n = base, 0
        while name in self._taken:
            n += 1
            name = f"{base}_{n}"
        self._taken.add(name)
        return name

    def node(self, output: str) -> onnx.NodeProto:
        """The top-level node whose first output is `output`.

        Discovery matched that node (its op, weight, attributes, a folded BatchNormalization) and the passes trust
        it; a missing node means a layer from another model was passed in, a programmer error.
        """
        node = self.find(output)
        if node is None:
            raise ValueError(f"no node produces {output!r}: the layer does not come from this model")
        return node

    def find(self, output: str) -> onnx.NodeProto | None:
        """The top-level node whose first output is `output`, or None."""
        for node in self.graph.node:
            if node.output and node.output[0] == output:
                return node
        return None

    def add_initializer(self, base: str, array: np.ndarray, dtype: np.dtype | type) -> str:
        """Append `array` cast to `dtype` as a new initializer; returns its (collision-free) name.

        Subnormal float32/float64 values are written as zeros: they are zero in effect, but every product with one
        takes the slow path of x86 CPUs (a decoder of PP-OCRv4's recogniser with 1,437 of them, from eigenvectors
        of an output covariance with dead channels, made the whole model 2.7x slower)."""
        values = np.ascontiguousarray(np.asarray(array).astype(np.dtype(dtype)))
        if values.dtype in (np.float32, np.float64):
            values[np.abs(values) < np.finfo(values.dtype).tiny] = 0
        if self._reusable is not None:
            for earlier, name in self._reusable.get(base, []):
                if earlier.shape == values.shape and earlier.dtype == values.dtype and np.array_equal(earlier, values):
                    return name
        name = self.fresh(base)
        self.graph.initializer.append(numpy_helper.from_array(values, name))
        if self._reusable is not None:
            self._reusable.setdefault(base, []).append((values, name))
        return name

    @contextmanager
    def sharing(self) -> Iterator[None]:
        """While open, an initializer equal to one already added under the same base name is not added again: the
        nodes that read one shared weight are rewritten one by one and all read the same factors."""
        self._reusable = {}
        try:
            yield
        finally:
            self._reusable = None

    def make_node(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str], name: str,
                  **attrs: object) -> onnx.NodeProto:
        """A default-domain node whose name is made collision-free."""
        return helper.make_node(op_type, list(inputs), list(outputs), name=self.fresh(name), **attrs)

    def reshape(self, data: str, shape: Sequence[int], output: str, name: str, shape_name: str) -> onnx.NodeProto:
        """A Reshape node (allowzero left at 0, so a 0 copies the input dimension).

        Opset >= 5 takes the shape as an int64 input, which we store as a new initializer named after `shape_name`;
        older opsets take it as an attribute.
        """
        if self.opset < 5:
            return self.make_node("Reshape", [data], [output], name, shape=list(shape))
        shape_tensor = self.add_initializer(shape_name, np.array(shape, dtype=np.int64), np.int64)
        return self.make_node("Reshape", [data, shape_tensor], [output], name)

    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant-node output `name` of this graph, or of a shape op on them (a
        Paddle bias's Reshape, `folded`); None when it is computed at run time. Read anew at each call: the passes
        edit the graph between calls."""
        constants = ConstantTable(self.graph)
        if name in constants:
            return constants.array(name)  # a lazily loaded model keeps external weights on disk
        folded = FoldedConstants(constants, {o: n for n in self.graph.node for o in n.output if o})
        return folded.array(name) if name in folded else None

    def output_shift(self, source: str, output: str, shift: np.ndarray, layer) -> onnx.NodeProto:
        """An Add node `output = source + shift` (the bias correction of a layer with nowhere to fold it)."""
        constant = self.add_initializer(f"{layer.weight_name}_lowrank_shift", shift, layer.dtype)
        return self.make_node("Add", [source, constant], [output], f"{layer.name}/lowrank_shift")

    def replace(self, old: Sequence[onnx.NodeProto], new: Sequence[onnx.NodeProto]) -> None:
        """Remove the `old` nodes and insert `new` where the first of them stood, so topological order holds."""
        indices = sorted(self._index(node) for node in old)
        for index in reversed(indices):
            del self.graph.node[index]
        for offset, node in enumerate(new):
            self.graph.node.insert(indices[0] + offset, node)

    def remove_orphans(self, candidates: Iterable[str]) -> None:
        """Remove each candidate initializer or Constant node that nothing reads any more.

        Only names the replaced nodes used to read are passed in, so a tensor that was unused before the rewrite is
        never touched. Graph inputs and outputs count as users.
        """
        used = consumed_names(self.graph)
        used.update(v.name for v in self.graph.input)
        used.update(v.name for v in self.graph.output)
        removed: list[str] = []
        pending = list(dict.fromkeys(candidates))
        while pending:
            name = pending.pop(0)
            if not name or name in used:
                continue
            if self._remove_initializer(name) or self._remove_constant(name):
                removed.append(name)
            else:
                inputs = self._remove_shape_op(name)
                if inputs is not None:  # its inputs may now be unread too
                    removed.append(name)
                    used = consumed_names(self.graph) | {v.name for v in (*self.graph.input, *self.graph.output)}
                    pending.extend(inputs)
        self.drop_value_info(removed)

    def drop_value_info(self, names: Iterable[str]) -> None:
        """Drop value_info entries of tensors that no longer exist."""
        stale = set(names)
        for index in reversed(range(len(self.graph.value_info))):
            if self.graph.value_info[index].name in stale:
                del self.graph.value_info[index]

    def _index(self, node: onnx.NodeProto) -> int:
        for index, candidate in enumerate(self.graph.node):
            if candidate.output[:1] == node.output[:1]:  # SSA: a first output names exactly one node
                return index
        raise ValueError(f"node {node.name!r} is not in the graph")

    def _remove_initializer(self, name: str) -> bool:
        for index, tensor in enumerate(self.graph.initializer):
            if tensor.name == name:
                del self.graph.initializer[index]
                return True
        return False

    def _remove_shape_op(self, name: str) -> list[str] | None:
        """Remove the shape op (`folded.SHAPE_OPS`) that computes `name` from constants alone; its inputs, or None."""
        for index, node in enumerate(self.graph.node):
            if list(node.output) == [name] and node.op_type in SHAPE_OPS and node.domain in ("", "ai.onnx"):
                if self.constant_value(name) is None:
                    return None
                del self.graph.node[index]
                return list(node.input)
        return None

    def _remove_constant(self, name: str) -> bool:
        for index, node in enumerate(self.graph.node):
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and list(node.output) == [name]:
                del self.graph.node[index]
                return True
        return False
