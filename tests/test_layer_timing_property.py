"""Timing works on every layer the rewrites handle: any Conv geometry (1-D/2-D, strides, pads, dilations,
auto_pad, a folded BatchNormalization, Constant-node weights), any Gemm (transB, alpha, beta, every C shape) and
MatMul of any activation rank. The guard is on by default, so a layer onnxruntime cannot run alone would break
`compress` for every user of such a model."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from helpers.strategies import conv_graphs, gemm_graphs, matmul_graphs

from onnx_lowrank import api

from onnx_lowrank.stages import layer_timing

GRAPHS = st.one_of(conv_graphs(has_bn=False), conv_graphs(has_bn=True), gemm_graphs(), matmul_graphs())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(graph=GRAPHS)
def test_every_rewritable_layer_can_be_timed(graph, monkeypatch):
    monkeypatch.setattr(layer_timing, "ROUNDS", 1)
    model, x, _ = graph
    analysis = api.analyze(model, inputs=[{"x": x}], weight_only=True, threads=1, latency_cache=False)
    assert analysis.guarded and len(analysis.layers) == 1
    entry = analysis.layers[0]
    latency = analysis.costs["latency"]
    assert entry.dense["latency"] > 0 and latency.total > 0
    for k, form in latency.timings[entry.layer.name].forms.items():
        assert all(ms > 0 and rank % form.aligned_to == 0 for rank, ms in form.points)
        assert k in entry.decompositions
