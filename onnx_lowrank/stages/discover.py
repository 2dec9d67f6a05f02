"""Find the layers we can factorize: Conv (group 1), Gemm and MatMul whose weight is a constant.

A weight counts as constant when it is an initializer or the output of a `Constant` node (PaddlePaddle exports store
every weight that way). A Conv whose only consumer is an inference-mode BatchNormalization is seen with the BN
folded in, so its error is measured on what the pair really computes. A weight read by several nodes of one op in the
same way (an unrolled recurrent net's Gemm at every step) is one layer, whose nodes all get the same factors.
Everything else is listed as skipped, with the reason, and left untouched.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx.numpy_helper

from onnx_lowrank.graph.walk import consumed_names, nested_nodes, subgraphs
from onnx_lowrank.math.patches import ConvGeometry
from onnx_lowrank.graph.runtime import tensor_array

__all__ = ["Layer", "Consumer", "Skipped", "Discovery", "discover", "ConstantTable", "readers_of", "node_attributes", "LAYER_OPS"]


@dataclass(frozen=True, eq=False)
class Layer:
    """One factorizable layer, seen as a matrix.

    The matrix (`read_matrix()`) is the effective weight, shape (out, in_channels * prod(kernel_shape)): a Conv
    weight (out, c, *kernel) reshaped in C order with any following BatchNormalization folded in; a Gemm weight as
    (out, in) whatever transB says; a MatMul weight (in, out) transposed. Splitting its columns into k contiguous
    equal blocks splits the input channels into k contiguous groups. It is read from the model each time it is asked
    for, and not kept: a large model's weights stay on disk until their layer is worked on, one or two at a time.
    """

    name: str  # node name, or the node's first output when the node is unnamed; unique in the model
    op: str  # "Conv", "Gemm" or "MatMul"
    node_output: str  # first output of the node: identifies it in the graph
    input_name: str  # the activation the node reads (its input rows are what calibration statistics describe)
    weight_name: str  # the weight tensor as the node reads it
    weight_shape: tuple[int, ...]  # as stored in the model
    matrix_shape: tuple[int, int]  # (out, in_channels * prod(kernel_shape))
    source: Callable[[], np.ndarray]  # reads the matrix, float64 (see `read_matrix`)
    in_channels: int
    kernel_shape: tuple[int, ...]  # () for Gemm/MatMul
    dtype: np.dtype  # the weight's stored dtype; new weights are written in it
    batchnorm_output: str | None = None  # output of a BatchNormalization folded into this Conv
    bias: np.ndarray | None = None  # constant bias (out,) of the (fused) output: folded BN, a Conv's own, Gemm's C
    geometry: ConvGeometry | None = None  # a Conv's strides, pads, dilations and auto_pad (None for Gemm/MatMul)
    folded_params: int = 0  # BN parameters and conv bias that the folded bias replaces when the layer is factorized
    bias_size: int = 0  # elements of the node's own constant bias (Conv B, Gemm C) that a bias correction replaces
    output_positions: int | None = None  # output positions per inference (N*H*W, or MatMul rows); None if unknown
    activation_rank: int | None = None  # rank of the activation input (needed to build a grouped MatMul)
    shared: tuple[Consumer, ...] = ()  # the other nodes reading this weight the same way (one set of factors)

    def read_matrix(self) -> np.ndarray:
        """The layer's matrix, float64, read from the model now (a new array each call: keep it only while needed)."""
        return self.source()

    @property
    def out_channels(self) -> int:
        return self.matrix_shape[0]

    @property
    def columns(self) -> int:
        """Columns of the matrix: input channels times kernel positions."""
        return self.matrix_shape[1]

    @property
    def weight_size(self) -> int:
        """Elements of the matrix (the dense layer's weight parameters)."""
        return self.matrix_shape[0] * self.matrix_shape[1]

    @property
    def taps(self) -> int:
        """Kernel positions per input channel (1 for Gemm/MatMul)."""
        return self.matrix_shape[1] // self.in_channels

    @property
    def output(self) -> str:
        """The tensor the (possibly fused) layer produces: the BatchNormalization output when one is folded in."""
        return self.batchnorm_output or self.node_output

    def views(self) -> tuple[Layer, ...]:
        """The layer as seen from each node that reads its weight, this one first: what a rewrite, a timing or an
        input statistic is made of node by node. A shared weight's `output_positions` sums over its nodes (each
        runs), a view's are its node's own."""
        if not self.shared:
            return (self,)
        others = sum(c.output_positions for c in self.shared) if self.output_positions is not None else None
        first = replace(self, shared=(), output_positions=None if others is None else self.output_positions - others)
        return (first, *(replace(self, name=c.name, node_output=c.node_output, input_name=c.input_name,
                                 output_positions=c.output_positions, activation_rank=c.activation_rank,
                                 geometry=c.geometry, shared=()) for c in self.shared))


@dataclass(frozen=True)
class Consumer:
    """Another node reading a shared weight the same way as its layer's first node (same op, attributes, bias): it
    is rewritten to the same factors, and only what differs per node is kept."""

    name: str
    node_output: str
    input_name: str
    output_positions: int | None
    activation_rank: int | None
    geometry: ConvGeometry | None


@dataclass(frozen=True)
class Skipped:
    """A Conv/Gemm/MatMul left untouched, and why."""

    name: str
    op: str
    reason: str


@dataclass(frozen=True)
class Discovery:
    layers: tuple[Layer, ...]
    skipped: tuple[Skipped, ...]


_SUPPORTED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
"""Weight dtypes we rewrite: factorized in float64, the factors written back in the weight's own dtype."""

_NOT_REWRITTEN = {
    "QLinearConv": "quantized layer (QLinearConv): its integer weight cannot be factorized without dequantizing",
    "QLinearMatMul": "quantized layer (QLinearMatMul): its integer weight cannot be factorized without dequantizing",
    "ConvInteger": "quantized layer (ConvInteger): its integer weight cannot be factorized without dequantizing",
    "MatMulInteger": "quantized layer (MatMulInteger): its integer weight cannot be factorized without dequantizing",
    "ConvTranspose": "transposed convolution (ConvTranspose) is not supported",
}
"""Default-domain layers with a weight that we list as skipped, so the report names them instead of ignoring them."""

LAYER_OPS = frozenset({"Conv", "Gemm", "MatMul", *_NOT_REWRITTEN})
"""Every op this module reports on: the layers it rewrites and those it lists as skipped."""


def discover(
    model: onnx.ModelProto,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    exclude: str | None = None,
) -> Discovery:
    """List the factorizable layers of `model` and the Conv/Gemm/MatMul nodes that are skipped, with reasons.

    `shapes` (concrete tensor shapes, optional) gives each layer's output positions, which FLOP counts need, and
    the rank of MatMul activations; without it ranks come from ONNX shape inference and FLOPs stay unknown.
    `exclude` is a regular expression: layers whose name it matches (re.search) are skipped.
    """
    graph = model.graph
    pattern = re.compile(exclude) if exclude else None
    constants = ConstantTable(graph)
    consumers = readers_of(graph)
    producers = {out: node for node in graph.node for out in node.output if out}
    boundary = {v.name for v in graph.input} | {v.name for v in graph.output}
    ranks = _activation_ranks(model) if shapes is None else {k: len(v) for k, v in shapes.items()}
    names = _unique_layer_names(graph)

    layers: list[Layer] = []
    skipped: list[Skipped] = []
    shared_reasons: dict[str, str | None] = {}  # shared weight -> why its first reader was skipped (None: a layer)
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in _NOT_REWRITTEN:
            skipped.append(Skipped(name=names[id(node)], op=node.op_type, reason=_NOT_REWRITTEN[node.op_type]))
            continue
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        name = names[id(node)]
        weight_index = 1
        reason = _weight_problem(node, weight_index, constants, consumers, producers, boundary)
        readers = consumers.get(node.input[weight_index], []) if reason is None else []
        if len(readers) > 1 and readers[0] is not node:  # a later reader of a shared weight: its first reader decided
            if shared_reasons[node.input[weight_index]] is not None:
                skipped.append(Skipped(name=name, op=node.op_type, reason=shared_reasons[node.input[weight_index]]))
            continue
        if reason is None and pattern is not None:
            excluded = [names[id(n)] for n in readers or [node] if pattern.search(names[id(n)])]
            if excluded and len(readers) > 1:
                reason = f"excluded by the pattern {exclude!r} (it matches {excluded[0]!r}, which shares the weight)"
            elif excluded:
                reason = f"excluded by the pattern {exclude!r}"
        if reason is None:
            try:
                layer = _LAYER_BUILDERS[node.op_type](node, name, constants, consumers, boundary, shapes, ranks)
                if len(readers) > 1:
                    layer = _shared_layer(layer, readers, names, constants, consumers, shapes, ranks)
            except _Skip as skip:
                reason = str(skip)
            if reason is None and not (np.isfinite(layer.read_matrix()).all() and (layer.bias is None
                                                                                  or np.isfinite(layer.bias).all())):
                reason = "weight or bias has NaN or infinite values (a damaged file?); it cannot be factorized"
        if len(readers) > 1:
            shared_reasons[node.input[weight_index]] = reason
        if reason is not None:
            skipped.append(Skipped(name=name, op=node.op_type, reason=reason))
        else:
            layers.append(layer)
    skipped.extend(_subgraph_layers(graph))
    return Discovery(layers=tuple(layers), skipped=tuple(skipped))


def _subgraph_layers(graph: onnx.GraphProto) -> list[Skipped]:
    """Layers with a weight (Conv/Gemm/MatMul and the ones in `_NOT_REWRITTEN`) inside If/Loop/Scan bodies, which
    are not rewritten: listed so that a model whose layers all live there is not reported as having none."""
    found = []
    for inner, holder in nested_nodes(graph):
        if inner.op_type in LAYER_OPS and inner.domain in ("", "ai.onnx"):
            article = "an" if holder.op_type[0] in "AEIOU" else "a"
            reason = f"in {article} {holder.op_type} body: subgraphs are not rewritten"
            found.append(Skipped(name=inner.name or inner.output[0], op=inner.op_type, reason=reason))
    return found


class _Skip(Exception):
    """Raised inside a layer builder: the message is the skip reason."""


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

    def dtype(self, name: str) -> np.dtype:
        return onnx.helper.tensor_dtype_to_np_dtype(self._tensors[name].data_type)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].dims)

    def array(self, name: str) -> np.ndarray:
        return tensor_array(self._tensors[name])

    def tensor(self, name: str) -> onnx.TensorProto:
        return self._tensors[name]


@dataclass(frozen=True, eq=False)
class _StoredWeight:
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


def readers_of(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Every node reading each tensor, counting reads from inside subgraphs (If/Loop bodies) as their parent's."""
    result: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input) | _subgraph_reads(node):
            if name:
                result.setdefault(name, []).append(node)
    return result


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    return set().union(*(consumed_names(graph) for graph in subgraphs(node)))


def _unique_layer_names(graph: onnx.GraphProto) -> dict[int, str]:
    """Node name when it is set and unique, else the node's first output; '#<node index>' settles what still clashes
    (a node named like another node's output)."""
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.name] = counts.get(node.name, 0) + 1
    names = {id(n): n.name if n.name and counts[n.name] == 1 else n.output[0] for n in graph.node if n.output}
    taken: dict[str, int] = {}
    for name in names.values():
        taken[name] = taken.get(name, 0) + 1
    for index, node in enumerate(graph.node):
        if id(node) in names and taken[names[id(node)]] > 1:
            names[id(node)] = f"{names[id(node)]}#{index}"
    return names


def _weight_problem(node, index, constants, consumers, producers, boundary) -> str | None:
    """Why the node's weight input cannot be rewritten, or None when it can."""
    if len(node.input) <= index or not node.input[index]:
        return "has no weight input"
    weight = node.input[index]
    if weight not in constants:
        producer = producers.get(weight)
        if producer is not None and producer.op_type == "DequantizeLinear":
            return "weight is quantized (produced by DequantizeLinear)"
        if producer is not None:
            return f"weight is not a constant (produced by {producer.op_type})"
        return "weight is not a constant (it is a graph input)"
    if weight in boundary:
        return "weight is also a graph input or output, so it can change at run time"
    if list(node.input).count(weight) > 1:
        return "weight is read twice by the same node"
    if len(consumers.get(weight, [])) > 1:
        reason = _sharing_problem(weight, consumers[weight], constants, consumers, boundary)
        if reason is not None:
            return reason
    dtype = constants.dtype(weight)
    if dtype.name == "bfloat16":
        return "bfloat16 weights: onnxruntime's CPU provider cannot run them, so the result could not be verified"
    if dtype not in _SUPPORTED_DTYPES:
        return f"unsupported weight dtype {dtype.name} (float16, float32 and float64 are supported)"
    return None


def _sharing_problem(weight, readers, constants, consumers, boundary) -> str | None:
    """Why the nodes reading a shared weight cannot all be rewritten to one set of factors, or None when they can:
    they must be Conv/Gemm/MatMul nodes of one op, reading it as their weight only, with the same bias and the same
    attributes that shape the product (all of a Gemm's; a Conv's group and kernel_shape, its geometry may differ)."""
    first = readers[0]
    described = ", ".join(f"{n.op_type} {n.name or n.output[0]!r}" for n in readers[:3])
    if any(n.op_type != first.op_type or n.domain not in ("", "ai.onnx") for n in readers):
        return f"weight is shared by nodes of different ops ({described}, ...); only nodes of one op can share factors"
    if any(list(n.input).count(weight) != 1 or n.input[1] != weight for n in readers):
        return f"shared weight is read as another input than the weight by one of its readers ({described}, ...)"
    if any(list(n.input[2:3]) != list(first.input[2:3]) for n in readers):
        return "shared weight is read with different biases, which one set of factors and bias correction cannot serve"
    kept = {"Conv": ("group", "kernel_shape"), "MatMul": ()}.get(first.op_type)
    if any(_attribute_key(n, kept) != _attribute_key(first, kept) for n in readers):
        return f"shared weight is read with different attributes by its {first.op_type} nodes ({described}, ...)"
    if first.op_type == "Conv" and any(_following_batchnorm(n, constants, consumers, boundary) for n in readers):
        return ("shared weight feeds a BatchNormalization after one of its Convs; folding it would give each Conv "
                "a different weight")
    return None


def _attribute_key(node: onnx.NodeProto, names: tuple[str, ...] | None) -> dict:
    """The node's attributes that must agree between the readers of a shared weight (all of them when None)."""
    return {k: v for k, v in node_attributes(node).items() if names is None or k in names}


def _shared_layer(layer: Layer, readers, names, constants, consumers, shapes, ranks) -> Layer:
    """`layer` (built from the first reader) extended to every reader of its weight: one matrix and one set of
    factors, FLOPs counted for every node (each runs), and the bias, read by these nodes alone, replaced once."""
    others = []
    for node in readers[1:]:
        if node.op_type == "MatMul" and ranks.get(node.input[0]) is not None and ranks[node.input[0]] < 2:
            _raise(f"shared weight is also read by {names[id(node)]!r}, whose activation is a vector (rank 1)")
        channel_axis = 1 if node.op_type == "Conv" else -1
        geometry = None
        if node.op_type == "Conv":
            geometry = ConvGeometry.from_attributes(node_attributes(node), layer.kernel_shape)
        others.append(Consumer(name=names[id(node)], node_output=node.output[0], input_name=node.input[0],
                               output_positions=_positions(shapes, node.output[0], channel_axis),
                               activation_rank=ranks.get(node.input[0]), geometry=geometry))
    positions = [layer.output_positions] + [c.output_positions for c in others]
    bias_size = layer.bias_size
    bias = readers[0].input[2] if len(readers[0].input) > 2 else ""
    only_ours = {id(n) for n in consumers.get(bias, [])} == {id(n) for n in readers}
    if layer.bias is not None and bias in constants and only_ours:
        bias_size = int(np.prod(constants.shape(bias), dtype=np.int64))
    return replace(layer, shared=tuple(others), bias_size=bias_size,
                   output_positions=None if None in positions else sum(positions))


def node_attributes(node: onnx.NodeProto) -> dict:
    """A node's attributes by name, as Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _conv_layer(node, name, constants, consumers, boundary, shapes, ranks) -> Layer:
    attrs = node_attributes(node)
    if attrs.get("group", 1) != 1:
        return _raise("grouped or depthwise convolution (group > 1)")
    weight_shape = constants.shape(node.input[1])
    if len(weight_shape) < 3:
        return _raise(f"weight of rank {len(weight_shape)} is not a convolution kernel")
    out_channels, in_channels, *kernel = weight_shape
    has_bias = len(node.input) > 2 and bool(node.input[2])
    bias = _vector(constants, node.input[2], out_channels) if has_bias else None
    folded_params = 0
    row_scale = None
    batchnorm = _following_batchnorm(node, constants, consumers, boundary)
    if batchnorm is not None:
        scale, shift = _batchnorm_affine(batchnorm, constants)
        if has_bias and node.input[2] not in constants:
            batchnorm = None  # the bias cannot be folded; factorize the Conv alone
        elif scale.shape == (out_channels,):
            conv_bias = constants.array(node.input[2]).astype(np.float64) if has_bias else 0.0
            row_scale = scale
            bias = conv_bias * scale + shift
            folded = list(batchnorm.input[1:5]) + ([node.input[2]] if has_bias else [])
            folded_params = sum(int(np.prod(constants.shape(name), dtype=np.int64)) for name in folded)
        else:
            batchnorm = None
    output = batchnorm.output[0] if batchnorm is not None else node.output[0]
    positions = _positions(shapes, output, channel_axis=1)
    return Layer(
        name=name,
        op="Conv",
        node_output=node.output[0],
        input_name=node.input[0],
        weight_name=node.input[1],
        weight_shape=tuple(weight_shape),
        matrix_shape=(out_channels, int(np.prod(weight_shape[1:], dtype=np.int64))),
        source=_StoredWeight(constants.tensor(node.input[1]), row_scale=row_scale),
        in_channels=in_channels,
        kernel_shape=tuple(kernel),
        dtype=constants.dtype(node.input[1]),
        batchnorm_output=batchnorm.output[0] if batchnorm is not None else None,
        bias=bias,
        folded_params=folded_params if batchnorm is not None else 0,
        bias_size=_own_size(constants, consumers, node.input[2]) if batchnorm is None and bias is not None else 0,
        output_positions=positions,
        activation_rank=ranks.get(node.input[0]),
        geometry=ConvGeometry.from_attributes(attrs, kernel),
    )


def _own_size(constants, consumers, name: str) -> int:
    """Elements of constant `name` when one node alone reads it (a rewrite then replaces it); 0 when shared."""
    if len(consumers.get(name, [])) != 1:
        return 0
    return int(np.prod(constants.shape(name), dtype=np.int64))


def _vector(constants, name: str, size: int) -> np.ndarray | None:
    """A constant that broadcasts to one value per output channel, as float64 (out,); None if not constant."""
    if name not in constants:
        return None
    values = constants.array(name).astype(np.float64)
    if values.size not in (1, size) or values.ndim > 2 or (values.ndim == 2 and values.shape[0] != 1):
        return None
    return np.broadcast_to(values.reshape(-1), (size,)).copy()


def _gemm_layer(node, name, constants, consumers, boundary, shapes, ranks) -> Layer:
    attrs = node_attributes(node)
    if attrs.get("transA", 0) != 0:
        return _raise("transA=1 is not supported")
    weight_shape = constants.shape(node.input[1])
    if len(weight_shape) != 2:
        return _raise(f"weight of rank {len(weight_shape)} is not a matrix")
    transposed = not attrs.get("transB", 0)  # the stored weight is (in, out)
    out_channels = weight_shape[1] if transposed else weight_shape[0]
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    bias, bias_size = None, 0
    if len(node.input) > 2 and node.input[2] and alpha != 0:
        c = _vector(constants, node.input[2], out_channels)
        if c is not None:
            # Y = alpha (W x + beta / alpha C)
            bias, bias_size = c * (beta / alpha), _own_size(constants, consumers, node.input[2])
    return _matrix_layer(node, name, "Gemm", constants, transposed, shapes, ranks, bias, bias_size)


def _matmul_layer(node, name, constants, consumers, boundary, shapes, ranks) -> Layer:
    weight_shape = constants.shape(node.input[1])
    if len(weight_shape) != 2:
        return _raise(f"weight of rank {len(weight_shape)} is a batch of matrices, not one matrix")
    rank = ranks.get(node.input[0])
    if rank is not None and rank < 2:
        return _raise("activation is a vector (rank 1)")
    return _matrix_layer(node, name, "MatMul", constants, True, shapes, ranks)


def _matrix_layer(node, name, op, constants, transposed, shapes, ranks, bias=None, bias_size=0) -> Layer:
    """A Gemm or MatMul layer; `transposed`: the stored weight is (in, out), the transpose of the layer's matrix."""
    weight_shape = constants.shape(node.input[1])
    matrix_shape = weight_shape[::-1] if transposed else weight_shape
    return Layer(
        name=name,
        op=op,
        node_output=node.output[0],
        input_name=node.input[0],
        weight_name=node.input[1],
        weight_shape=weight_shape,
        matrix_shape=matrix_shape,
        source=_StoredWeight(constants.tensor(node.input[1]), transposed=transposed),
        in_channels=matrix_shape[1],
        kernel_shape=(),
        dtype=constants.dtype(node.input[1]),
        bias=bias,
        bias_size=bias_size,
        output_positions=_positions(shapes, node.output[0], channel_axis=-1),
        activation_rank=ranks.get(node.input[0]),
    )


def _raise(reason: str):
    raise _Skip(reason)


_LAYER_BUILDERS = {"Conv": _conv_layer, "Gemm": _gemm_layer, "MatMul": _matmul_layer}


def _following_batchnorm(node, constants, consumers, boundary) -> onnx.NodeProto | None:
    """The inference-mode BatchNormalization that is the Conv output's only reader, if any."""
    output = node.output[0]
    readers = consumers.get(output, [])
    if output in boundary or len(readers) != 1:
        return None
    bn = readers[0]
    if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or list(bn.input[:1]) != [output]:
        return None
    if node_attributes(bn).get("training_mode", 0) != 0 or any(o for o in bn.output[1:]):
        return None
    if len(bn.input) != 5 or not all(name in constants and name not in boundary for name in bn.input[1:]):
        return None
    return bn


def _batchnorm_affine(bn: onnx.NodeProto, constants: ConstantTable) -> tuple[np.ndarray, np.ndarray]:
    """BatchNormalization as y = scale * x + shift per channel."""
    gamma, beta, mean, var = (constants.array(n).astype(np.float64).reshape(-1) for n in bn.input[1:5])
    epsilon = node_attributes(bn).get("epsilon", 1e-5)
    scale = gamma / np.sqrt(var + epsilon)
    return scale, beta - mean * scale


def _positions(shapes, tensor: str, channel_axis: int) -> int | None:
    """Output positions per inference: all elements of the output but the channel axis."""
    if shapes is None or tensor not in shapes:
        return None
    shape = list(shapes[tensor])
    if not shape:
        return None
    del shape[channel_axis]
    return int(np.prod(shape, dtype=np.int64))


def _activation_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every tensor ONNX shape inference can tell, without concrete input shapes."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # shape inference is a convenience here: a model it cannot handle simply has unknown ranks
        inferred = model
    ranks = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tensor_type = info.type.tensor_type
        if tensor_type.HasField("shape"):
            ranks[info.name] = len(tensor_type.shape.dim)
    return ranks
