"""The Python API: compress / analyze / plan / apply, end to end on small models."""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.utils
import pytest
from helpers.builders import (
    CNN_LAYERS,
    build_cnn,
    build_depthwise_only,
    build_gemm,
    build_matmul,
    build_relu_only,
    initializer_arrays,
)
from helpers.files import save
from helpers.running import run

import onnx_lowrank
from onnx_lowrank import BudgetError
from onnx_lowrank import InvalidOptionError
from onnx_lowrank import LowRankError
from onnx_lowrank import Plan
from onnx_lowrank import Report
from onnx_lowrank.stages.discover import discover

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def _weight_params(model: onnx.ModelProto) -> int:
    """Independent count of the model's weight params: float initializers and Constant-node tensors."""
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in FLOAT_TYPES)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in FLOAT_TYPES:
                    total += int(np.prod(a.t.dims))
    return total


def _spectral_relative_error(w: np.ndarray, w_hat: np.ndarray) -> float:
    return float(np.linalg.norm(w - w_hat, 2) / np.linalg.norm(w, 2))


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


def _conv_effective_matrix(model: onnx.ModelProto, output: str, conv_input: str) -> np.ndarray:
    """W_hat of a factorized Conv, read from the written weights: encoder Conv(group=k) -> 1x1 decoder Conv."""
    arrays = initializer_arrays(model)
    decoder = _producer(model, output)
    encoder = _producer(model, decoder.input[0])
    assert decoder.op_type == encoder.op_type == "Conv"
    assert encoder.input[0] == conv_input
    k = next((a.i for a in encoder.attribute if a.name == "group"), 1)
    enc = arrays[encoder.input[1]].astype(np.float64)  # (k*r, c/k, *kernel)
    dec = arrays[decoder.input[1]].astype(np.float64)  # (out, k*r, 1, ...)
    r = enc.shape[0] // k
    enc = enc.reshape(k, r, -1)
    dec = dec.reshape(dec.shape[0], k * r)
    return np.concatenate([dec[:, g * r:(g + 1) * r] @ enc[g] for g in range(k)], axis=1)


def _linear_effective_matrix(model: onnx.ModelProto, x: str, y: str, features: int, rank: int) -> np.ndarray:
    """(out, in) matrix the sub-graph x -> y computes, found by running it on the identity (black box)."""
    sub = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model)).extract_model([x], [y])
    for value in list(sub.graph.input) + list(sub.graph.output):
        value.type.tensor_type.ClearField("shape")
    eye = np.eye(features, dtype=np.float32)
    zero = np.zeros_like(eye)
    if rank == 3:
        eye, zero = eye[None], zero[None]
    (on,) = run(sub, {x: eye})
    (off,) = run(sub, {x: zero})
    return (on - off).reshape(features, -1).T.astype(np.float64)


# --------------------------------------------------------------------------------------------------- return types


def test_compress_returns_model_and_report_from_path_and_proto(tmp_path):
    model = build_cnn()
    path = save(model, tmp_path / "m.onnx")
    from_proto, report = onnx_lowrank.compress(model, 0.5, allow_slower=True)
    from_path, report_path = onnx_lowrank.compress(path, 0.5, allow_slower=True)
    from_str, _ = onnx_lowrank.compress(str(path), 0.5, allow_slower=True)
    assert isinstance(from_proto, onnx.ModelProto) and isinstance(report, Report)
    assert from_proto.SerializeToString() == from_path.SerializeToString() == from_str.SerializeToString()
    assert report.plan.layers == report_path.plan.layers


def test_input_model_proto_is_not_mutated():
    model = build_cnn()
    before = model.SerializeToString()
    onnx_lowrank.compress(model, 0.5, allow_slower=True)
    onnx_lowrank.analyze(model, allow_slower=True)
    onnx_lowrank.apply(model, Plan(layers={"conv2": (2, 4)}))
    assert model.SerializeToString() == before


def test_compress_is_deterministic():
    a, ra = onnx_lowrank.compress(build_cnn(), 0.5, allow_slower=True)
    b, rb = onnx_lowrank.compress(build_cnn(), 0.5, allow_slower=True)
    assert a.SerializeToString() == b.SerializeToString()
    assert ra.plan.to_json() == rb.plan.to_json()


# ------------------------------------------------------------------------------------------------------- budget


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7, 0.9])
def test_params_budget_is_met_and_close(budget):
    model = build_cnn()
    compressed, report = onnx_lowrank.compress(model, budget, verify=False, allow_slower=True)
    assert report.before["params"] == _weight_params(model)
    assert report.after["params"] == _weight_params(compressed)
    assert report.params_ratio == pytest.approx(_weight_params(compressed) / _weight_params(model))
    assert report.params_ratio <= budget
    assert report.params_ratio >= budget - 0.04
    assert report.factorized  # something was compressed


@pytest.mark.parametrize("allocator", ["alds", "uniform", "energy"])
def test_every_allocator_meets_the_budget(allocator):
    compressed, report = onnx_lowrank.compress(build_cnn(), 0.5, allocator=allocator, verify=False, allow_slower=True)
    assert report.plan.allocator == allocator
    assert report.params_ratio <= 0.5
    assert report.params_ratio >= 0.45
    assert report.factorized
    if allocator != "alds":
        assert all(row.k == 1 for row in report.factorized)
    onnx.checker.check_model(compressed, full_check=True)


def test_unreachable_budget_raises_budget_error_naming_the_range():
    model = build_cnn()
    with pytest.raises(BudgetError) as info:
        onnx_lowrank.compress(model, 0.001, verify=False, allow_slower=True)
    message = str(info.value)
    assert isinstance(info.value, LowRankError)
    match = re.search(r"from ([0-9.]+) to 1", message)
    assert match, message
    lowest = float(match.group(1))
    assert 0 < lowest < 1
    # the range is real: just above the floor works, well below it does not
    _, report = onnx_lowrank.compress(model, min(1.0, lowest + 0.01), verify=False, allow_slower=True)
    assert report.params_ratio <= lowest + 0.01
    with pytest.raises(BudgetError):
        onnx_lowrank.compress(model, lowest * 0.9, verify=False, allow_slower=True)


@pytest.mark.parametrize("budget", [0, -0.5, 1.5, float("nan"), True])
def test_budget_outside_zero_one_is_an_option_error(budget):
    with pytest.raises(InvalidOptionError):
        onnx_lowrank.compress(build_cnn(), budget, verify=False)


def test_unknown_metric_and_allocator_are_option_errors():
    with pytest.raises(InvalidOptionError):
        onnx_lowrank.compress(build_cnn(), 0.5, metric="bytes", verify=False, allow_slower=True)
    with pytest.raises(InvalidOptionError):
        onnx_lowrank.compress(build_cnn(), 0.5, allocator="random", verify=False, allow_slower=True)


def test_budget_one_factorizes_nothing_and_says_so():
    model = build_cnn()
    compressed, report = onnx_lowrank.compress(model, 1.0, allow_slower=True)
    assert report.factorized == ()
    assert report.plan.layers == {}
    assert report.message
    assert report.params_ratio == 1.0
    assert compressed.SerializeToString() == model.SerializeToString()


def test_nothing_to_compress_returns_model_unchanged_with_message():
    model = build_relu_only()
    compressed, report = onnx_lowrank.compress(model, 0.5)
    assert compressed.SerializeToString() == model.SerializeToString()
    assert report.layers == () and report.factorized == ()
    assert report.message and "nothing" in report.message.lower()


def test_model_whose_only_layer_is_skipped_is_nothing_to_compress():
    """A model whose every Conv is skipped (here: depthwise) has nothing to compress: unchanged, with a message,
    not a BudgetError (contract: a model with nothing to compress is written unchanged, exit 0)."""
    model = build_depthwise_only()
    compressed, report = onnx_lowrank.compress(model, 0.5)
    assert compressed.SerializeToString() == model.SerializeToString()
    assert report.message and "group" in report.message


# -------------------------------------------------------------------------------------------------------- flops


def test_flops_metric_with_static_shapes():
    model = build_cnn()
    compressed, report = onnx_lowrank.compress(model, 0.5, metric="flops", allow_slower=True)
    assert report.before["flops"] and report.after["flops"]
    assert report.flops_ratio is not None
    assert report.flops_ratio <= 0.5
    assert report.flops_ratio >= 0.45
    assert report.plan.metric == "flops"
    # every row's FLOPs are known and the factorized ones went down
    assert all(row.costs["flops"][0] is not None for row in report.layers)
    assert all(row.costs["flops"][1] < row.costs["flops"][0] for row in report.factorized)


@pytest.mark.parametrize("verify", [False, True])
def test_flops_metric_without_concrete_shapes_asks_for_input_shape(verify):
    model = build_cnn(input_shape=("N", 3, "H", "W"))
    with pytest.raises(InvalidOptionError, match="--input-shape"):
        onnx_lowrank.compress(model, 0.5, metric="flops", verify=verify)


@pytest.mark.parametrize("shapes", [["x:1x3x16x16"], {"x": (1, 3, 16, 16)}, ("x:1,3,16,16",)])
def test_flops_metric_with_given_input_shapes(shapes):
    dynamic = build_cnn(input_shape=("N", 3, "H", "W"))
    _, report = onnx_lowrank.compress(dynamic, 0.5, metric="flops", input_shapes=shapes, allow_slower=True)
    _, static = onnx_lowrank.compress(build_cnn(), 0.5, metric="flops", allow_slower=True)
    assert report.flops_ratio <= 0.5
    assert report.before["flops"] == static.before["flops"]
    assert report.after["flops"] == static.after["flops"]


def test_params_metric_works_without_concrete_shapes_when_not_verifying():
    model = build_cnn(input_shape=("N", 3, "H", "W"))
    _, report = onnx_lowrank.compress(model, 0.5, verify=False, allow_slower=True)
    assert report.params_ratio <= 0.5
    assert "flops" not in report.before and report.flops_ratio is None  # no shapes: no FLOPs cost model


def test_dynamic_batch_alone_defaults_to_one():
    dynamic_batch = build_cnn(input_shape=("N", 3, 16, 16))
    _, report = onnx_lowrank.compress(dynamic_batch, 0.5, metric="flops", allow_slower=True)
    _, static = onnx_lowrank.compress(build_cnn(), 0.5, metric="flops", allow_slower=True)
    assert report.before["flops"] == static.before["flops"]


# ------------------------------------------------------------------------------------------------ analyze / plan


def test_analyze_candidates_are_all_smaller_than_dense():
    analysis = onnx_lowrank.analyze(build_cnn(), allow_slower=True)
    assert [a.layer.name for a in analysis.layers] == list(CNN_LAYERS)
    assert analysis.total("params") == _weight_params(build_cnn())
    assert analysis.total("flops") is not None
    for entry in analysis.layers:
        assert entry.candidates
        for c in entry.candidates:
            assert c.costs["params"] < entry.dense["params"]
            assert c.costs["flops"] is not None and c.costs["flops"] < entry.dense["flops"]
            assert c.error >= 0  # an upper bound: may exceed 1 for k > 1
            assert entry.layer.in_channels % c.k == 0
        assert {c.k for c in entry.candidates} >= {1}


def test_analyze_with_max_groups_one_gives_plain_svd_only():
    analysis = onnx_lowrank.analyze(build_cnn(), max_groups=1, allow_slower=True)
    assert all(c.k == 1 for a in analysis.layers for c in a.candidates)


@pytest.mark.parametrize("bad", [{"max_groups": 0}, {"rank_multiple": 0}, {"exclude": "("}])
def test_analyze_rejects_bad_options(bad):
    with pytest.raises(InvalidOptionError):
        onnx_lowrank.analyze(build_cnn(), **bad)


def test_exclude_keeps_layers_dense_and_lists_them():
    _, report = onnx_lowrank.compress(build_cnn(), 0.7, exclude="^fc", verify=False, allow_slower=True)
    assert [row.name for row in report.layers] == ["conv1", "conv2", "conv3"]
    assert {s.name for s in report.skipped} == {"fc1", "fc2"}
    assert report.params_ratio <= 0.7


def test_rank_multiple_of_eight():
    analysis = onnx_lowrank.analyze(build_cnn(), rank_multiple=8, allow_slower=True)
    assert all(c.rank % 8 == 0 for a in analysis.layers for c in a.candidates)
    _, report = onnx_lowrank.compress(build_cnn(), 0.5, rank_multiple=8, verify=False, allow_slower=True)
    assert report.factorized
    assert all(row.rank % 8 == 0 for row in report.factorized)
    assert report.params_ratio <= 0.5


def test_plan_then_apply_equals_compress():
    model = build_cnn()
    compressed, report = onnx_lowrank.compress(model, 0.5, allow_slower=True)
    analysis = onnx_lowrank.analyze(model, allow_slower=True)
    plan = onnx_lowrank.plan(analysis, 0.5)
    assert dict(plan.layers) == dict(report.plan.layers)
    with_analysis, _ = onnx_lowrank.apply(model, plan, analysis=analysis)
    without_analysis, _ = onnx_lowrank.apply(model, plan)
    assert with_analysis.SerializeToString() == compressed.SerializeToString()
    assert without_analysis.SerializeToString() == compressed.SerializeToString()


def test_plan_survives_a_json_round_trip():
    model = build_cnn()
    compressed, report = onnx_lowrank.compress(model, 0.6, allow_slower=True)
    plan = Plan.from_dict(__import__("json").loads(report.plan.to_json()))
    reapplied, _ = onnx_lowrank.apply(model, plan)
    assert reapplied.SerializeToString() == compressed.SerializeToString()


def test_apply_rejects_a_plan_naming_an_unknown_layer_or_bad_rank():
    model = build_cnn()
    with pytest.raises(InvalidOptionError, match="nope"):
        onnx_lowrank.apply(model, Plan(layers={"nope": (1, 2)}))
    with pytest.raises(InvalidOptionError, match="rank"):
        onnx_lowrank.apply(model, Plan(layers={"conv1": (1, 17)}))
    with pytest.raises(InvalidOptionError):
        onnx_lowrank.apply(model, Plan(layers={"conv1": (2, 1)}))  # 3 input channels do not split in 2


def test_apply_with_full_rank_reproduces_the_model():
    model = build_cnn()
    layers = {layer.name: layer for layer in discover(model).layers}
    plan = {}
    for name, layer in layers.items():
        k = 2 if layer.in_channels % 2 == 0 else 1
        plan[name] = (k, min(layer.out_channels, layer.matrix_shape[1] // k))
    compressed, report = onnx_lowrank.apply(model, Plan(layers=plan))
    assert report.verification is not None
    assert report.verification.worst_relative_l2 < 1e-4
    assert all(row.error < 1e-6 for row in report.factorized)


# -------------------------------------------------------------------------------------------- errors in the report


def test_reported_error_is_the_measured_error_of_the_written_weights():
    model = build_cnn()
    reference = {layer.name: layer for layer in discover(model).layers}
    compressed, report = onnx_lowrank.compress(model, 0.7, allow_slower=True)
    inputs = {"conv1": "x", "conv2": "r1", "conv3": "r2", "fc1": "flat", "fc2": "r4"}
    ks = {row.k for row in report.factorized}
    assert 1 in ks and max(ks) > 1  # both the exact (k = 1) and the grouped case are checked
    for row in report.factorized:
        layer = reference[row.name]
        if layer.op == "Conv":
            w_hat = _conv_effective_matrix(compressed, layer.output, inputs[row.name])
        else:
            w_hat = _linear_effective_matrix(compressed, inputs[row.name], layer.output, layer.in_channels, rank=2)
        assert w_hat.shape == layer.matrix_shape
        measured = _spectral_relative_error(layer.read_matrix(), w_hat)
        assert row.error == pytest.approx(measured, abs=1e-5), row.name
        assert row.planned_error is not None
        assert 0 <= row.error <= row.planned_error + 1e-9
        if row.k == 1:
            assert row.error == pytest.approx(row.planned_error, abs=1e-6)


def test_reported_error_of_grouped_layers_is_measured():
    """Force k > 1 on Gemm and MatMul layers: the report's error is that of the written (grouped) factors."""
    gemm = build_gemm(inp=32, out=24)
    compressed, report = onnx_lowrank.apply(gemm, Plan(layers={"fc": (4, 3)}))
    (row,) = report.factorized
    layer = discover(gemm).layers[0]
    w_hat = _linear_effective_matrix(compressed, "x", "y", 32, rank=2)
    assert row.error == pytest.approx(_spectral_relative_error(layer.read_matrix(), w_hat), abs=1e-5)
    assert row.planned_error is not None and row.error <= row.planned_error + 1e-9

    mm = build_matmul()
    compressed, report = onnx_lowrank.apply(mm, Plan(layers={"mm1": (2, 5)}))
    (row,) = report.factorized
    layer = discover(mm).layers[0]
    w_hat = _linear_effective_matrix(compressed, "x", "h", 24, rank=3)
    assert row.error == pytest.approx(_spectral_relative_error(layer.read_matrix(), w_hat), abs=1e-5)
    assert report.verification is not None


@pytest.mark.parametrize("trans_b, alpha, beta, bias_shape", [
    (1, 1.0, 1.0, (24,)), (0, 0.5, 2.0, (1, 24)), (1, 2.0, 0.25, (4, 24)), (0, 1.0, 1.0, None),
])
def test_gemm_variants_compress_and_run(trans_b, alpha, beta, bias_shape):
    model = build_gemm(trans_b=trans_b, alpha=alpha, beta=beta, bias_shape=bias_shape)
    compressed, report = onnx_lowrank.compress(model, 0.6, allow_slower=True)
    assert report.factorized and report.params_ratio <= 0.6
    onnx.checker.check_model(compressed, full_check=True)
    x = np.random.default_rng(1).standard_normal((4, 32)).astype(np.float32)
    (y,) = run(compressed, {"x": x})
    (y0,) = run(model, {"x": x})
    assert y.shape == y0.shape == (4, 24)
    # the only change is the low-rank weight: error in the output is bounded by the layer's spectral error
    w = discover(model).layers[0].read_matrix()
    bound = alpha * np.linalg.norm(x, 2) * np.linalg.norm(w, 2) * report.factorized[0].error
    assert np.linalg.norm(y - y0, 2) <= bound * 1.001 + 1e-4


# ---------------------------------------------------------------------------------------------- verification, ORT


def test_verification_is_on_by_default_and_off_on_request():
    _, report = onnx_lowrank.compress(build_cnn(), 0.5, allow_slower=True)
    assert report.verification is not None
    assert report.verified_on == "random"
    assert [o.name for o in report.verification.outputs] == ["logits"]
    assert report.verification.samples >= 1
    assert np.isfinite(report.verification.worst_relative_l2) and report.verification.worst_relative_l2 > 0
    _, quiet = onnx_lowrank.compress(build_cnn(), 0.5, verify=False, allow_slower=True)
    assert quiet.verification is None
    assert quiet.verified_on is None


def test_verification_on_given_inputs(tmp_path):
    x = np.random.default_rng(3).random((2, 3, 16, 16)).astype(np.float32)
    path = tmp_path / "samples.npz"
    np.savez(path, x=x)
    model = build_cnn(input_shape=("N", 3, 16, 16))
    compressed, report = onnx_lowrank.compress(model, 0.5, inputs=path, allow_slower=True)
    assert report.verified_on == str(path)
    (y0,) = run(model, {"x": x})
    (y1,) = run(compressed, {"x": x})
    expected = np.linalg.norm(y0.astype(np.float64) - y1) / np.linalg.norm(y0.astype(np.float64))
    assert report.verification.worst_relative_l2 == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("builder", [
    lambda: build_cnn(),
    lambda: build_cnn(constant_weights=True),
    lambda: build_cnn(batchnorm=False, conv1_bias=False),
    lambda: build_matmul(),
    lambda: build_matmul(shape=("B", "T", 24)),
], ids=["cnn", "constant-weights", "no-bn", "matmul", "matmul-dynamic"])
def test_compressed_model_passes_full_check_and_runs(builder):
    model = builder()
    shapes = ["x:2x6x24"] if model.graph.input[0].type.tensor_type.shape.dim[1].dim_param else None
    compressed, report = onnx_lowrank.compress(model, 0.5, input_shapes=shapes, allow_slower=True)
    assert report.factorized
    assert report.params_ratio <= 0.5
    onnx.checker.check_model(compressed, full_check=True)
    assert [i.name for i in compressed.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in compressed.graph.output] == [o.name for o in model.graph.output]
    shape = [2, 6, 24] if "mm1" in {n.name for n in model.graph.node} else [1, 3, 16, 16]
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    (y0,) = run(model, {"x": x})
    (y1,) = run(compressed, {"x": x})
    assert y0.shape == y1.shape
    assert np.all(np.isfinite(y1))


def test_constant_weight_model_compresses_like_the_initializer_model():
    _, a = onnx_lowrank.compress(build_cnn(), 0.5, allow_slower=True)
    _, b = onnx_lowrank.compress(build_cnn(constant_weights=True), 0.5, allow_slower=True)
    assert dict(a.plan.layers) == dict(b.plan.layers)
    assert a.params_ratio == pytest.approx(b.params_ratio)


def test_report_to_dict_is_json_safe():
    import json

    _, report = onnx_lowrank.compress(build_cnn(), 0.5, allow_slower=True)
    data = json.loads(json.dumps(report.to_dict()))
    assert {"summary", "layers", "skipped", "verification", "seconds", "plan"} <= set(data)
    assert data["summary"]["params_ratio"] == pytest.approx(report.params_ratio)
    assert len(data["layers"]) == len(CNN_LAYERS)


@pytest.mark.parametrize("metric", ["params", "flops"])
def test_planned_costs_equal_the_costs_counted_on_the_written_model(metric):
    """The cost model is the truth: folded BatchNormalization parameters included (they vanish when factorized)."""
    model = build_cnn(batchnorm=True)
    analysis = onnx_lowrank.analyze(model, allow_slower=True)
    assert any(a.layer.batchnorm_output for a in analysis.layers)
    plan = onnx_lowrank.plan(analysis, 0.6, metric=metric)
    assert any(analysis.layer(name).layer.batchnorm_output for name in plan.layers)
    _, report = onnx_lowrank.apply(model, plan, analysis=analysis, verify=False)
    def predicted(cost: str) -> float:
        return analysis.total(cost) + sum(after - before for before, after in (r.costs[cost] for r in report.layers))

    predicted_params, predicted_flops = predicted("params"), predicted("flops")
    assert report.after["params"] == predicted_params
    assert report.after["flops"] == predicted_flops
