"""measure_latency_ratio returns sane numbers (no timing thresholds: CI machines are noisy)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank import latency
from onnx_lowrank.errors import InputDataError, InvalidOptionError
from onnx_lowrank.latency import LatencyComparison, measure_latency_ratio


def matmul_chain(ranks: tuple[int, ...]) -> onnx.ModelProto:
    """x [N, 64] through MatMuls of the given inner sizes back to 64: (64,) is dense, (16, 64) a rank-16 pair."""
    rng = np.random.default_rng(0)
    sizes = (64, *ranks)
    nodes, weights, current = [], [], "x"
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        weights.append(numpy_helper.from_array(rng.standard_normal((n_in, n_out)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"]))
        current = f"h{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


FEEDS = [{"x": np.ones((8, 64), np.float32)}, {"x": np.zeros((2, 64), np.float32)}]


def test_returns_positive_medians_and_their_ratio():
    result = measure_latency_ratio(matmul_chain((64,)), matmul_chain((16, 64)), FEEDS, repeats=5, warmup=1,
                                   threads=1, pause_s=0.0)
    assert isinstance(result, LatencyComparison)
    assert result.original_ms > 0 and result.compressed_ms > 0
    assert result.ratio == pytest.approx(result.compressed_ms / result.original_ms)
    assert set(result.to_dict()) == {"original_ms", "compressed_ms", "ratio"}


def test_interleaves_and_pauses_after_every_run(monkeypatch):
    pauses = []
    monkeypatch.setattr(latency.time, "sleep", pauses.append)
    result = measure_latency_ratio(matmul_chain((64,)), matmul_chain((64,)), FEEDS[:1], repeats=3, warmup=0)
    assert pauses == [latency.PAUSE_S] * 6  # original, pause, compressed, pause — three rounds
    assert result.original_ms > 0 and result.compressed_ms > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"repeats": 0}, "'repeats'"),
        ({"warmup": -1}, "'warmup'"),
        ({"threads": 0}, "'threads'"),
        ({"repeats": 2.5}, "'repeats'"),
        ({"pause_s": -0.1}, "'pause_s'"),
    ],
)
def test_rejects_bad_options(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        measure_latency_ratio(matmul_chain((64,)), matmul_chain((64,)), FEEDS, **kwargs)


def test_rejects_missing_or_bad_feeds():
    with pytest.raises(InputDataError, match="No samples"):
        measure_latency_ratio(matmul_chain((64,)), matmul_chain((64,)), [])
    with pytest.raises(InputDataError, match="rejected the inputs"):
        measure_latency_ratio(matmul_chain((64,)), matmul_chain((64,)), [{"x": np.ones((1, 3), np.float32)}],
                              warmup=0, pause_s=0.0)
