"""Speed options end to end: the guard, the latency metric, --threads/--provider, and what the report says.

No assertion is about how fast anything ran (CI machines are noisy): only about what was measured, kept and
reported, which must be consistent with the measurements whatever they are.
"""

from __future__ import annotations

import json

import pytest
from conftest import build_cnn, save

from onnx_lowrank import api
from onnx_lowrank.stages.analyze import GUARD_RATIO
from onnx_lowrank.cli.main import main
from onnx_lowrank.errors import BudgetError


@pytest.fixture
def model_path(tmp_path):
    return save(build_cnn(), tmp_path / "m.onnx")


def test_analyze_report_keeps_only_candidates_measured_faster(model_path, tmp_path, capsys):
    report = tmp_path / "a.json"
    assert main(["analyze", str(model_path), "--threads", "1", "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["never_slower_guard"] is True
    assert data["totals"]["latency"] > 0
    for layer in data["layers"]:
        assert layer["dense"]["latency"] > 0
        for candidate in layer["candidates"]:
            assert candidate["latency"] <= GUARD_RATIO * layer["dense"]["latency"]
    assert "latency ms" in capsys.readouterr().out


def test_compress_report_has_predicted_and_measured_latency(model_path, tmp_path):
    report = tmp_path / "r.json"
    code = main(["compress", str(model_path), str(tmp_path / "c.onnx"), "--budget", "0.6", "--allow-slower",
                 "--threads", "1", "--report", str(report), "--quiet"])
    assert code == 0
    summary = json.loads(report.read_text())["summary"]
    measured = summary["latency_measured"]
    assert measured["original_ms"] > 0 and measured["compressed_ms"] > 0
    assert measured["ratio"] == pytest.approx(measured["compressed_ms"] / measured["original_ms"])
    assert summary["never_slower_guard"] is False  # --allow-slower: nothing was filtered, but layers were not timed
    assert "latency_before" not in summary  # layers were not timed, so there is no predicted latency


def test_latency_metric_plans_within_the_predicted_budget(model_path):
    try:
        _, report = api.compress(model_path, 0.95, metric="latency", allow_slower=True, threads=1, verify=False)
    except BudgetError as error:  # no form of these toy layers may be faster: then the budget is unreachable
        assert "can keep from" in str(error) or "can only stay as it is" in str(error)
        return
    assert report.after["latency"] <= 0.95 * report.before["latency"] + 1e-9
    predicted = report.before["latency"] + sum(after - before for before, after in
                                               (row.costs["latency"] for row in report.layers))
    assert report.after["latency"] == pytest.approx(predicted)


def test_guarded_plan_only_uses_forms_measured_faster(model_path):
    analysis = api.analyze(model_path, threads=1)
    assert analysis.guarded
    for entry in analysis.layers:
        assert all(c.costs["latency"] <= GUARD_RATIO * entry.dense["latency"] for c in entry.candidates)


@pytest.mark.parametrize("options, message", [
    (["--threads", "0"], "--threads must be a whole number >= 1"),
    (["--provider", "NoSuchExecutionProvider"], "is not available in this onnxruntime"),
    (["--metric", "latency", "--input-shape", "x:1x3x16x16", "--budget", "0.5"], None),
])
def test_speed_options_are_checked(model_path, tmp_path, capsys, options, message):
    argv = ["compress", str(model_path), str(tmp_path / "c.onnx")]
    if "--budget" not in options:
        argv += ["--budget", "0.5"]
    code = main(argv + options + ["--threads", "1"] * ("--threads" not in options))
    err = capsys.readouterr().err
    if message is None:  # a valid latency run: it either meets the budget or says which range it can
        assert code == 0 or "can keep from" in err or "can only stay as it is" in err
        return
    assert code == 2 and message in err
    assert not (tmp_path / "c.onnx").exists()


def test_runs_sharing_a_latency_cache_write_identical_models(model_path, tmp_path):
    cache = tmp_path / "latency.json"

    def outcome() -> bytes | str:  # the model written, or the refusal (the toy layers may have no faster form)
        try:
            return api.compress(model_path, 0.9, threads=1, latency_cache=cache, verify=False)[0].SerializeToString()
        except BudgetError as error:
            return str(error)

    assert outcome() == outcome()

