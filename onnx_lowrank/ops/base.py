"""Op families: everything that differs between Conv, Gemm and MatMul, behind one class, and the registry.

A family (one module each: `conv`, `gemm`, `matmul`) subclasses `OpFamily` for one ONNX op type and provides: the
`Layer` built from a node or the skip reason (`layer`; `consumer`, `shared_attributes`, `sharing_problem` for a
shared weight); the stored weight's orientation (`weight_axes`, `stored_weight`); the activation's channel axis
(`channel_axis`, `output_rank`, `positions`); `node_macs`; `blocked` (onnxruntime's NCHWc layout); `plan_problem`
(a k it cannot build); the rewrite (`factorize`); narrowing (`narrow_producer`, `refold_reader`, `reader_problem`,
and `channelwise` / `narrow_channelwise` for a node a set of channels passes through, a depthwise Conv). Stages and
passes ask `family_for(layer.op)` and never test an op type. To add a family: write ops/<op>.py with a subclass
overriding what differs from the defaults (those of a product on the last axis), and `register` it in ops/__init__.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_lowrank.graph.constants import ConstantTable
from onnx_lowrank.graph.editor import GraphEditor
from onnx_lowrank.graph.folded import FoldedConstants
from onnx_lowrank.graph.runtime import tensor_array
from onnx_lowrank.math.patches import ConvGeometry
from onnx_lowrank.math.svd import Factors
from onnx_lowrank.ops.layer import Chain, Consumer, Layer

__all__ = ["OpFamily", "Skip", "LayerContext", "register", "unregister", "family_for", "FAMILIES", "NOT_REWRITTEN",
           "layer_ops", "group_counts", "width_alignment", "StoredWeight", "constant_vector", "own_size", "slice_input", "set_bias"]


class Skip(Exception):
    """Raised by `OpFamily.layer` (or `consumer`): the message is the skip reason."""


@dataclass(frozen=True)
class LayerContext:
    """What discovery knows about the graph when a family builds a layer from a node."""

    constants: ConstantTable
    consumers: Mapping[str, list[onnx.NodeProto]]  # every node reading each tensor (`graph.walk.readers_of`)
    boundary: set[str]  # graph inputs and outputs
    shapes: Mapping[str, tuple[int, ...]] | None  # concrete tensor shapes, when given
    ranks: Mapping[str, int]  # tensor ranks (from `shapes`, else from ONNX shape inference)


class OpFamily:
    """One op type's rules. The defaults are those of a plain matrix product on the last axis (Gemm, MatMul)."""

    op_type: str = ""
    channel_axis: int = -1
    """The channel axis of the activations the op reads and writes: 1 (NCHW) for Conv, -1 (last) otherwise."""
    bias_input: bool = True
    """Whether the node has a bias input (index 2) a rewrite can put a shift into; MatMul has none (an Add is added)."""
    shared_attributes: tuple[str, ...] | None = None
    """The attributes the nodes reading one shared weight must agree on (None: all of them)."""

    # discovery
    def layer(self, node: onnx.NodeProto, name: str, context: LayerContext) -> Layer:
        """The layer `node` is, or raise `Skip(reason)`."""
        raise NotImplementedError

    def consumer(self, node: onnx.NodeProto, name: str, layer: Layer, context: LayerContext) -> Consumer:
        """Another node reading `layer`'s weight the same way, as a `Consumer`, or raise `Skip(reason)`."""
        return Consumer(name=name, node_output=node.output[0], input_name=node.input[0],
                        output_positions=self.positions(context.shapes, node.output[0]),
                        activation_rank=context.ranks.get(node.input[0]), geometry=self.geometry(node, layer))

    def sharing_problem(self, readers: Sequence[onnx.NodeProto], context: LayerContext) -> str | None:
        """Why the nodes reading one weight cannot share one set of factors, beyond the generic checks."""
        return None

    def geometry(self, node: onnx.NodeProto, layer: Layer) -> ConvGeometry | None:
        """How calibration reads the node's input rows: a Conv's window, or None for the last axis."""
        return None

    def positions(self, shapes: Mapping[str, tuple[int, ...]] | None, tensor: str) -> int | None:
        """Output positions per inference: all elements of the output `tensor` but the channel axis."""
        if shapes is None or tensor not in shapes:
            return None
        shape = list(shapes[tensor])
        if not shape:
            return None
        del shape[self.channel_axis]
        return int(np.prod(shape, dtype=np.int64))

    def output_rank(self, layer: Layer) -> int:
        """The rank of the tensor the layer writes (2 when unknown)."""
        return layer.activation_rank or 2

    # the weight
    def weight_axes(self, node: onnx.NodeProto) -> tuple[int, int]:
        """(output axis, input axis) of the stored weight: (0, 1) when it is stored as the layer's matrix."""
        return 0, 1

    def stored_weight(self, node: onnx.NodeProto, layer: Layer, matrix: np.ndarray) -> np.ndarray:
        """A matrix of the layer's layout (out, in * taps) as the node stores its weight."""
        return matrix if self.weight_axes(node)[0] == 0 else matrix.T

    # costs and planning
    def node_macs(self, node: onnx.NodeProto, out_shape: Sequence[int], in_shape: Sequence[int],
                  weight_shape: Sequence[int]) -> int:
        """Multiply-accumulates of one run of `node` at these shapes."""
        raise NotImplementedError

    def blocked(self, layer: Layer) -> bool:
        """Whether onnxruntime runs the layer in its blocked NCHWc layout (channels padded up to its block)."""
        return False

    def plan_problem(self, layer: Layer, k: int) -> str | None:
        """Why the layer cannot be written with k groups (None when it can, given k divides its input channels)."""
        return None

    # rewrites
    def factorize(self, editor: GraphEditor, layer: Layer, factors: Factors) -> None:
        """Replace the layer's node by its factorized form, in place."""
        raise NotImplementedError

    def reader_problem(self, layer: Layer, node: onnx.NodeProto, described: str) -> str | None:
        """Why the layer cannot fold in the dropped channels of its input, beyond the generic checks."""
        return None

    def narrow_producer(self, editor: GraphEditor, node: onnx.NodeProto, layer: Layer, kept: np.ndarray,
                        orphans: list[str]) -> None:
        """Keep only the output channels `kept` of the layer's weight and bias."""
        slice_input(editor, node, 1, kept, layer.out_channels, orphans, axis=self.weight_axes(node)[0])
        if len(node.input) > 2 and node.input[2]:
            slice_input(editor, node, 2, kept, layer.out_channels, orphans)

    def refold_reader(self, editor: GraphEditor, node: onnx.NodeProto, layer: Layer, matrix: np.ndarray,
                      bias: np.ndarray, orphans: list[str]) -> None:
        """Give the layer its narrowed weight `matrix` (out, width * taps) and its new bias."""
        weight = self.stored_weight(node, layer, matrix)
        node.input[1] = editor.add_initializer(f"{layer.weight_name}_narrowed", weight, layer.dtype)
        set_bias(editor, node, layer, bias)

    def channelwise(self, node: onnx.NodeProto, constants: FoldedConstants, channels: int, axis: int) -> bool:
        """Whether `node` (not a discovered layer) acts on each of `channels` channels alone, so a set of channels
        passes through it and its constant inputs are cut along their axis 0 (a depthwise Conv)."""
        return False

    def narrow_channelwise(self, node: onnx.NodeProto, width: int) -> None:
        """Adjust a `channelwise` node's attributes to `width` channels."""


FAMILIES: dict[str, OpFamily] = {}
"""The registered families by op type (read it; change it with `register` / `unregister`)."""

NOT_REWRITTEN = {
    "QLinearConv": "quantized layer (QLinearConv): its integer weight cannot be factorized without dequantizing",
    "QLinearMatMul": "quantized layer (QLinearMatMul): its integer weight cannot be factorized without dequantizing",
    "ConvInteger": "quantized layer (ConvInteger): its integer weight cannot be factorized without dequantizing",
    "MatMulInteger": "quantized layer (MatMulInteger): its integer weight cannot be factorized without dequantizing",
    "ConvTranspose": "transposed convolution (ConvTranspose) is not supported",
}
"""Default-domain layers with a weight that we list as skipped, so the report names them instead of ignoring them."""


def register(family: OpFamily) -> OpFamily:
    """Add `family` to the registry (a second family for one op type is an error); returns it."""
    if not family.op_type or family.op_type in FAMILIES or family.op_type in NOT_REWRITTEN:
        raise ValueError(f"cannot register a family for op type {family.op_type!r}: it is empty or taken")
    FAMILIES[family.op_type] = family
    return family


def unregister(op_type: str) -> None:
    """Remove the family of `op_type` from the registry."""
    del FAMILIES[op_type]


def family_for(op_type: str) -> OpFamily:
    """The family of `op_type`; a KeyError names the registered ones."""
    try:
        return FAMILIES[op_type]
    except KeyError:
        raise KeyError(f"no op family for {op_type!r}, only {sorted(FAMILIES)}") from None


def layer_ops() -> frozenset[str]:
    """Every op discovery reports on: the registered families and the layers it lists as skipped."""
    return frozenset({*FAMILIES, *NOT_REWRITTEN})


def group_counts(layer: Layer, max_groups: int) -> list[int]:
    """Candidate k: divisors of the input channels up to `max_groups` that the layer's family can build."""
    family = family_for(layer.op)
    return [k for k in range(1, max_groups + 1) if layer.in_channels % k == 0 and family.plan_problem(layer, k) is None]


def width_alignment(chain: Chain, block: int) -> int:
    """The multiple a chain's widths keep: onnxruntime's channel block when one of its layers runs in the blocked
    layout (`OpFamily.blocked`: a 2-D Conv; its blocked kernels pad channels up to the block, see `widths`), else 1."""
    return block if any(family_for(layer.op).blocked(layer) for layer in chain.layers) else 1


@dataclass(frozen=True, eq=False)
class StoredWeight:
    """Reads a layer's matrix from its weight tensor in the model (from the data file when the tensor is stored as
    external data): reshaped to (out, -1), or transposed from (in, out), and scaled by a folded BatchNormalization.
    Nothing is kept between calls."""

    tensor: onnx.TensorProto
    transposed: bool = False
    row_scale: np.ndarray | None = None

    def __call__(self) -> np.ndarray:
        weight = tensor_array(self.tensor)
        matrix = weight.T if self.transposed else weight.reshape(weight.shape[0], -1)
        matrix = np.ascontiguousarray(matrix, dtype=np.float64)
        if self.row_scale is not None:
            matrix *= self.row_scale[:, None]
        return matrix


def own_size(constants, consumers, name: str) -> int:
    """Elements of constant `name` when one node alone reads it (a rewrite then replaces it); 0 when shared."""
    if len(consumers.get(name, [])) != 1:
        return 0
    return int(np.prod(constants.shape(name), dtype=np.int64))


def constant_vector(constants, name: str, size: int) -> np.ndarray | None:
    """A constant that broadcasts to one value per output channel, as float64 (out,); None if not constant."""
    if name not in constants:
        return None
    values = constants.array(name).astype(np.float64)
    if values.size not in (1, size) or values.ndim > 2 or (values.ndim == 2 and values.shape[0] != 1):
        return None
    return np.broadcast_to(values.reshape(-1), (size,)).copy()


def slice_input(editor: GraphEditor, node: onnx.NodeProto, index: int, kept: np.ndarray, channels: int,
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


def set_bias(editor: GraphEditor, node: onnx.NodeProto, layer: Layer, bias: np.ndarray) -> None:
    """Give a reader with a bias input its new bias as input 2, added when it had none."""
    name = editor.add_initializer(f"{layer.weight_name}_narrowed_bias", bias, layer.dtype)
    if len(node.input) > 2:
        node.input[2] = name
    else:
        node.input.append(name)
