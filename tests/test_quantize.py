"""--quantize: ours + int8 through onnxruntime's quantization, compared with int8 alone; quantized inputs refused.

Timings come from a scripted timer (the choice of activation type and the comparison's ratios are then determined);
the quantization itself is onnxruntime's, run for real.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import onnx_lowrank
from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.plan import Plan
from onnx_lowrank.graph.runtime import session
from onnx_lowrank.stages.deployment import Deployment, DeployedModel
from onnx_lowrank.stages.quantize import (PER_CHANNEL_OPSET, Quantization, QuantizedTimer, plan_quantization,
                                          quantization_ops, quantize, quantize_each)
from onnx_lowrank.stages.timing import MEASUREMENTS

from helpers.builders import build_cnn, build_matmul
from helpers.files import save, sha256
from helpers.running import run_cli
from helpers.timers import ScriptedTimer

RNG = np.random.default_rng(0)
CALIBRATION = [{"x": RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(16)]
HELD_OUT = [{"x": RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(4)]


def _with_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for entry in copy.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version
    return copy


def _outputs(model, feeds):
    sess = session(model)
    return [sess.run(None, feed)[0] for feed in feeds]


def test_static_int8_is_qdq_per_channel_and_close_to_the_float_model():
    model = build_cnn()
    recipe, notes = plan_quantization(model, "int8", calibrated=True, upgrade=False)
    assert recipe == Quantization("static", True, "uint8", model.opset_import[0].version) and notes == ()
    quantized = quantize(model, recipe, CALIBRATION)
    assert set(quantization_ops(quantized)) == {"QuantizeLinear", "DequantizeLinear"}
    axes = [a.i for n in quantized.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute
            if a.name == "axis"]
    assert axes  # per-channel weights carry an axis
    reference, int8 = _outputs(model, HELD_OUT), _outputs(quantized, HELD_OUT)
    error = max(np.linalg.norm(a - b) / np.linalg.norm(a) for a, b in zip(reference, int8))
    assert 0 < error < 0.2
    assert len(quantized.SerializeToString()) < len(model.SerializeToString())


def test_both_activation_types_come_from_one_calibration_and_are_deterministic():
    model = build_cnn()
    recipe, _ = plan_quantization(model, "int8", calibrated=True, upgrade=False)
    both = quantize_each(model, recipe, CALIBRATION, ("uint8", "int8"))
    again = quantize(model, recipe, CALIBRATION)
    assert both["uint8"].SerializeToString() == again.SerializeToString()
    zero_points = {onnx.numpy_helper.to_array(t).dtype for m in both.values() for t in m.graph.initializer
                   if t.name.endswith("zero_point") and not t.dims}
    assert {np.dtype(np.uint8), np.dtype(np.int8)} <= zero_points


def test_without_calibration_data_int8_is_dynamic_and_says_so():
    recipe, notes = plan_quantization(build_matmul(), "int8", calibrated=False, upgrade=False)
    assert recipe.mode == "dynamic" and "dynamically" in notes[0]
    quantized = quantize(build_matmul(), recipe)
    assert "DynamicQuantizeLinear" in quantization_ops(quantized)


def test_an_old_opset_is_per_tensor_unless_upgraded():
    old = _with_opset(build_cnn(), 11)
    recipe, notes = plan_quantization(old, "int8", calibrated=True, upgrade=False)
    assert not recipe.per_channel and "--upgrade-opset" in notes[0]
    upgraded, notes = plan_quantization(old, "int8", calibrated=True, upgrade=True)
    assert upgraded.per_channel and upgraded.upgraded_from == 11 and str(PER_CHANNEL_OPSET) in notes[0]
    quantized = quantize(old, upgraded, CALIBRATION)
    assert next(e.version for e in quantized.opset_import if e.domain in ("", "ai.onnx")) >= PER_CHANNEL_OPSET


def test_a_quantized_model_is_refused_in_one_line():
    model = build_cnn()
    recipe, _ = plan_quantization(model, "int8", calibrated=True, upgrade=False)
    quantized = quantize(model, recipe, CALIBRATION)
    with pytest.raises(InvalidOptionError, match="already quantized"):
        plan_quantization(quantized, "int8", calibrated=True, upgrade=False)
    with pytest.raises(InvalidOptionError, match="already quantized"):
        onnx_lowrank.compress(quantized, 0.8, calibration=CALIBRATION, quantize="int8", timer=ScriptedTimer())


def test_the_cli_refuses_a_quantized_input_and_writes_nothing(tmp_path):
    model = build_cnn()
    recipe, _ = plan_quantization(model, "int8", calibrated=True, upgrade=False)
    source = save(quantize(model, recipe, CALIBRATION), tmp_path / "int8.onnx")
    before = sha256(source)
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(["compress", str(source), str(out), "--budget", "0.8", "--quantize", "int8"])
    assert code == 2 and "already quantized" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and sha256(source) == before


def test_a_quantized_model_without_quantize_has_nothing_to_compress():
    model = build_cnn()
    recipe, _ = plan_quantization(model, "int8", calibrated=True, upgrade=False)
    quantized = quantize(model, recipe, CALIBRATION)
    compressed, report = onnx_lowrank.compress(quantized, 0.8, allow_slower=True)
    assert not report.factorized and report.message and "Nothing to compress" in report.message
    assert compressed.SerializeToString() == quantized.SerializeToString()


def test_upgrade_opset_alone_is_refused(tmp_path):
    source = save(build_cnn(), tmp_path / "m.onnx")
    code, _, err = run_cli(["compress", str(source), str(tmp_path / "o.onnx"), "--budget", "0.8", "--upgrade-opset"])
    assert code == 2 and "--quantize" in err and not (tmp_path / "o.onnx").exists()


def test_compress_with_quantize_returns_ours_plus_int8_and_compares_it_with_int8_alone():
    model = build_cnn()
    compressed, report = onnx_lowrank.compress(model, 0.6, calibration=CALIBRATION, inputs=HELD_OUT,
                                               quantize="int8", timer=ScriptedTimer())
    assert set(quantization_ops(compressed)) == {"QuantizeLinear", "DequantizeLinear"}
    deployment = report.deployment
    assert isinstance(deployment, Deployment)
    assert [m.label for m in deployment.models] == ["original", "ours (float)", "int8 alone", "ours + int8"]
    original, ours, alone, ours_int8 = deployment.models
    assert ours_int8.size_bytes == len(compressed.SerializeToString())
    assert ours_int8.size_bytes < alone.size_bytes < original.size_bytes
    assert original.error is None and all(m.error is not None and m.error > 0 for m in deployment.models[1:])
    # the report's verification is of the model written: ours + int8
    assert report.verification.worst_relative_l2 == pytest.approx(ours_int8.error)
    reference, written = _outputs(model, HELD_OUT), _outputs(compressed, HELD_OUT)
    error = max(np.linalg.norm(a - b) / np.linalg.norm(a) for a, b in zip(reference, written))
    assert error == pytest.approx(ours_int8.error, rel=0.5)
    assert original.latency_ratio == pytest.approx(1.0) and deployment.against_int8 is not None
    assert set(deployment.activation_ms) == {"uint8", "int8"}
    assert deployment.verdict in report.verdict
    summary = json.loads(json.dumps(report.to_dict()))["deployment"]
    assert summary["quantization"]["mode"] == "static" and len(summary["models"]) == 4


def test_quantized_compression_is_byte_identical_on_a_rerun():
    first, _ = onnx_lowrank.compress(build_cnn(), 0.6, calibration=CALIBRATION, quantize="int8",
                                     timer=ScriptedTimer(), verify=False)
    second, _ = onnx_lowrank.compress(build_cnn(), 0.6, calibration=CALIBRATION, quantize="int8",
                                      timer=ScriptedTimer(), verify=False)
    assert first.SerializeToString() == second.SerializeToString()


def test_the_cli_writes_ours_plus_int8_and_prints_the_comparison(tmp_path):
    source = save(build_matmul(shape=(2, 6, 24)), tmp_path / "mlp.onnx")
    before = sha256(source)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, err = run_cli(["compress", str(source), str(out), "--budget", "0.7", "--quantize", "int8-dynamic",
                                 "--allow-slower", "--report", str(report)])
    assert code == 0, err
    assert "Deployed as int8 (dynamic" in stdout and "int8 alone" in stdout
    assert "DynamicQuantizeLinear" in quantization_ops(onnx.load(out))
    assert json.loads(report.read_text())["deployment"]["quantization"]["mode"] == "dynamic"
    assert sha256(source) == before


@pytest.mark.parametrize("ratio, bounds, expected", [
    (0.8, (0.75, 0.85), "Ours + int8: 0.75x the size and 0.80x the time of int8 alone"),
    (1.06, (1.04, 1.07), "int8 alone is faster at this budget"),
    (1.0, (0.97, 1.03), "int8 alone is as fast at this budget"),
])
def test_the_verdict_says_plainly_when_int8_alone_is_as_good(ratio, bounds, expected):
    models = (DeployedModel("original", 400), DeployedModel("ours (float)", 300), DeployedModel("int8 alone", 100),
              DeployedModel("ours + int8", 75))
    deployment = Deployment(Quantization("static", True, "uint8", 17), models, (ratio, *bounds))
    assert deployment.verdict.startswith(expected)
    same_size = Deployment(deployment.quantization, models[:3] + (DeployedModel("ours + int8", 100),),
                           (1.0, 0.97, 1.03))
    assert "adds nothing" in same_size.verdict


def test_the_weightless_tail_after_the_last_weighted_layer_stays_float():
    """A detector-like tail: boxes and sigmoid scores concatenated after the last Conv. Static QDQ leaves those
    nodes in float (one scale over pixels and probabilities ruined YOLOv8n's scores)."""
    rng = np.random.default_rng(1)
    init = {"w1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
            "w2": rng.standard_normal((4, 8, 1, 1)).astype(np.float32)}
    nodes = [
        onnx.helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        onnx.helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),  # read by conv2: quantized
        onnx.helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", kernel_shape=[1, 1]),
        onnx.helper.make_node("Sigmoid", ["c2"], ["s"], name="scores"),
        onnx.helper.make_node("Mul", ["c1", "c1"], ["boxes"], name="boxes"),
        onnx.helper.make_node("Concat", ["boxes", "s"], ["y"], name="concat", axis=1),
    ]
    from helpers.builders import make_model, tensor
    model = make_model(nodes, [tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 12, 8, 8])], init)
    from onnx_lowrank.stages.quantize import weightless_tail
    assert weightless_tail(model) == ["scores", "boxes", "concat"]
    recipe, _ = plan_quantization(model, "int8", calibrated=True, upgrade=False)
    feeds = [{"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    quantized = quantize(model, recipe, feeds)
    concat = next(n for n in quantized.graph.node if n.op_type == "Concat")
    producers = {o: n.op_type for n in quantized.graph.node for o in n.output}
    assert all(producers.get(name) != "DequantizeLinear" for name in concat.input)


def test_quantizing_leaves_nothing_in_the_working_folder(tmp_path, monkeypatch):
    """onnxruntime's preprocessing writes scratch files (sym_shape_infer_temp.onnx, <uuid>.data) into the current
    folder; they must not end up in the user's."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    def incomplete(model, *args, **kwargs):  # what onnxruntime does when it cannot finish (YOLOv8n)
        onnx.save_model(model, "sym_shape_infer_temp.onnx", save_as_external_data=True)
        raise Exception("Incomplete symbolic shape inference")

    monkeypatch.setattr(SymbolicShapeInference, "infer_shapes", staticmethod(incomplete))
    monkeypatch.chdir(tmp_path)
    model = build_cnn()
    from onnx_lowrank.stages.quantize import with_shapes

    for mode in ("int8", "int8-dynamic"):
        recipe, _ = plan_quantization(model, mode, calibrated=True, upgrade=False)
        assert not with_shapes(recipe, model).symbolic_shapes  # tried once, on the original: also in our folder
        quantize(model, recipe, CALIBRATION)
    assert list(tmp_path.iterdir()) == []


def test_a_model_without_a_default_opset_is_refused_in_one_line():
    model = build_matmul()
    del model.opset_import[:]
    model.opset_import.add(domain="com.example", version=1)
    with pytest.raises(InvalidOptionError, match="nothing for int8 to quantize"):
        plan_quantization(model, "int8", calibrated=True, upgrade=False)


def test_with_quantize_the_planning_times_every_model_in_its_int8_form():
    timer = ScriptedTimer()
    _, report = onnx_lowrank.compress(build_cnn(), 0.6, calibration=CALIBRATION, inputs=HELD_OUT, quantize="int8",
                                      timer=timer, latency_cache=False)
    weighted = {"Conv", "Gemm", "MatMul"}

    def in_float(model):
        return any(n.op_type in weighted for n in model.graph.node) and not quantization_ops(model)

    float_calls = [call for call in timer.calls if any(map(in_float, call))]
    # only the deployment comparison times float models: the original, ours, int8 alone, ours + int8, each time
    assert len(float_calls) == MEASUREMENTS
    assert all([in_float(m) for m in call] == [True, True, False, False] for call in float_calls)
    planning = [call for call in timer.calls if call not in float_calls]
    assert sum(1 for call in planning for m in call if quantization_ops(m)) > 10  # layers, probes, the check
    assert report.latency.against == "int8 alone" and report.to_dict()["summary"]["latency_measured"]["against"] == "int8 alone"


def test_the_quantized_timer_quantizes_a_model_once_and_leaves_quantized_or_weightless_ones(monkeypatch):
    from collections import OrderedDict

    from onnx_lowrank.stages import quantize as quantize_module
    from onnx_lowrank.stages.layer_timing import overhead_model

    monkeypatch.setattr(quantize_module, "_QUANTIZED", OrderedDict())
    recipe, _ = plan_quantization(build_cnn(), "int8", calibrated=True, upgrade=False)
    model, already, identity = build_cnn(), quantize(build_cnn(), recipe, CALIBRATION), overhead_model()
    made = []
    real = quantize_module.quantize
    monkeypatch.setattr(quantize_module, "quantize", lambda m, q, c=None: made.append(m) or real(m, q, c))
    inner = ScriptedTimer()
    timer = QuantizedTimer(inner, recipe)
    feed = HELD_OUT[0]
    timer.time([model, already, identity], [[feed], [feed], [{"x": np.zeros((1, 16), np.float32)}]], 3)
    timer.time([model], [[feed]], 3)
    assert len(made) == 1  # the original, compared again and again, is quantized once
    (first, second) = inner.calls
    assert quantization_ops(first[0]) and first[1] is already and first[2] is identity
    assert second[0].SerializeToString() == first[0].SerializeToString()


def test_times_in_an_int8_form_have_keys_of_their_own():
    from onnx_lowrank.graph.runtime import RuntimeSettings
    from onnx_lowrank.stages.latency_cache import model_key, variant_key

    recipe, _ = plan_quantization(build_cnn(), "int8", calibrated=True, upgrade=False)
    settings, layer = RuntimeSettings(), {"op": "Conv", "input": [1, 3, 16, 16]}
    assert variant_key(layer, (1, 4), settings) != variant_key(layer, (1, 4), settings, recipe.key)
    assert variant_key(layer, (1, 4), settings, None) == variant_key(layer, (1, 4), settings)
    shapes = {"x": (1, 3, 16, 16)}
    assert model_key(build_cnn(), shapes, settings) != model_key(build_cnn(), shapes, settings, recipe.key)
    other = Quantization("static", True, "int8", recipe.opset)
    assert other.key != recipe.key


def test_probe_factors_keep_the_activations_size():
    """A probe model of many factorized layers is calibrated on its own outputs in int8: unscaled random factors
    grew YOLOv8n's probe to overflow and onnxruntime's quantizer failed ("scale issue")."""
    from onnx_lowrank.stages.discover import discover
    from onnx_lowrank.stages.layer_timing import _random_factors

    layer = discover(build_cnn()).layers[-1]
    factors = _random_factors(layer, 1, 4, np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((layer.columns, 256))
    hidden = factors.encoder[0] @ x
    y = factors.decoder @ hidden
    assert 0.5 < hidden.std() < 2 and 0.5 < y.std() < 2


def test_the_auto_judge_scores_its_plans_quantized(monkeypatch):
    from onnx_lowrank.stages import judge

    quantized, recipes = [], []
    real = judge.as_deployed
    monkeypatch.setattr(judge, "as_deployed",
                        lambda m, q, c: quantized.append(list(c)) or recipes.append(q) or real(m, q, c))
    # allow_slower: the scripted timer calls every int8 factorized form slower, and one plan would be left to judge
    _, report = onnx_lowrank.compress(build_cnn(), 0.6, calibration=CALIBRATION, inputs=HELD_OUT, quantize="int8",
                                      timer=ScriptedTimer(), allow_slower=True)
    assert len(quantized) >= 2 and "each plan quantized as deployed" in report.plan.notes[0]
    # 16 samples: one split, every 4th held out to score; the others (12) calibrate the candidates' int8 forms
    held = np.stack([feed["x"] for feed in CALIBRATION[3::4]])
    assert all(len(fit) == 12 for fit in quantized)
    # the deployed recipe with min-max ranges, the cheapest to calibrate, whatever ranges the written model got
    assert {recipe.ranges for recipe in recipes} == {"minmax"}
    assert all(recipe == report.deployment.quantization.planning for recipe in recipes)
    assert not any((feed["x"] == held).all(axis=(1, 2, 3, 4)).any() for fit in quantized for feed in fit)


def test_a_target_error_with_quantize_is_checked_on_ours_plus_int8():
    compressed, report = onnx_lowrank.compress(build_cnn(), target_error=0.3, calibration=CALIBRATION,
                                               inputs=HELD_OUT, quantize="int8", timer=ScriptedTimer(),
                                               allow_slower=True)
    passing = [step for step in report.search if step.passed]
    assert passing
    best = min(passing, key=lambda step: step.budget)
    assert best.value == pytest.approx(report.deployment.model("ours + int8").error)
    assert best.value == pytest.approx(report.verification.worst_relative_l2)


def test_a_sweep_with_quantize_starts_at_int8_alone_and_scores_ours_plus_int8():
    from onnx_lowrank.sweep import sweep

    scored = []

    def evaluate(model):
        scored.append(quantization_ops(model))
        return {"int8": float(bool(quantization_ops(model)))}

    result = sweep(build_cnn(), (0.8, 0.6), calibration=CALIBRATION, inputs=HELD_OUT, quantize="int8",
                   timer=ScriptedTimer(), allow_slower=True, latency_cache=False, evaluate=evaluate)
    first, *cells = result.points
    assert first.allocator == "int8 alone" and first.size_ratio == 1.0 and first.latency_ratio == 1.0
    assert first.output_error > 0 and cells
    assert all(scored) and all(p.task == {"int8": 1.0} for p in result.points)
    assert all(p.size_ratio is not None and p.size_ratio < 1.5 for p in cells)  # of int8 alone, not of the float
    assert result.deployed["mode"] == "static" and result.to_dict()["deployed"] == result.deployed


def test_the_cli_sweep_takes_quantize(tmp_path):
    source = save(build_matmul(shape=(2, 6, 24)), tmp_path / "mlp.onnx")
    code, out, err = run_cli(["sweep", str(source), "--budgets", "0.8", "--quantize", "int8-dynamic",
                              "--allow-slower"])
    assert code == 0, err
    assert "int8 alone" in out and "ours + int8" in out


def test_the_cli_with_quantize_writes_nothing_above_max_error_and_the_same_bytes_on_a_rerun(tmp_path):
    source = save(build_cnn(), tmp_path / "cnn.onnx")
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for index, feed in enumerate(CALIBRATION):
        np.savez(calibration / f"{index:02d}.npz", **feed)
    before = sha256(source)
    common = ["--budget", "0.6", "--calibration", str(calibration), "--quantize", "int8", "--allow-slower"]
    refused = tmp_path / "refused.onnx"
    code, _, err = run_cli(["compress", str(source), str(refused), *common, "--max-error", "1e-6"])
    assert code == 1 and not refused.exists()  # ours + int8 moved the outputs more: nothing written
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    for out in (first, second):
        code, _, err = run_cli(["compress", str(source), str(out), *common])
        assert code == 0, err
    assert first.read_bytes() == second.read_bytes() and quantization_ops(onnx.load(first))
    assert sha256(source) == before


def test_onnxruntimes_quantization_chatter_does_not_reach_the_user(monkeypatch, caplog, recwarn):
    import logging
    import warnings

    import onnxruntime.quantization as ort_quantization

    real = ort_quantization.quantize_static

    def chatty(*args, **kwargs):  # what onnxruntime does per tensor on PP-OCRv4 det and YOLOv8n
        logging.warning("Axis 1 is out-of-range for weight 'batch_norm_1.w_0' with rank 1")
        warnings.warn("All-NaN axis encountered", RuntimeWarning)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort_quantization, "quantize_static", chatty)
    level = logging.getLogger().level
    recipe, _ = plan_quantization(build_cnn(), "int8", calibrated=True, upgrade=False)
    with caplog.at_level(logging.WARNING):
        quantized = quantize(build_cnn(), recipe, CALIBRATION)
    assert quantization_ops(quantized)
    assert not [r for r in caplog.records if "out-of-range" in r.getMessage()]
    assert not [w for w in recwarn if "All-NaN" in str(w.message)]
    assert logging.getLogger().level == level


def test_symbolic_shape_inference_is_tried_on_the_original_once_and_skipped_where_it_did_not_finish(monkeypatch):
    from onnxruntime.quantization import shape_inference
    from onnxruntime.tools import symbolic_shape_infer

    from onnx_lowrank.stages.quantize import with_shapes

    recipe, _ = plan_quantization(build_cnn(), "int8", calibrated=True, upgrade=False)
    assert with_shapes(recipe, build_cnn()).symbolic_shapes  # it finishes on this one

    def incomplete(*args, **kwargs):
        raise Exception("Incomplete symbolic shape inference")  # what YOLOv8n and both PP-OCRv4 models raise

    monkeypatch.setattr(symbolic_shape_infer.SymbolicShapeInference, "infer_shapes", staticmethod(incomplete))
    skipped = with_shapes(recipe, build_cnn())
    assert not skipped.symbolic_shapes and skipped.to_dict() == recipe.to_dict()  # same keys, same description
    calls = []
    real = shape_inference.quant_pre_process
    monkeypatch.setattr(shape_inference, "quant_pre_process",
                        lambda *a, **k: calls.append(k.get("skip_symbolic_shape", False)) or real(*a, **k))
    quantize(build_cnn(), skipped, CALIBRATION)
    assert calls == [True]  # straight to ONNX's shape inference: no failed attempt first
    calls.clear()
    quantize(build_cnn(), recipe, CALIBRATION)
    assert calls == [False, True]  # a recipe that did not ask: tried, failed, then without it


def test_apply_with_quantize_writes_ours_plus_int8_the_same_each_time(tmp_path):
    analysis = onnx_lowrank.analyze(build_cnn(), calibration=CALIBRATION, timer=ScriptedTimer())
    chosen = onnx_lowrank.plan(analysis, 0.6)
    first, report = onnx_lowrank.apply(build_cnn(), chosen, calibration=CALIBRATION, inputs=HELD_OUT,
                                       quantize="int8", timer=ScriptedTimer())
    second, _ = onnx_lowrank.apply(build_cnn(), chosen, calibration=CALIBRATION, inputs=HELD_OUT, quantize="int8",
                                   timer=ScriptedTimer())
    assert quantization_ops(first) and first.SerializeToString() == second.SerializeToString()
    assert report.deployment is not None and report.verification.worst_relative_l2 == pytest.approx(
        report.deployment.model("ours + int8").error)


def test_the_cli_applies_a_plan_with_quantize(tmp_path):
    source = save(build_matmul(shape=(2, 6, 24)), tmp_path / "mlp.onnx")
    plan_file, out = tmp_path / "plan.json", tmp_path / "out.onnx"
    code, _, err = run_cli(["compress", str(source), str(tmp_path / "float.onnx"), "--budget", "0.7",
                            "--allow-slower", "--plan-out", str(plan_file)])
    assert code == 0, err
    code, stdout, err = run_cli(["apply", str(source), str(out), "--plan", str(plan_file), "--quantize",
                                 "int8-dynamic"])
    assert code == 0, err
    assert "Deployed as int8 (dynamic" in stdout and "DynamicQuantizeLinear" in quantization_ops(onnx.load(out))


def test_a_plan_made_for_int8_records_it_and_applies_to_the_same_bytes():
    """compress(quantize=) analyses for the int8 form (narrowing counts the rounding noise: `AnalysisSettings.int8`);
    the plan records it, so applying its JSON later writes the very same ours + int8."""
    model, report = onnx_lowrank.compress(build_cnn(), 0.6, calibration=CALIBRATION, quantize="int8",
                                          timer=ScriptedTimer(), verify=False)
    assert report.plan.settings.int8 and (report.plan.widths or report.plan.layers)
    plan = Plan.from_dict(json.loads(report.plan.to_json()))
    again, _ = onnx_lowrank.apply(build_cnn(), plan, calibration=CALIBRATION, quantize="int8",
                                  timer=ScriptedTimer(), verify=False)
    assert again.SerializeToString() == model.SerializeToString()
    _, plain = onnx_lowrank.compress(build_cnn(), 0.6, calibration=CALIBRATION, timer=ScriptedTimer(), verify=False)
    assert not plain.plan.settings.int8
