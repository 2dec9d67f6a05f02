"""Property: at full rank, `factorize_layers` reproduces the original model's onnxruntime outputs; at a random reduced
rank, the rewritten model still passes the full ONNX checker and runs.

Random tiny Conv (1-D/2-D, any strides, pads, dilations, auto_pad, bias, following BatchNormalization, weight as
initializer or Constant node), Gemm (transB, alpha, beta, every C shape) and MatMul (activation rank 2..4) graphs, with
k drawn among the divisors of the input width. Layers come from `discover`, factors from `svd.factorize`.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.stages.discover import discover
from onnx_lowrank.passes import factorize_layers
from onnx_lowrank.math.svd import factorize, max_rank

SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def make_model(nodes, input_shape, output_rank, initializers) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [f"y{i}" for i in range(output_rank)])
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def weight_nodes(name: str, array: np.ndarray, as_constant: bool) -> tuple[list, list]:
    """(nodes, initializers) that provide `array` under `name`."""
    tensor = numpy_helper.from_array(array.astype(np.float32), name)
    if as_constant:
        return [helper.make_node("Constant", [], [name], value=tensor)], []
    return [], [tensor]


def floats(rng: np.random.Generator, shape, low=-1.0, high=1.0) -> np.ndarray:
    return rng.uniform(low, high, shape).astype(np.float32)


def width(draw) -> int:
    """An input width up to 12, drawn as a product so that it usually has divisors to pick k > 1 from."""
    return draw(st.integers(1, 4)) * draw(st.integers(1, 3))


@st.composite
def conv_graphs(draw, has_bn: bool) -> tuple[onnx.ModelProto, np.ndarray, int]:
    """A Conv, maybe followed by a BatchNormalization; returns (model, input, input channels)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    nd = draw(st.sampled_from([1, 2]))
    c_in, c_out = width(draw), draw(st.integers(1, 6))
    kernel = draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))
    strides = draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))
    auto_pad = draw(st.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    # onnxruntime refuses dilations with SAME_* padding, even in the original model
    max_dilation = 1 if auto_pad.startswith("SAME") else 2
    dilations = draw(st.lists(st.integers(1, max_dilation), min_size=nd, max_size=nd))
    attrs = dict(strides=strides, dilations=dilations, auto_pad=auto_pad)
    if auto_pad == "NOTSET":
        attrs["pads"] = draw(st.lists(st.integers(0, 2), min_size=2 * nd, max_size=2 * nd))
    if draw(st.booleans()):
        attrs["kernel_shape"] = kernel
    spatial = [d * (k - 1) + 1 + draw(st.integers(0, 5)) for k, d in zip(kernel, dilations)]
    has_bias, as_constant = draw(st.booleans()), draw(st.booleans())

    nodes, inits = weight_nodes("W", floats(rng, (c_out, c_in, *kernel)), as_constant)
    conv_inputs = ["x", "W"]
    if has_bias:
        inits.append(numpy_helper.from_array(floats(rng, c_out), "B"))
        conv_inputs.append("B")
    nodes.append(helper.make_node("Conv", conv_inputs, ["conv" if has_bn else "y"], **attrs))
    if has_bn:
        for name, low, high in (("gamma", 0.5, 1.5), ("beta", -1, 1), ("mean", -1, 1), ("var", 0.5, 2.0)):
            param_nodes, param_inits = weight_nodes(name, floats(rng, c_out, low, high), draw(st.booleans()))
            nodes = param_nodes + nodes
            inits += param_inits
        nodes.append(helper.make_node("BatchNormalization", ["conv", "gamma", "beta", "mean", "var"], ["y"]))
    x_shape = [draw(st.integers(1, 2)), c_in, *spatial]
    return make_model(nodes, x_shape, 2 + nd, inits), floats(rng, x_shape), c_in


C_SHAPES = ["absent", "scalar", "out", "1,out", "n,out"]


@st.composite
def gemm_graphs(draw) -> tuple[onnx.ModelProto, np.ndarray, int]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n, inp, out = draw(st.integers(1, 4)), width(draw), draw(st.integers(1, 8))
    trans_b = draw(st.integers(0, 1))
    alpha, beta = draw(st.floats(-2, 2)), draw(st.floats(-2, 2))
    c_shape = draw(st.sampled_from(C_SHAPES))
    nodes, inits = weight_nodes("W", floats(rng, (out, inp) if trans_b else (inp, out)), draw(st.booleans()))
    inputs = ["x", "W"]
    if c_shape != "absent":
        shape = {"scalar": (), "out": (out,), "1,out": (1, out), "n,out": (n, out)}[c_shape]
        inits.append(numpy_helper.from_array(floats(rng, shape), "C"))
        inputs.append("C")
    nodes.append(helper.make_node("Gemm", inputs, ["y"], transB=trans_b, alpha=alpha, beta=beta))
    return make_model(nodes, [n, inp], 2, inits), floats(rng, (n, inp)), inp


@st.composite
def matmul_graphs(draw) -> tuple[onnx.ModelProto, np.ndarray, int]:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rank = draw(st.integers(2, 4))
    inp, out = width(draw), draw(st.integers(1, 8))
    x_shape = [draw(st.integers(1, 3)) for _ in range(rank - 1)] + [inp]
    nodes, inits = weight_nodes("W", floats(rng, (inp, out)), draw(st.booleans()))
    nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"]))
    return make_model(nodes, x_shape, rank, inits), floats(rng, x_shape), inp


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def check_property(graph: tuple[onnx.ModelProto, np.ndarray, int], data: st.DataObject) -> None:
    model, x, width = graph
    (layer,) = discover(model).layers
    has_bn = any(node.op_type == "BatchNormalization" for node in model.graph.node)
    assert (layer.batchnorm_output is not None) == has_bn
    k = data.draw(st.sampled_from([d for d in range(1, width + 1) if width % d == 0]), label="k")
    full = max_rank(*layer.matrix_shape, k)
    event("grouped (k > 1)" if k > 1 else "k = 1")

    rewritten, count = factorize_layers(model, [(layer, factorize(layer.read_matrix(), k, full))])
    assert count == 1
    onnx.checker.check_model(rewritten, full_check=True)
    want = run(model, x)
    got = run(rewritten, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max(initial=0))))

    rank = data.draw(st.integers(1, full), label="reduced rank")
    reduced, _ = factorize_layers(model, [(layer, factorize(layer.read_matrix(), k, rank))])
    onnx.checker.check_model(reduced, full_check=True)
    assert run(reduced, x).shape == want.shape


@settings(SETTINGS, max_examples=SETTINGS.max_examples // 2)
@given(conv_graphs(has_bn=False), st.data())
def test_conv_full_rank_reproduces_original(graph, data):
    check_property(graph, data)


@settings(SETTINGS, max_examples=SETTINGS.max_examples // 2)
@given(conv_graphs(has_bn=True), st.data())
def test_conv_batchnorm_full_rank_reproduces_original(graph, data):
    check_property(graph, data)


@SETTINGS
@given(gemm_graphs(), st.data())
def test_gemm_full_rank_reproduces_original(graph, data):
    check_property(graph, data)


@SETTINGS
@given(matmul_graphs(), st.data())
def test_matmul_full_rank_reproduces_original(graph, data):
    check_property(graph, data)
