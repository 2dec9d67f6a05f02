"""`--method eliminate|both` from the command line: narrowed layers are planned, written, verified, reported and
re-applied from the plan; what cannot be done is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnx_lowrank.cli.main import main
from onnx_lowrank.plan import Plan

from helpers.builders import build_cnn, build_matmul
from helpers.timers import ScriptedTimer


@pytest.fixture()
def cnn(tmp_path):
    model_path = tmp_path / "cnn.onnx"
    onnx.save(build_cnn(), str(model_path))
    rng = np.random.default_rng(0)
    samples = tmp_path / "samples"
    samples.mkdir()
    for index in range(6):
        np.savez(samples / f"{index}.npz", x=rng.standard_normal((1, 3, 16, 16)).astype(np.float32))
    return model_path, samples


@pytest.mark.parametrize("method", ["eliminate", "both"])
def test_a_model_is_narrowed_verified_reported_and_reapplied(tmp_path, capsys, cnn, method):
    model, samples = cnn
    out, report, plan = tmp_path / "c.onnx", tmp_path / "r.json", tmp_path / "p.json"
    code = main(["compress", str(model), str(out), "--budget", "0.8", "--method", method, "--inputs", str(samples),
                 "--allow-slower", "--report", str(report), "--plan-out", str(plan)])
    printed = capsys.readouterr().out
    assert code == 0
    data = json.loads(report.read_text())
    assert data["narrowed"] and "Narrowed" in printed
    assert data["summary"]["params_ratio"] <= 0.8 + 1e-9
    widths = json.loads(plan.read_text())["widths"]
    assert widths == {row["name"]: row["width"] for row in data["narrowed"]}
    for row in data["narrowed"]:
        assert 1 <= row["width"] < row["channels"] and row["error"] >= 0
    onnx.checker.check_model(str(out), full_check=True)
    assert data["verification"]["worst_relative_l2"] < 1.0

    again = tmp_path / "again.onnx"
    assert main(["apply", str(model), str(again), "--plan", str(plan), "--inputs", str(samples), "--quiet"]) == 0
    assert again.read_bytes() == out.read_bytes()  # the plan alone gives the same model


def test_eliminate_without_samples_is_refused_in_one_line(tmp_path, capsys, cnn):
    model, _ = cnn
    code = main(["compress", str(model), str(tmp_path / "c.onnx"), "--budget", "0.8", "--method", "eliminate",
                 "--allow-slower"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error and "needs calibration data" in error
    assert not (tmp_path / "c.onnx").exists()


def test_a_latency_budget_is_spent_on_narrowed_layers_priced_by_their_timings(tmp_path, cnn):
    """Narrowed layers are timed like factorized ones: a latency budget with --method eliminate narrows layers
    until the predicted latency fits, and the report's prediction is what the plan was made with."""
    from onnx_lowrank import analyze
    from onnx_lowrank import compress
    from onnx_lowrank import plan

    model, samples = cnn
    analysis = analyze(str(model), inputs=str(samples), method="eliminate", latency_cache=tmp_path / "cache.json",
                       timer=ScriptedTimer())
    timings = analysis.costs["latency"].timings
    priced = [entry for entry in analysis.chains if entry.candidates]  # a 16-channel chain has no width on a
    assert priced  # 16-channel block (AVX-512): nothing to time or offer
    for entry in priced:
        assert timings[entry.chain.producers[0].name].rows is not None
        assert all(timings[r.name].columns is not None for r in entry.chain.readers)
        assert all("latency" in c.savings and c.savings["latency"] > 0 for c in entry.candidates)
    chosen = plan(analysis, 0.95, metric="latency", allocator="alds")
    assert chosen.widths and not chosen.layers
    _, report = compress(str(model), 0.95, metric="latency", method="eliminate", inputs=str(samples),
                         allocator="alds", verify=False, latency_cache=tmp_path / "cache.json", timer=ScriptedTimer())
    assert report.narrowed and report.ratio("latency") <= 0.95 + 1e-9


def test_analyze_lists_why_layers_cannot_be_narrowed(tmp_path, cnn):
    from onnx_lowrank import analyze

    model, samples = cnn
    analysis = analyze(str(model), inputs=str(samples), method="eliminate")
    assert {c.chain.name for c in analysis.chains} == {"conv1", "conv2"}
    reasons = {s.name: s.reason for s in analysis.unnarrowed}
    assert "Flatten" in reasons["conv3"]  # a GlobalAveragePool acts on each channel alone, a Flatten does not
    # fc1's 64 channels are read by fc2 at one position per sample: 6 rows cannot tell which are dependent
    assert "6 calibration rows" in reasons["fc1"] and "at least 128" in reasons["fc1"]
    for entry in analysis.chains:
        widths = [c.width for c in entry.candidates]
        assert widths == sorted(widths) and all(0 < w < entry.chain.channels for w in widths)


def test_plan_widths_round_trip_and_bad_widths_are_refused():
    plan = Plan(layers={"a": (1, 4)}, widths={"b": 12})
    assert Plan.from_dict(json.loads(plan.to_json())) == plan
    with pytest.raises(Exception, match="whole numbers of channels"):
        Plan.from_dict({"layers": {}, "widths": {"b": 0}})


def test_latency_is_predicted_for_a_narrowed_model_from_its_timed_widths(tmp_path, cnn):
    """The whole model's predicted latency is the original's minus what the narrowed layers save (their timings
    with fewer channels, exactly counted where two narrowed layers touch, scaled by the narrowed probe)."""
    from onnx_lowrank import compress

    model, samples = cnn
    _, report = compress(str(model), 0.8, method="eliminate", inputs=str(samples), verify=False,
                         latency_cache=tmp_path / "cache.json", timer=ScriptedTimer())
    latency = report.before["latency"]
    assert report.narrowed and report.after["latency"] < latency
    assert all("latency" in row.savings for row in report.narrowed)


def test_analyze_prints_and_writes_the_narrowable_layers(tmp_path, capsys, cnn):
    model, samples = cnn
    report = tmp_path / "a.json"
    assert main(["analyze", str(model), "--method", "eliminate", "--inputs", str(samples), "--report",
                 str(report)]) == 0
    printed = capsys.readouterr().out
    assert "Narrowable" in printed and "2 narrowable layers in 2 sets of channels (0 coupled" in printed
    assert "; 3 not narrowable" in printed
    assert "Flatten" in printed
    data = json.loads(report.read_text())
    assert data["method"] == "eliminate"
    assert {entry["name"] for entry in data["narrowable"]} == {"conv1", "conv2"}
    assert [entry["producers"] for entry in data["narrowable"]] == [["conv1"], ["conv2"]]
    assert all(c["width"] < entry["channels"] for entry in data["narrowable"] for c in entry["candidates"])


def test_eliminate_with_nothing_narrowable_refuses_the_budget(tmp_path, capsys):
    """A model whose layers cannot be narrowed is not returned unchanged as if the budget were met."""

    model = tmp_path / "m.onnx"
    onnx.save(build_matmul(), str(model))
    np.savez(tmp_path / "s.npz", x=np.random.default_rng(0).standard_normal((2, 6, 24)).astype(np.float32))
    code = main(["compress", str(model), str(tmp_path / "c.onnx"), "--budget", "0.8", "--method", "eliminate",
                 "--inputs", str(tmp_path / "s.npz"), "--allow-slower", "--quiet"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "no layer of this model can be narrowed" in error and not (tmp_path / "c.onnx").exists()


def test_both_is_the_default_with_calibration_data_and_lowrank_otherwise(cnn):
    import onnx_lowrank
    model_path, samples = cnn
    assert onnx_lowrank.analyze(str(model_path), calibration=str(samples), allow_slower=True).method == "both"
    assert onnx_lowrank.analyze(str(model_path), input_shapes=["x:1x3x16x16"], allow_slower=True).method == "lowrank"
    for metric in ("params", "flops", "latency"):  # one default for every metric (the plan records it)
        _, report = onnx_lowrank.compress(str(model_path), 0.9, metric=metric, calibration=str(samples),
                                          allow_slower=True, verify=False, timer=ScriptedTimer(), latency_cache=False)
        assert report.plan.method == "both", metric


def test_refit_also_makes_up_for_narrowed_layers():
    """Decoders are refit on the model with its narrowed layers already cut: the plan is the same, and the
    calibration error does not grow."""
    import onnx_lowrank
    from onnx_lowrank.graph import runtime


    model = build_cnn()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(40)]
    results = {refit: onnx_lowrank.compress(model, 0.5, calibration=feeds, method="both", refit=refit,
                                            allow_slower=True) for refit in (False, True)}
    plain, refit = results[False], results[True]
    assert plain[1].plan.widths and plain[1].plan.layers  # both kinds in one plan
    assert dict(refit[1].plan.widths) == dict(plain[1].plan.widths)
    assert dict(refit[1].plan.layers) == dict(plain[1].plan.layers)

    def error(compressed):
        before, after = runtime.session(model), runtime.session(compressed)
        return max(np.linalg.norm(runtime.run(after, f)["logits"] - runtime.run(before, f)["logits"])
                   / np.linalg.norm(runtime.run(before, f)["logits"]) for f in feeds)

    assert error(refit[0]) <= error(plain[0]) + 1e-6


def test_the_predicted_cost_of_a_plan_is_what_the_report_predicts(tmp_path, cnn):
    """`allocate.plan_cost` (what the auto judge ranks plans by) is the report's prediction for the same plan, for
    a mixed plan of narrowed and factorized layers, in every cost model."""
    from onnx_lowrank import analyze
    from onnx_lowrank import apply
    from onnx_lowrank.stages.allocate import allocate, plan_cost

    model, samples = cnn
    analysis = analyze(str(model), inputs=str(samples), method="both", latency_cache=tmp_path / "cache.json",
                       allow_slower=False, timer=ScriptedTimer())
    plan = allocate(analysis, 0.8, metric="params", allocator="alds")
    _, report = apply(str(model), plan, analysis=analysis, verify=False)
    for metric in ("params", "flops", "latency"):
        assert plan_cost(analysis, plan, metric) == pytest.approx(report.after[metric], rel=1e-9), metric
