"""Hypothesis strategies shared by the tests: one-layer graphs of every geometry the rewrites handle, random small
valid ONNX graphs for the fuzz tests, and random corruptions of model files.

One-layer graphs (`conv_graphs`, `gemm_graphs`, `matmul_graphs`) return (model, input "x", input width): a Conv (1-D
or 2-D, any strides, pads, dilations, auto_pad, kernel_shape given or inferred, bias or not, maybe a following
BatchNormalization, weights as initializers or Constant nodes), a Gemm (transB, alpha, beta, every C shape) or a
MatMul (activation rank 2..4), with an input width that usually has divisors to pick a group count k > 1 from.

A fuzz graph (`fuzz_models`, for tests/test_fuzz.py) is a chain with side branches (residual Add, Concat, extra
outputs) over one input: a Conv stage (1-D or 2-D; any kernel, strides, pads, dilations; group 1 or more; bias or
not; BatchNormalization after it or not) that may turn into a dense stage through Flatten, Reshape or Reshape +
Transpose, or a dense stage alone (Gemm with every transB, alpha, beta and C shape; MatMul on 2-D and batched
activations, weight on either side), mixed with Relu, Sigmoid, Softmax, Transpose and Mul/Add by constants. Weights
are initializers or Constant nodes, sometimes shared by two nodes; the batch dimension is static or dynamic
(sometimes a spatial one too); the model is float32, float16 throughout, or float32 with float16 weights read
through Cast nodes. Shapes are tracked here, so every model declares its output shapes and passes the full checker
(strict shape inference) before it is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import event
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from helpers.builders import make_model, tensor

# ------------------------------------------------------------------------------------------- one-layer graphs


def _weight_nodes(name: str, array: np.ndarray, as_constant: bool) -> tuple[list, list]:
    """(nodes, initializers) that provide `array` under `name`."""
    value = numpy_helper.from_array(array.astype(np.float32), name)
    if as_constant:
        return [helper.make_node("Constant", [], [name], value=value)], []
    return [], [value]


def _floats(rng: np.random.Generator, shape, low=-1.0, high=1.0) -> np.ndarray:
    return rng.uniform(low, high, shape).astype(np.float32)


def _width(draw) -> int:
    """An input width up to 12, drawn as a product so that it usually has divisors to pick k > 1 from."""
    return draw(st.integers(1, 4)) * draw(st.integers(1, 3))


def _one_layer_model(nodes, x_shape, output_rank: int, initializers) -> onnx.ModelProto:
    return make_model(nodes, [tensor("x", list(x_shape))], [tensor("y", output_rank)], initializers)


@st.composite
def conv_graphs(draw, has_bn: bool | None = None) -> tuple[onnx.ModelProto, np.ndarray, int]:
    """A Conv named "conv", followed by a BatchNormalization "bn" when `has_bn` (None: either, balanced, whatever
    hypothesis favours, as the bias is); returns (model, input, input channels)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    nd = draw(st.sampled_from([1, 2]))
    c_in, c_out = _width(draw), draw(st.integers(1, 8))
    kernel = draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))
    strides = draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    # onnxruntime refuses dilations with SAME_* padding, even in the original model
    max_dilation = 1 if auto_pad.startswith("SAME") else 2
    dilations = draw(st.lists(st.integers(1, max_dilation), min_size=nd, max_size=nd))
    attrs = dict(strides=strides, dilations=dilations, auto_pad=auto_pad)
    if auto_pad == "NOTSET":
        attrs["pads"] = draw(st.lists(st.integers(0, 2), min_size=2 * nd, max_size=2 * nd))
    if draw(st.booleans()):
        attrs["kernel_shape"] = kernel
    spatial = [d * (k - 1) + 1 + draw(st.integers(0, 5)) for k, d in zip(kernel, dilations)]
    has_bias = bool(rng.integers(2))
    if has_bn is None:
        has_bn = bool(rng.integers(2))

    nodes, inits = _weight_nodes("W", _floats(rng, (c_out, c_in, *kernel)), draw(st.booleans()))
    conv_inputs = ["x", "W"]
    if has_bias:
        inits.append(numpy_helper.from_array(_floats(rng, c_out), "B"))
        conv_inputs.append("B")
    nodes.append(helper.make_node("Conv", conv_inputs, ["conv" if has_bn else "y"], name="conv", **attrs))
    if has_bn:
        for name, low, high in (("gamma", 0.5, 1.5), ("beta", -1, 1), ("mean", -1, 1), ("var", 0.5, 2.0)):
            param_nodes, param_inits = _weight_nodes(name, _floats(rng, c_out, low, high), draw(st.booleans()))
            nodes = param_nodes + nodes
            inits += param_inits
        nodes.append(helper.make_node("BatchNormalization", ["conv", "gamma", "beta", "mean", "var"], ["y"],
                                      name="bn"))
    event(f"bias={has_bias}, bn={has_bn}")
    x_shape = [draw(st.integers(1, 2)), c_in, *spatial]
    return _one_layer_model(nodes, x_shape, 2 + nd, inits), _floats(rng, x_shape), c_in


C_SHAPES = ["absent", "scalar", "out", "1,out", "n,out"]


@st.composite
def gemm_graphs(draw) -> tuple[onnx.ModelProto, np.ndarray, int]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n, inp, out = draw(st.integers(1, 4)), _width(draw), draw(st.integers(1, 8))
    trans_b = draw(st.integers(0, 1))
    alpha, beta = draw(st.floats(-2, 2)), draw(st.floats(-2, 2))
    c_shape = draw(st.sampled_from(C_SHAPES))
    nodes, inits = _weight_nodes("W", _floats(rng, (out, inp) if trans_b else (inp, out)), draw(st.booleans()))
    inputs = ["x", "W"]
    if c_shape != "absent":
        shape = {"scalar": (), "out": (out,), "1,out": (1, out), "n,out": (n, out)}[c_shape]
        inits.append(numpy_helper.from_array(_floats(rng, shape), "C"))
        inputs.append("C")
    nodes.append(helper.make_node("Gemm", inputs, ["y"], transB=trans_b, alpha=alpha, beta=beta))
    return _one_layer_model(nodes, [n, inp], 2, inits), _floats(rng, (n, inp)), inp


@st.composite
def matmul_graphs(draw) -> tuple[onnx.ModelProto, np.ndarray, int]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rank = draw(st.integers(2, 4))
    inp, out = _width(draw), draw(st.integers(1, 8))
    x_shape = [draw(st.integers(1, 3)) for _ in range(rank - 1)] + [inp]
    nodes, inits = _weight_nodes("W", _floats(rng, (inp, out)), draw(st.booleans()))
    nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"]))
    return _one_layer_model(nodes, x_shape, rank, inits), _floats(rng, x_shape), inp


# ------------------------------------------------------------------------------------------------ fuzz graphs

OPSETS = (7, 9, 11, 13, 17, 21, 24)
# cast16: a float32 graph whose weights are float16 behind Cast nodes; float32 drawn more often, as exporters do
DTYPES = ("float32", "float32", "float32", "float16", "cast16")


@dataclass
class Value:
    """A tensor of the graph under construction: its name, concrete shape, and which of its dims are dynamic."""

    name: str
    shape: tuple[int, ...]
    dynamic: tuple[bool, ...]


@dataclass(frozen=True)
class FuzzModel:
    """A generated model with what the tests need to run it: a concrete shape per input and the dims left dynamic."""

    model: onnx.ModelProto
    input_name: str
    input_shape: tuple[int, ...]  # concrete sizes to run it with
    input_dtype: np.dtype
    dynamic_dims: tuple[int, ...]  # indices of the input's dims declared dynamic
    description: str


@dataclass
class _Builder:
    draw: object
    rng: np.random.Generator
    dtype: str
    opset: int
    nonfinite: bool = False  # put NaN or infinity into some constants, as a damaged file or a bad export does
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    values: list = field(default_factory=list)  # every Value made so far, in order
    weights: dict = field(default_factory=dict)  # shape -> name of a weight that can be shared
    convs: dict = field(default_factory=dict)  # input channels -> (c_out, group, kernel, weight) of an earlier Conv
    steps: list = field(default_factory=list)
    counter: int = 0

    @property
    def np_dtype(self):
        return np.float16 if self.dtype == "float16" else np.float32

    @property
    def elem_type(self) -> int:
        return TensorProto.FLOAT16 if self.dtype == "float16" else TensorProto.FLOAT

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}_{self.counter}"

    def add(self, op: str, inputs: list[str], shape, dynamic, **attrs) -> Value:
        name = self.fresh(op.lower())
        # some nodes unnamed (duplicated names are valid ONNX, but onnxruntime refuses them: see test_fuzz)
        node_name = "" if self.draw(st.integers(0, 9)) == 0 else f"{op}_{self.counter}"
        self.nodes.append(helper.make_node(op, inputs, [name], name=node_name, **attrs))
        value = Value(name, tuple(shape), tuple(dynamic))
        self.values.append(value)
        self.steps.append(op)
        return value

    def constant(self, array: np.ndarray, *, weight: bool = False, shareable: bool = False) -> str:
        """`array` as an initializer or a Constant node; weights may be float16 behind a Cast, or shared."""
        key = (array.shape, weight)
        if shareable and key in self.weights and self.draw(st.booleans()):
            self.steps.append("shared")
            return self.weights[key]
        name = self.fresh("w" if weight else "c")
        if self.nonfinite and array.size and self.draw(st.integers(0, 3)) == 0:
            array = array.copy()
            array.flat[self.draw(st.integers(0, array.size - 1))] = self.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            self.steps.append("nonfinite")
        half = self.dtype == "float16" or (self.dtype == "cast16" and weight)
        stored = array.astype(np.float16 if half else np.float32)
        tensor = numpy_helper.from_array(stored, name if not (self.dtype == "cast16" and weight) else name + "_h")
        if self.draw(st.integers(0, 3)) == 0:
            self.nodes.append(helper.make_node("Constant", [], [tensor.name], name=f"const_{tensor.name}", value=tensor))
        else:
            self.initializers.append(tensor)
        if self.dtype == "cast16" and weight:
            self.nodes.append(helper.make_node("Cast", [tensor.name], [name], name=f"cast_{name}", to=TensorProto.FLOAT))
        if shareable:
            self.weights[key] = name
        return name

    def int64s(self, values) -> str:
        name = self.fresh("shape")
        self.initializers.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def normal(self, *shape: int, scale: float | None = None) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = scale if scale is not None else np.sqrt(2.0 / max(fan_in, 1))
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ------------------------------------------------------------------------------------------------------ conv stage


def _conv(b: _Builder, x: Value) -> Value:
    draw = b.draw
    c_in = x.shape[1]
    reuse = b.convs.get(c_in) if draw(st.booleans()) else None  # the same weight again, as weight sharing does
    if reuse:
        c_out, group, kernel, weight = reuse
        b.steps.append("shared")
    else:
        c_out = draw(st.sampled_from([c_in, draw(st.integers(1, 12))]))
        common = [g for g in _divisors(c_in) if c_out % g == 0 and g > 1]
        group = draw(st.sampled_from(common)) if common and draw(st.integers(0, 3)) == 0 else 1
        kernel = [draw(st.integers(1, 3)) for _ in x.shape[2:]]
    strides, dilations, pads = [], [], []
    for i, size in enumerate(x.shape[2:]):
        s, d = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        pb, pe = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        if size + pb + pe < d * (kernel[i] - 1) + 1:  # the kernel would not fit: pad it
            d, pb = 1, kernel[i]
        strides.append(s)
        dilations.append(d)
        pads.append((pb, pe))
    attrs = {"strides": strides, "dilations": dilations, "pads": [p[0] for p in pads] + [p[1] for p in pads]}
    if draw(st.booleans()):
        attrs["kernel_shape"] = kernel
    if group > 1:
        attrs["group"] = group
    if not reuse:
        weight = b.constant(b.normal(c_out, c_in // group, *kernel), weight=True)
        b.convs[c_in] = (c_out, group, kernel, weight)
    inputs = [x.name, weight]
    if draw(st.booleans()):
        inputs.append(b.constant(b.normal(c_out, scale=0.1), weight=True))
    spatial = [(n + pb + pe - d * (k - 1) - 1) // s + 1 for n, k, s, d, (pb, pe) in
               zip(x.shape[2:], kernel, strides, dilations, pads)]
    y = b.add("Conv", inputs, (x.shape[0], c_out, *spatial), x.dynamic[:1] + (False,) + x.dynamic[2:], **attrs)
    if draw(st.integers(0, 2)) == 0:
        params = [b.constant(b.rng.uniform(lo, hi, c_out).astype(np.float32)) for lo, hi in
                  ((0.5, 1.5), (-0.5, 0.5), (-0.5, 0.5), (0.5, 1.5))]
        y = b.add("BatchNormalization", [y.name, *params], y.shape, y.dynamic, epsilon=1e-5)
    return y


def _same_shape(b: _Builder, x: Value) -> Value | None:
    """An earlier tensor with exactly x's shape (for a residual Add or a Concat), if any."""
    others = [v for v in b.values if v.shape == x.shape and v.dynamic == x.dynamic and v.name != x.name]
    return b.draw(st.sampled_from(others)) if others else None


def _elementwise(b: _Builder, x: Value, channel_axis: int) -> Value:
    """Relu, Sigmoid, Softmax, Mul or Add by a constant, residual Add, or Concat; all keep the rank."""
    draw = b.draw
    kind = draw(st.sampled_from(["Relu", "Sigmoid", "Softmax", "MulConst", "AddConst", "Residual", "Concat"]))
    if kind in ("Relu", "Sigmoid"):
        return b.add(kind, [x.name], x.shape, x.dynamic)
    if kind == "Softmax":
        return b.add("Softmax", [x.name], x.shape, x.dynamic, axis=channel_axis)  # axis >= 0: opsets < 11
    if kind in ("MulConst", "AddConst"):
        rank, axis = len(x.shape), channel_axis % len(x.shape)
        if draw(st.booleans()):
            shape = (1,)
        else:
            shape = tuple(x.shape[axis] if i == axis else 1 for i in range(axis, rank))
        c = b.constant(b.rng.uniform(0.5, 1.5, shape).astype(np.float32))
        return b.add("Mul" if kind == "MulConst" else "Add", [x.name, c], x.shape, x.dynamic)
    other = _same_shape(b, x) or x
    if kind == "Residual":
        return b.add("Add", [x.name, other.name], x.shape, x.dynamic)
    axis = channel_axis % len(x.shape)
    shape = tuple(2 * n if i == axis else n for i, n in enumerate(x.shape))
    return b.add("Concat", [x.name, other.name], shape, x.dynamic, axis=axis)


def _conv_stage(b: _Builder, x: Value, steps: int) -> Value:
    for _ in range(steps):
        kind = b.draw(st.sampled_from(["conv", "conv", "conv", "elementwise", "elementwise", "transpose"]))
        if kind == "conv":
            x = _conv(b, x)
        elif kind == "transpose" and len(x.shape) == 4:
            perm = (0, 1, 3, 2)
            x = b.add("Transpose", [x.name], [x.shape[i] for i in perm], [x.dynamic[i] for i in perm], perm=perm)
        else:
            x = _elementwise(b, x, 1)
    return x


def _to_dense(b: _Builder, x: Value) -> Value:
    """Conv activations (N, C, ...) to (N, features) by Flatten or Reshape, or to (N, positions, C)."""
    rest = int(np.prod(x.shape[1:]))
    rest_dynamic = any(x.dynamic[1:])
    kind = b.draw(st.sampled_from(["Flatten", "Reshape", "Tokens"]))
    if kind == "Flatten":
        return b.add("Flatten", [x.name], (x.shape[0], rest), (x.dynamic[0], rest_dynamic), axis=1)
    if kind == "Reshape":
        return b.add("Reshape", [x.name, b.int64s([0, -1])], (x.shape[0], rest), (x.dynamic[0], rest_dynamic))
    positions = int(np.prod(x.shape[2:]))
    flat = b.add("Reshape", [x.name, b.int64s([0, x.shape[1], -1])], (x.shape[0], x.shape[1], positions),
                 (x.dynamic[0], False, any(x.dynamic[2:])))
    return b.add("Transpose", [flat.name], (x.shape[0], positions, x.shape[1]),
                 (x.dynamic[0], any(x.dynamic[2:]), False), perm=(0, 2, 1))


# ----------------------------------------------------------------------------------------------------- dense stage


def _gemm(b: _Builder, x: Value) -> Value:
    draw = b.draw
    m, k = x.shape
    n = draw(st.sampled_from([k, draw(st.integers(1, 24))]))
    trans_b = draw(st.integers(0, 1))
    w = b.normal(n, k)
    attrs = {}
    if trans_b:
        attrs["transB"] = 1
    if draw(st.booleans()):
        attrs["alpha"] = draw(st.sampled_from([0.5, 2.0]))
    inputs = [x.name, b.constant(w if trans_b else w.T.copy(), weight=True, shareable=True)]
    bias_shapes = [None, (n,), (1, n), (1,), ()] if b.opset >= 11 else [(n,), (1, n)]  # C optional from opset 11
    if not x.dynamic[0]:
        bias_shapes.append((m, n))
    bias = draw(st.sampled_from(bias_shapes))
    if bias is not None:
        if draw(st.booleans()):
            attrs["beta"] = draw(st.sampled_from([0.0, 0.5, 2.0]))
        inputs.append(b.constant((0.1 * b.rng.standard_normal(bias)).astype(np.float32), weight=True))
    return b.add("Gemm", inputs, (m, n), (x.dynamic[0], False), **attrs)


def _matmul(b: _Builder, x: Value) -> Value:
    draw = b.draw
    n = draw(st.sampled_from([x.shape[-1], draw(st.integers(1, 24))]))
    if len(x.shape) == 3 and not x.dynamic[1] and draw(st.integers(0, 4)) == 0:  # weight on the left: W (n, L) @ x
        w = b.constant(b.normal(n, x.shape[1]), weight=True, shareable=True)
        return b.add("MatMul", [w, x.name], (x.shape[0], n, x.shape[2]), (x.dynamic[0], False, x.dynamic[2]))
    w = b.constant(b.normal(n, x.shape[-1]).T.copy(), weight=True, shareable=True)
    return b.add("MatMul", [x.name, w], (*x.shape[:-1], n), (*x.dynamic[:-1], False))


def _dense_stage(b: _Builder, x: Value, steps: int) -> Value:
    for _ in range(steps):
        kinds = ["matmul", "matmul", "elementwise", "elementwise", "reshape"] + (
            ["gemm", "gemm", "gemm"] if len(x.shape) == 2 else ["transpose"])
        kind = b.draw(st.sampled_from(kinds))
        if x.dynamic[-1] and kind in ("matmul", "gemm", "reshape", "transpose"):
            kind = "flatten-safe"  # a dynamic feature width cannot meet a constant weight
        if kind == "gemm":
            x = _gemm(b, x)
        elif kind == "matmul":
            x = _matmul(b, x)
        elif kind == "transpose":
            x = b.add("Transpose", [x.name], (x.shape[0], x.shape[2], x.shape[1]),
                      (x.dynamic[0], x.dynamic[2], x.dynamic[1]), perm=(0, 2, 1))
        elif kind == "reshape" and len(x.shape) == 3:
            x = b.add("Reshape", [x.name, b.int64s([0, -1])], (x.shape[0], x.shape[1] * x.shape[2]),
                      (x.dynamic[0], any(x.dynamic[1:])))
        elif kind == "reshape":
            splits = [d for d in _divisors(x.shape[1]) if 1 < d < x.shape[1]] or [1]
            a = b.draw(st.sampled_from(splits))
            x = b.add("Reshape", [x.name, b.int64s([0, a, -1])], (x.shape[0], a, x.shape[1] // a),
                      (x.dynamic[0], False, False))
        else:
            x = _elementwise(b, x, len(x.shape) - 1)
    return x


# ------------------------------------------------------------------------------------------------------ the model


def _value_info(name: str, value: Value, elem_type: int) -> onnx.ValueInfoProto:
    dims = [("N" if i == 0 else None) if dyn else n for i, (n, dyn) in enumerate(zip(value.shape, value.dynamic))]
    return helper.make_tensor_value_info(name, elem_type, dims)


@st.composite
def fuzz_models(draw, nonfinite: bool = False) -> FuzzModel:
    """A random valid model (see the module docstring); passes `onnx.checker.check_model(full_check=True)`.

    With `nonfinite`, some constants (weights or not) hold a NaN or an infinity.
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from(DTYPES))
    opset = draw(st.sampled_from(OPSETS))
    dynamic_batch = draw(st.booleans())
    b = _Builder(draw, rng, dtype, opset, nonfinite)
    batch = draw(st.integers(1, 3))
    family = draw(st.sampled_from(["conv1d", "conv2d", "dense2d", "dense3d"]))
    if family.startswith("conv"):
        nd = 1 if family == "conv1d" else 2
        shape = (batch, draw(st.integers(1, 8)), *[draw(st.integers(3, 10)) for _ in range(nd)])
    else:
        shape = (batch, draw(st.integers(1, 24))) if family == "dense2d" else (batch, draw(st.integers(1, 6)),
                                                                                draw(st.integers(1, 24)))
    dynamic = [dynamic_batch] + [False] * (len(shape) - 1)
    if family.startswith("conv") and draw(st.integers(0, 5)) == 0:
        dynamic[-1] = True  # a dynamic spatial size: nothing says which size to verify with
    x = Value("x", shape, tuple(dynamic))
    b.values.append(x)
    if family.startswith("conv"):
        y = _conv_stage(b, x, draw(st.integers(1, 5)))
        if draw(st.booleans()):
            y = _dense_stage(b, _to_dense(b, y), draw(st.integers(0, 4)))
    else:
        y = _dense_stage(b, x, draw(st.integers(1, 6)))
    outputs = [y]
    extra = [v for v in b.values[1:-1] if v.name != y.name]
    if extra and draw(st.integers(0, 3)) == 0:
        outputs.append(draw(st.sampled_from(extra)))
    # a graph output must be produced under its own name: rename the producer's output
    out_infos = []
    for i, value in enumerate(outputs):
        out_name = f"out{i}"
        b.nodes.append(helper.make_node("Identity", [value.name], [out_name], name=f"identity_{i}"))
        out_infos.append(_value_info(out_name, value, b.elem_type))
    if b.draw(st.booleans()):  # let the last layer's own output be a graph output, without the Identity
        last = b.nodes.pop()
        if len(outputs) == 1:
            for node in b.nodes:
                for j, name in enumerate(node.output):
                    if name == last.input[0]:
                        node.output[j] = last.output[0]
                for j, name in enumerate(node.input):
                    if name == last.input[0]:
                        node.input[j] = last.output[0]
        else:
            b.nodes.append(last)
    graph = helper.make_graph(b.nodes, "fuzz", [_value_info("x", x, b.elem_type)], out_infos,
                              initializer=b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fuzz",
                              ir_version=min(helper.find_min_ir_version_for([helper.make_opsetid("", opset)]) + 1, 11))
    if draw(st.booleans()):  # value_info for every intermediate tensor, as most exporters write
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        b.steps.append("+value_info")
    onnx.checker.check_model(model, full_check=True)
    description = f"{family} {dtype} opset {opset} input {shape} dynamic {tuple(dynamic)}: {' '.join(b.steps)}"
    return FuzzModel(model, "x", shape, np.dtype(b.np_dtype), tuple(i for i, d in enumerate(dynamic) if d),
                     description)


# -------------------------------------------------------------------------------------------------- corruptions


@st.composite
def corruptions(draw, data: bytes) -> tuple[str, bytes]:
    """(what was done, corrupted bytes) of a serialized model: truncated, bytes flipped, garbage inserted, or emptied."""
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "empty", "garbage", "overwrite"]))
    if kind == "empty" or not data:
        return "empty", b""
    if kind == "truncate":
        at = draw(st.integers(1, len(data) - 1))
        return f"truncate at {at}", data[:at]
    if kind == "flip":
        out = bytearray(data)
        spots = draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8))
        for spot in spots:
            out[spot] ^= draw(st.integers(1, 255))
        return f"flip {spots}", bytes(out)
    if kind == "insert":
        at = draw(st.integers(0, len(data)))
        junk = draw(st.binary(min_size=1, max_size=64))
        return f"insert {junk!r} at {at}", data[:at] + junk + data[at:]
    if kind == "overwrite":  # a run of zero bytes, as a torn write leaves
        at = draw(st.integers(0, len(data) - 1))
        size = draw(st.integers(1, 256))
        return f"zero {size} bytes at {at}", data[:at] + bytes(min(size, len(data) - at)) + data[at + size:]
    return "garbage", draw(st.binary(min_size=1, max_size=256))
