"""Settings travel with their results: an Analysis holds its Context, a Plan records its settings and its model.

Each test here was a user-visible bug before the settings and context objects (issue 18): applying a plan made with
non-default settings wrote a different model, planning an analysis alone failed on its default path, sweep kept the
never-slower guard that compress lifts, and the report named an error formula the code does not compute.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers.builders import build_cnn, build_gemm

import onnx_lowrank
from onnx_lowrank import InvalidOptionError, Plan
from onnx_lowrank.settings import AnalysisSettings, SpeedSettings


def _feeds(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(count)]


def _bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


@pytest.mark.parametrize("keywords", [
    {"shrinkage": 0.1},
    {"shrinkage": 0.5, "max_groups": 2, "method": "lowrank"},
    {"method": "eliminate", "exclude": "fc2"},
    {"rank_multiple": 4, "shrinkage": 0.0},
    {"refit": True, "method": "lowrank"},
])
def test_apply_of_a_plan_from_non_default_settings_reproduces_the_bytes(keywords):
    model, feeds = build_cnn(), _feeds(40)
    compressed, report = onnx_lowrank.compress(model, 0.6, calibration=feeds, allow_slower=True, verify=False,
                                               **keywords)
    plan = Plan.from_dict(json.loads(report.plan.to_json()))  # through its JSON, as `apply --plan` reads it
    assert plan.settings == report.plan.settings and plan.method == report.plan.method
    again, _ = onnx_lowrank.apply(model, plan, calibration=feeds, verify=False)
    assert _bytes(again) == _bytes(compressed)
    assert plan.layers or plan.widths  # the budget changed the model: the bytes compared mean something


def test_a_plan_records_its_settings_method_and_model():
    model, feeds = build_cnn(), _feeds(40)
    _, report = onnx_lowrank.compress(model, 0.7, calibration=feeds, shrinkage=0.2, max_groups=2, allow_slower=True,
                                      verify=False)
    data = report.plan.to_dict()
    assert data["version"] == 2 and data["method"] == "both"
    assert data["settings"] == {"method": "both", "shrinkage": 0.2, "exclude": None, "max_groups": 2,
                                "rank_multiple": 1, "weight_only": False, "int8": False}
    assert data["model"].startswith("sha256:") and data["refit"] is False


def test_a_plan_made_for_another_model_is_refused_in_one_line():
    _, report = onnx_lowrank.compress(build_cnn(seed=0), 0.6, allow_slower=True, verify=False)
    with pytest.raises(InvalidOptionError, match="made for another model") as caught:
        onnx_lowrank.apply(build_cnn(seed=1), report.plan, verify=False)
    assert "\n" not in str(caught.value)


def test_the_fingerprint_does_not_depend_on_how_the_model_was_stored(tmp_path):
    model = build_cnn()
    _, report = onnx_lowrank.compress(model, 0.6, allow_slower=True, verify=False)
    path, stored = tmp_path / "external.onnx", onnx.ModelProto()
    stored.CopyFrom(model)  # saving as external data rewrites the proto it is given
    onnx.save(stored, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="w.data",
              size_threshold=0)
    from onnx_lowrank.graph.load import fingerprint, load_model

    assert fingerprint(load_model(str(path))) == fingerprint(model) == report.plan.model
    onnx_lowrank.apply(str(path), report.plan, verify=False)  # not refused
    changed = build_cnn()
    changed.graph.initializer[0].raw_data = bytes(len(changed.graph.initializer[0].raw_data))  # one weight zeroed
    assert fingerprint(changed) != fingerprint(model)


def test_a_version_1_plan_still_loads_and_applies():
    model = build_cnn()
    _, report = onnx_lowrank.compress(model, 0.6, allow_slower=True, verify=False, max_groups=1)
    data = report.plan.to_dict()
    legacy = {key: data[key] for key in ("allocator", "metric", "budget", "threshold", "layers")}
    legacy.update(format="onnx-lowrank-plan", version=1)
    plan = Plan.from_dict(legacy)
    assert plan.settings is None and plan.model is None and plan.method is None
    compressed, _ = onnx_lowrank.apply(model, plan, verify=False)
    assert len(compressed.graph.node) > len(model.graph.node)


def test_a_plan_from_a_newer_version_is_refused():
    with pytest.raises(InvalidOptionError, match="version 3 plan"):
        Plan.from_dict({"version": 3, "layers": {}})


def test_a_hand_edited_plan_setting_gets_the_keyword_message():
    with pytest.raises(InvalidOptionError, match="The 'shrinkage' parameter of plan must be a finite number >= 0"):
        Plan.from_dict({"version": 2, "layers": {}, "settings": {"shrinkage": -1}})


def test_planning_a_calibrated_analysis_needs_nothing_else():
    feeds = _feeds(40)
    analysis = onnx_lowrank.analyze(build_cnn(), calibration=feeds, allow_slower=True)
    plan = onnx_lowrank.plan(analysis, 0.5)  # the default allocator is auto: it runs the plans on the samples
    assert plan.allocator in ("alds", "uniform", "energy") and plan.notes[0].startswith("auto:")
    assert plan.model == analysis.context.fingerprint and plan.settings == analysis.context.settings


def test_compress_and_plan_of_its_analysis_agree():
    model, feeds = build_cnn(), _feeds(40)
    analysis = onnx_lowrank.analyze(model, calibration=feeds, allow_slower=True)
    _, report = onnx_lowrank.compress(model, 0.5, calibration=feeds, allow_slower=True, verify=False)
    planned = onnx_lowrank.plan(analysis, 0.5)
    assert (dict(planned.layers), dict(planned.widths)) == (dict(report.plan.layers), dict(report.plan.widths))


@pytest.mark.parametrize("allow_slower, metric, measure, guard", [
    (False, "params", True, True),
    (True, "params", False, False),
    (True, "latency", True, False),  # a latency budget needs times; allow_slower still lifts the guard
    (False, "latency", True, True),
])
def test_one_rule_says_when_layers_are_timed_and_guarded(allow_slower, metric, measure, guard):
    speed = SpeedSettings.of(allow_slower, metric, None, "CPUExecutionProvider", False)
    assert (speed.measure, speed.guard) == (measure, guard)


def test_sweep_with_allow_slower_lifts_the_guard_for_a_latency_budget():
    from onnx_lowrank.sweep import sweep

    result = sweep(build_gemm(), (0.8,), metric="latency", allow_slower=True, latency=False, latency_cache=False)
    assert result.guarded is False
    guarded = sweep(build_gemm(), (0.8,), metric="latency", latency=False, latency_cache=False)
    assert guarded.guarded is True


def test_the_default_method_is_both_with_calibration_data_for_every_metric():
    assert AnalysisSettings().resolved(calibrated=True).method == "both"
    assert AnalysisSettings().resolved(calibrated=False).method == "lowrank"
    assert "`both` for every metric" in onnx_lowrank.compress.__doc__


def test_the_report_names_the_error_formula_it_computes():
    """A Gemm's output error on its calibration rows, computed by hand: divided by the spread of the outputs around
    their mean, as the report says, not by their norm."""
    model = build_gemm(out=24, inp=32, batch=1)
    rng = np.random.default_rng(3)
    inputs = [{"x": (rng.standard_normal((1, 32)) + 2.0).astype(np.float32)} for _ in range(200)]
    compressed, report = onnx_lowrank.compress(model, 0.5, calibration=inputs, shrinkage=0.0, method="lowrank",
                                               allocator="alds", allow_slower=True, verify=False)
    row = next(r for r in report.layers if r.k is not None)
    x = np.concatenate([f["x"] for f in inputs]).astype(np.float64)
    weight = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fc.w")).astype(np.float64)
    bias = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "fc.b")).astype(np.float64)
    from helpers.running import run

    y = x @ weight.T + bias
    y_hat = np.concatenate([run(compressed, f)[0] for f in inputs]).astype(np.float64)
    centred = np.linalg.norm(y - y_hat) / np.linalg.norm(y - y.mean(axis=0))
    plain = np.linalg.norm(y - y_hat) / np.linalg.norm(y)
    assert row.error == pytest.approx(centred, rel=1e-3) and abs(centred - plain) > 0.1 * centred
    assert "||Y - mean(Y)||_F" in json.dumps(report.to_dict(), ensure_ascii=False)
