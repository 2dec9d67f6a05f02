"""The data types every stage and pass shares: a discovered layer (`Layer`, and `Consumer` for the other nodes
reading a shared weight), a layer left alone (`Skipped`), and a set of coupled channels that can be narrowed
(`Chain`, with the per-channel constants `Cut` with it). Plain frozen dataclasses, no ONNX: what an op family
builds and what the passes rewrite.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from onnx_lowrank.math.patches import ConvGeometry

__all__ = ["Layer", "Consumer", "Skipped", "Cut", "Chain"]


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
    op: str  # the op type of its family (`ops.base.family_for`): "Conv", "Gemm", "MatMul"
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
class Cut:
    """A constant input of an op between that holds entries per channel: input `index` of the node whose first output
    is `node`, cut along `axis` (a per-channel bias, a BatchNormalization's parameters, a depthwise Conv's filters)."""

    node: str
    index: int
    axis: int


@dataclass(frozen=True, eq=False)
class Chain:
    """One set of `channels` channels: written by `producers`, carried by the per-channel ops `passes`, read by
    `readers`. One producer is the plain chain (Conv -> BN -> act -> Conv); several are coupled (a residual stream,
    a squeeze-excite gate) and are cut together."""

    producers: tuple[Layer, ...]  # in graph order; the first names the set
    channels: int
    axis: int  # the channel axis of the set's tensors: 1 (NCHW) after a Conv, -1 after a Gemm or MatMul
    passes: tuple[str, ...]  # first outputs of the elementwise nodes between, in graph order
    readers: tuple[Layer, ...]  # in graph order
    fitted_on: tuple[str, ...]  # per reader: the tensor of the set whose channel statistics give its fold
    region: tuple[str, ...]  # every tensor whose channels are the set's
    cuts: tuple[Cut, ...] = ()  # the per-channel constants of the passes, cut with the channels
    channel_params: int = 0  # parameters per channel besides the weights: the producers' biases and BN, `cuts`

    @property
    def name(self) -> str:
        return self.producers[0].name

    @property
    def layers(self) -> tuple[Layer, ...]:
        """Every layer narrowing the set changes: its producers, then its readers (a layer may be both)."""
        return tuple({layer.name: layer for layer in (*self.producers, *self.readers)}.values())

    @property
    def fits(self) -> tuple[str, ...]:
        """The distinct tensors the readers are fitted on, in reader order."""
        return tuple(dict.fromkeys(self.fitted_on))

    @property
    def window(self) -> ConvGeometry | None:
        """How calibration reads the set's channel vectors: a 1 x 1 window over NCHW, the last axis (None)."""
        if self.axis != 1:
            return None
        dims = len(self.producers[0].kernel_shape)
        return ConvGeometry(kernel_shape=(1,) * dims, strides=(1,) * dims, dilations=(1,) * dims, pads=(0,) * 2 * dims)
