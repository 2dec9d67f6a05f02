"""The rewrite passes with a bias correction (`Factors.shift`), checked in onnxruntime against a numpy reference.

Reference: the original model run with the layer's weight replaced by reconstruct(factors) (in the stored layout,
BatchNormalization scale divided out when it is folded), then the shift added to the layer's output in numpy (for a
Gemm, alpha * shift: the layer is Y = alpha (W x + beta/alpha C), and the shift lives in W x's space), then what
follows the layer (a Neg, or an unfolded BatchNormalization) applied in numpy.

Every written model passes the full ONNX checker, and the parameter change `cost.factorized_params(..., True)`
predicts equals the one `cost.model_params` counts. At full rank, data-aware factors (OutputDecomposition on
statistics from collect_statistics) reproduce the original outputs.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import pytest
from helpers.builders import make_model, rng_for, tensor, weights, with_outputs
from helpers.running import run
from helpers.strategies import conv_graphs
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import helper

from onnx_lowrank.stages import costs as cost
from onnx_lowrank.stages.calibrate import collect_statistics
from onnx_lowrank.math.decomposition import WeightDecomposition
from onnx_lowrank.ops.layer import Layer
from onnx_lowrank.stages.discover import discover
from onnx_lowrank.passes import factorize_layers
from onnx_lowrank.math.projection import OutputDecomposition
from onnx_lowrank.math.svd import Factors, reconstruct

BN_EPSILON = 1e-3


# ----------------------------------------------------------------------------------------------------------- helpers


def bn_affine(model: onnx.ModelProto, bn_inputs) -> tuple[np.ndarray, np.ndarray]:
    arrays = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    gamma, beta, mean, var = (arrays[name] for name in bn_inputs)
    scale = gamma / np.sqrt(var + BN_EPSILON)
    return scale, beta - mean * scale


def replace_initializer(model: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, t in enumerate(copy.graph.initializer):
        if t.name == name:
            copy.graph.initializer[index].CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), name))
            return copy
    raise KeyError(name)


def node_producing(model: onnx.ModelProto, output: str) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if n.output and n.output[0] == output]
    return node


def stored_weight(model: onnx.ModelProto, layer: Layer, w_hat: np.ndarray) -> np.ndarray:
    """W_hat (out, in), the effective matrix, in the layout and units the model stores the weight in."""
    node = node_producing(model, layer.node_output)
    if layer.op == "Conv":
        if layer.batchnorm_output:
            bn = node_producing(model, layer.batchnorm_output)
            scale, _ = bn_affine(model, bn.input[1:5])
            w_hat = w_hat / scale[:, None]
        return w_hat.reshape(layer.weight_shape)
    if layer.op == "Gemm":
        trans_b = {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("transB", 0)
        return w_hat if trans_b else w_hat.T
    return w_hat.T


def gemm_alpha(model: onnx.ModelProto, layer: Layer) -> float:
    if layer.op != "Gemm":
        return 1.0
    return {a.name: helper.get_attribute_value(a) for a in node_producing(model, layer.node_output).attribute}.get(
        "alpha", 1.0)


def reference(model: onnx.ModelProto, layer: Layer, factors: Factors, x: np.ndarray, tail) -> np.ndarray:
    """The original model with W replaced by reconstruct(factors) and the shift added to the layer's output."""
    replaced = replace_initializer(model, layer.weight_name, stored_weight(model, layer, reconstruct(factors)))
    out = run(with_outputs(replaced, [layer.output]), {"x": x})[-1].astype(np.float64)
    shift = np.zeros(layer.out_channels) if factors.shift is None else factors.shift
    shift = gemm_alpha(model, layer) * shift
    if layer.op == "Conv":
        out = out + shift.reshape(-1, *[1] * (out.ndim - 2))
    else:
        out = out + shift
    return tail(out)


def close(got: np.ndarray, want: np.ndarray, rtol: float) -> None:
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1e-6, float(np.abs(want).max(initial=0))))


def assert_params_exact(model, written, layer, k, rank, bias_correction=True) -> None:
    predicted = cost.model_params(model) - cost.dense_params(layer) + cost.factorized_params(
        layer, k, rank, bias_correction=bias_correction)
    assert cost.model_params(written) == predicted


def count_ops(model: onnx.ModelProto, op: str) -> int:
    return sum(node.op_type == op for node in model.graph.node)


def only_layer(model: onnx.ModelProto) -> Layer:
    (layer,) = discover(model).layers
    return layer


def data_aware_factors(model, layer, k, seed, rank=None, samples=3):
    rng = rng_for(seed)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    feeds = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(samples)]
    stats = collect_statistics(model, [layer], feeds)[layer.name]
    decomposition = OutputDecomposition(layer.read_matrix(), stats, k, bias=layer.bias)
    return decomposition.factors(rank or decomposition.max_rank)


# ------------------------------------------------------------------------------------------------------------ models


def neg(v):
    return -v


@dataclass(frozen=True)
class Case:
    model: onnx.ModelProto
    tail: Callable[[np.ndarray], np.ndarray]  # what follows the layer's output, in numpy
    folds: bool  # the shift is folded into a bias (no Add node is written)


def conv_case(bias: str, bn: bool, wide: bool = False, seed: int = 0) -> Case:
    """x (2, 4, 7, 6) -> Conv [-> BatchNormalization] -> Neg -> y. bias: none, const or runtime (Identity of an
    initializer). `wide`: 1x1 kernel with 10 output channels (more outputs than a group's inputs)."""
    rng = rng_for(seed)
    out = 10 if wide else 6
    kernel = (1, 1) if wide else (3, 3)
    init = {"w": weights(rng, out, 4, *kernel)}
    nodes = []
    inputs = ["x", "w"]
    if bias == "const":
        init["b"] = rng.standard_normal(out).astype(np.float32)
        inputs.append("b")
    elif bias == "runtime":
        init["b0"] = rng.standard_normal(out).astype(np.float32)
        nodes.append(helper.make_node("Identity", ["b0"], ["b"], name="bias_identity"))
        inputs.append("b")
    attrs = {} if wide else dict(strides=[2, 1], pads=[1, 0, 1, 2])
    nodes.append(helper.make_node("Conv", inputs, ["c"], name="conv", **attrs))
    tail = neg
    if bn:
        init.update({
            "gamma": rng.uniform(0.5, 1.5, out).astype(np.float32),
            "beta": rng.standard_normal(out).astype(np.float32),
            "mean": rng.standard_normal(out).astype(np.float32),
            "var": rng.uniform(0.5, 1.5, out).astype(np.float32),
        })
        nodes.append(helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], name="bn",
                                      epsilon=BN_EPSILON))
        nodes.append(helper.make_node("Neg", ["n"], ["y"], name="neg"))
        if bias == "runtime":  # the BN is not folded: it follows the layer in the reference
            scale = init["gamma"] / np.sqrt(init["var"].astype(np.float64) + BN_EPSILON)
            shift = init["beta"] - init["mean"] * scale

            def tail(v, scale=scale, shift=shift):
                return -(v * scale[:, None, None] + shift[:, None, None])
    else:
        nodes.append(helper.make_node("Neg", ["c"], ["y"], name="neg"))
    model = make_model(nodes, [tensor("x", [2, 4, 7, 6])], [tensor("y", [None] * 4)], init)
    return Case(model, tail, folds=bias != "runtime")


def gemm_case(c: str, alpha: float = 1.0, beta: float = 1.0, trans_b: int = 1, out: int = 5, seed: int = 0) -> Case:
    """x (3, 8) -> Gemm -> y. c: none, out, 1,out, scalar, n,out, runtime (Identity of an (out,) initializer)."""
    rng = rng_for(seed)
    w = weights(rng, out, 8)
    init = {"w": w if trans_b else w.T.copy()}
    nodes = []
    inputs = ["x", "w"]
    if c in ("out", "1,out", "scalar", "n,out"):
        shape = {"out": (out,), "1,out": (1, out), "scalar": (), "n,out": (3, out)}[c]
        init["c"] = np.asarray(rng.standard_normal(shape), dtype=np.float32)
        inputs.append("c")
    elif c == "runtime":
        init["c0"] = rng.standard_normal(out).astype(np.float32)
        nodes.append(helper.make_node("Identity", ["c0"], ["c"], name="c_identity"))
        inputs.append("c")
    nodes.append(helper.make_node("Gemm", inputs, ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta))
    model = make_model(nodes, [tensor("x", [3, 8])], [tensor("y", [3, out])], init)
    return Case(model, lambda v: v, folds=c in ("none", "out", "1,out", "scalar"))


def matmul_case(seed: int = 0) -> Case:
    """x (2, 3, 8) -> MatMul (8 -> 6) -> Neg -> y."""
    rng = rng_for(seed)
    init = {"w": weights(rng, 6, 8).T.copy()}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), helper.make_node("Neg", ["m"], ["y"])]
    model = make_model(nodes, [tensor("x", [2, 3, 8])], [tensor("y", [2, 3, 6])], init)
    return Case(model, neg, folds=False)


CASES = {
    "conv no bias": lambda: conv_case("none", bn=False),
    "conv const bias": lambda: conv_case("const", bn=False),
    "conv runtime bias": lambda: conv_case("runtime", bn=False),
    "conv+bn": lambda: conv_case("none", bn=True),
    "conv const bias+bn": lambda: conv_case("const", bn=True),
    "conv runtime bias+bn (not folded)": lambda: conv_case("runtime", bn=True),
    "conv 1x1 wide no bias": lambda: conv_case("none", bn=False, wide=True),
    "conv 1x1 wide const bias": lambda: conv_case("const", bn=False, wide=True),
    "gemm no C": lambda: gemm_case("none", alpha=1.5),
    "gemm no C transB=0": lambda: gemm_case("none", alpha=0.5, trans_b=0),
    "gemm C (out,)": lambda: gemm_case("out", alpha=1.5, beta=-0.5, trans_b=0),
    "gemm C (1,out)": lambda: gemm_case("1,out", alpha=0.5, beta=2.0),
    "gemm C scalar": lambda: gemm_case("scalar", alpha=-0.7, beta=1.3),
    "gemm C (N,out)": lambda: gemm_case("n,out", alpha=1.5, beta=0.5),
    "gemm C runtime": lambda: gemm_case("runtime", alpha=2.0, beta=0.25),
    "gemm wide C (out,)": lambda: gemm_case("out", alpha=1.5, beta=-0.5, out=12),
    "matmul rank-3": matmul_case,
}

PARAMS = [pytest.param(name, k, id=f"{name}, k={k}") for name in CASES for k in (1, 2)]


def cached_case(name: str) -> Case:
    if name not in _BUILT:
        _BUILT[name] = CASES[name]()
    return _BUILT[name]


_BUILT: dict[str, Case] = {}


# -------------------------------------------------------------------------------------------------------------- tests


def test_cases_are_discovered_as_expected():
    expected_bias = {"conv no bias": None, "conv runtime bias": None, "gemm no C": None, "gemm C (N,out)": None,
                     "gemm C runtime": None, "matmul rank-3": None}
    for name in CASES:
        layer = only_layer(cached_case(name).model)
        if name in expected_bias:
            assert layer.bias is None, name
        if "bn" in name and "not folded" not in name:
            assert layer.batchnorm_output == "n", name
        if "not folded" in name:
            assert layer.batchnorm_output is None, name
    scalar = only_layer(cached_case("gemm C scalar").model)
    c = onnx.numpy_helper.to_array(cached_case("gemm C scalar").model.graph.initializer[1])
    np.testing.assert_allclose(scalar.bias, np.full(5, 1.3 / -0.7 * float(c)), rtol=1e-6)
    assert scalar.bias_size == 1


@pytest.mark.parametrize("name, k", PARAMS)
def test_reduced_rank_with_shift_matches_reference(name, k):
    case = cached_case(name)
    layer = only_layer(case.model)
    decomposition = WeightDecomposition(layer.read_matrix(), k)
    rank = max(1, decomposition.max_rank // 2)
    rng = rng_for(zlib.crc32(name.encode()) + k)
    shift = rng.standard_normal(layer.out_channels)
    factors = dataclasses.replace(decomposition.factors(rank), shift=shift)
    written, count = factorize_layers(case.model, [(layer, factors)])
    assert count == 1
    onnx.checker.check_model(written, full_check=True)

    x = rng.standard_normal([d.dim_value for d in case.model.graph.input[0].type.tensor_type.shape.dim])
    x = x.astype(np.float32)
    got = run(written, {"x": x})[0]
    close(got, reference(case.model, layer, factors, x, case.tail), rtol=1e-4)
    # the shift matters here: without it the output is another one
    assert not np.allclose(got, reference(case.model, layer, dataclasses.replace(factors, shift=None), x, case.tail),
                           rtol=1e-3, atol=1e-3)
    # folded into a bias, or an Add node after the layer
    assert count_ops(written, "Add") - count_ops(case.model, "Add") == (0 if case.folds else 1)
    assert_params_exact(case.model, written, layer, k, rank, bias_correction=True)

    # without a shift, the same layer is written with nothing added
    plain, _ = factorize_layers(case.model, [(layer, dataclasses.replace(factors, shift=None))])
    onnx.checker.check_model(plain, full_check=True)
    close(run(plain, {"x": x})[0], reference(case.model, layer, dataclasses.replace(factors, shift=None), x,
                                               case.tail), rtol=1e-4)
    assert count_ops(plain, "Add") == count_ops(case.model, "Add")
    assert_params_exact(case.model, plain, layer, k, rank, bias_correction=False)


@pytest.mark.parametrize("name, k", PARAMS)
def test_full_rank_data_aware_reproduces_original(name, k):
    case = cached_case(name)
    layer = only_layer(case.model)
    factors = data_aware_factors(case.model, layer, k, seed=k)
    assert factors.shift is not None and factors.shift.shape == (layer.out_channels,)
    written, _ = factorize_layers(case.model, [(layer, factors)])
    onnx.checker.check_model(written, full_check=True)
    rng = rng_for(100 + k)  # inputs the statistics never saw
    for _ in range(2):
        x = rng.standard_normal([d.dim_value for d in case.model.graph.input[0].type.tensor_type.shape.dim])
        x = x.astype(np.float32)
        close(run(written, {"x": x})[0], run(case.model, {"x": x})[0], rtol=1e-4)
    assert_params_exact(case.model, written, layer, k, factors.rank, bias_correction=True)


@pytest.mark.parametrize("name, k", [p for p in PARAMS if p.values[0] in ("conv+bn", "gemm C (1,out)", "matmul rank-3",
                                                                           "conv runtime bias")])
def test_reduced_rank_data_aware_keeps_the_output_mean(name, k):
    """On the calibration data itself, the data-aware shift keeps the mean of the layer's output exactly."""
    case = cached_case(name)
    layer = only_layer(case.model)
    rng = rng_for(7)
    shape = [d.dim_value for d in case.model.graph.input[0].type.tensor_type.shape.dim]
    feeds = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(3)]
    stats = collect_statistics(case.model, [layer], feeds, max_rows=None)[layer.name]
    factors = OutputDecomposition(layer.read_matrix(), stats, k, bias=layer.bias).factors(1)
    written, _ = factorize_layers(case.model, [(layer, factors)])
    onnx.checker.check_model(written, full_check=True)
    axis = 1 if layer.op == "Conv" else -1
    original = sum(np.moveaxis(run(with_outputs(case.model, [layer.output]), f)[-1], axis, -1)
                   .reshape(-1, layer.out_channels).astype(np.float64).sum(axis=0) for f in feeds)
    rewritten = sum(np.moveaxis(run(with_outputs(written, [layer.output]), f)[-1], axis, -1)
                    .reshape(-1, layer.out_channels).astype(np.float64).sum(axis=0) for f in feeds)
    close(rewritten / stats.count, original / stats.count, rtol=1e-4)


# -------------------------------------------------------------------------------------------------- property test

SETTINGS = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(conv_graphs(), st.integers(0, 2**16), st.data())
def test_property_conv_full_rank_data_aware_reproduces_original(graph, seed, data):
    """Any Conv of `conv_graphs` (1-D or 2-D, strides, dilations, pads or auto_pad, bias yes/no, weights as
    initializers or Constant nodes), maybe with a BatchNorm."""
    model, _, c_in = graph
    layer = only_layer(model)
    k = data.draw(st.sampled_from([d for d in range(1, c_in + 1) if c_in % d == 0]), label="k")
    event("grouped (k > 1)" if k > 1 else "k = 1")
    factors = data_aware_factors(model, layer, k, seed=seed, samples=2)
    written, _ = factorize_layers(model, [(layer, factors)])
    onnx.checker.check_model(written, full_check=True)
    x = rng_for(seed + 1).standard_normal([d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim])
    x = x.astype(np.float32)
    close(run(written, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4)
    assert_params_exact(model, written, layer, k, factors.rank, bias_correction=True)
