"""Property: at full rank, `factorize_layers` reproduces the original model's onnxruntime outputs; at a random reduced
rank, the rewritten model still passes the full ONNX checker and runs.

Random tiny Conv (1-D/2-D, any strides, pads, dilations, auto_pad, bias, following BatchNormalization, weight as
initializer or Constant node), Gemm (transB, alpha, beta, every C shape) and MatMul (activation rank 2..4) graphs, with
k drawn among the divisors of the input width (the strategies of helpers.strategies). Layers come from `discover`,
factors from `svd.factorize`.
"""

from __future__ import annotations

import numpy as np
import onnx
from helpers.running import run
from helpers.strategies import conv_graphs, gemm_graphs, matmul_graphs
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from onnx_lowrank.stages.discover import discover
from onnx_lowrank.passes import factorize_layers
from onnx_lowrank.math.svd import factorize, max_rank

SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


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
    want = run(model, {"x": x}, threads=1)[0]
    got = run(rewritten, {"x": x}, threads=1)[0]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max(initial=0))))

    rank = data.draw(st.integers(1, full), label="reduced rank")
    reduced, _ = factorize_layers(model, [(layer, factorize(layer.read_matrix(), k, rank))])
    onnx.checker.check_model(reduced, full_check=True)
    assert run(reduced, {"x": x}, threads=1)[0].shape == want.shape


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
