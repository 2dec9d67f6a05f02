"""A latency budget is judged by the written model's measured time, not by the layer timings' prediction the plan was
made from (on PP-OCRv4 det in int8, latency 0.8 was predicted 0.798 and measured 0.877: the verdict said "met")."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from helpers.builders import make_model, tensor
from helpers.timers import ScriptedTimer
from onnx import helper

from onnx_lowrank import api


def _model():
    rng = np.random.default_rng(3)
    w1 = (rng.standard_normal((256, 16)) @ rng.standard_normal((16, 256)) / 16).astype(np.float32)
    w2 = rng.standard_normal((256, 32)).astype(np.float32) / 16
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], name="big"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="small")]
    return make_model(nodes, [tensor("x", [1, 256])], [tensor("y", [1, 32])], {"w1": w1, "w2": w2})


def _report(tmp_path):
    _, report = api.compress(_model(), 0.8, metric="latency", timer=ScriptedTimer(),
                             latency_cache=tmp_path / "latency.json")
    assert report.plan.metric == "latency" and report.latency is not None
    return report


def _measured(report, ratios):
    """The report as if the written model had measured `ratios` against the original in independent measurements."""
    ratio = float(np.exp(np.mean(np.log(ratios))))
    return replace(report, latency=replace(report.latency, ratio=ratio, pair_ratios=tuple(ratios)))


def test_a_latency_budget_is_met_or_missed_by_the_measured_time(tmp_path):
    report = _report(tmp_path)
    predicted = report.ratio("latency")
    assert predicted <= 0.8

    met = _measured(report, (0.70, 0.71, 0.72)).verdict[0]
    assert met.startswith("Budget met: latency measured 0.710x of the original's time (")
    assert f"(predicted {predicted:.3f})" in met

    noisy = _measured(report, (0.74, 0.82, 0.90)).verdict[0]  # 0.82 measured, but the bounds hold 0.8
    assert noisy.startswith("Budget met within the measurements' noise: latency measured 0.817x")

    missed = _measured(report, (0.94, 0.95, 0.96)).verdict  # predicted <= 0.8, measured 0.95
    assert missed[0].startswith("Budget missed: latency measured 0.950x of the original's time (")
    assert f"predicted {predicted:.3f}" in missed[0] and "Ask for less" in missed[0]
    assert _measured(report, (0.94, 0.95, 0.96)).to_dict()["summary"]["verdict"][0] == missed[0]


def test_a_params_budget_or_an_untimed_model_keeps_the_counted_verdict(tmp_path):
    report = _report(tmp_path)
    untimed = replace(report, latency=None).verdict[0]
    assert untimed.startswith("Budget met: latency 0.") and "of the original (asked 0.8)" in untimed
    _, counted = api.compress(_model(), 0.8, timer=ScriptedTimer(), latency_cache=tmp_path / "latency.json")
    assert counted.verdict[0].startswith("Budget met: params")
