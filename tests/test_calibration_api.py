"""Data-aware compression, end to end: calibration samples, the auto allocator, refit and the target search.

Black-box where possible: models come from helpers.builders, samples are made here, and every error claim is checked
against onnxruntime (`verify`) or recomputed from the models' outputs rather than read back from the report.
"""

from __future__ import annotations

import dataclasses

import json
import math
import weakref

import numpy as np
import onnx
import pytest
from helpers.builders import CNN_LAYERS, build_cnn, build_gemm, build_matmul
from helpers.files import save, sha256
from helpers.running import run

import onnx_lowrank
import onnx_lowrank.graph.inputs
from onnx_lowrank import InvalidOptionError
from onnx_lowrank import Plan
from onnx_lowrank.stages.calibrate import collect_statistics
from onnx_lowrank.cli.main import main
from onnx_lowrank.stages.discover import discover
from onnx_lowrank.sweep import sweep
from onnx_lowrank.stages.verify import verify

CANDIDATES = ("alds", "uniform", "energy")
FAST = ["--allow-slower"]  # the toy layers are never faster factorized: lift the never-slower guard (the CLI flag)


# ----------------------------------------------------------------------------------------------------------- data


def _patterns(seed: int = 0, count: int = 3, shape=(1, 3, 16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, *shape)).astype(np.float32)


def _subspace_feeds(patterns: np.ndarray, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Inputs living in the span of a few fixed patterns: random scales times the patterns."""
    rng = np.random.default_rng(seed)
    return [
        {"x": np.tensordot(rng.uniform(-1.0, 1.0, len(patterns)), patterns, axes=1).astype(np.float32)}
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def cnn_model() -> onnx.ModelProto:
    return build_cnn()


@pytest.fixture(scope="module")
def calibration_feeds() -> list[dict[str, np.ndarray]]:
    return _subspace_feeds(_patterns(), 16, seed=1)


@pytest.fixture(scope="module")
def held_out_feeds() -> list[dict[str, np.ndarray]]:
    """Held-out samples from the same distribution (other scales, same patterns)."""
    return _subspace_feeds(_patterns(), 8, seed=2)


@pytest.fixture(scope="module")
def calibrated_analysis(cnn_model, calibration_feeds):
    return onnx_lowrank.analyze(cnn_model, calibration=calibration_feeds, allow_slower=True)


@pytest.fixture
def files(tmp_path, calibration_feeds, held_out_feeds):
    """The CNN on disk, a folder of calibration .npz (one sample each) and a held-out .npz."""
    model_path = save(build_cnn(), tmp_path / "m.onnx")
    folder = tmp_path / "calibration"
    folder.mkdir()
    for index, feed in enumerate(calibration_feeds[:8]):
        np.savez(folder / f"{index:03d}.npz", **feed)
    held = tmp_path / "held.npz"
    np.savez(held, **held_out_feeds[0])
    (tmp_path / "out").mkdir()
    return model_path, folder, held


def _error(original, compressed, feeds) -> float:
    return verify(original, compressed, feeds).worst_relative_l2


# --------------------------------------------------------------- 1. data-aware beats weight-only on low-rank data


@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_calibrated_beats_weight_only_on_held_out_samples(cnn_model, calibration_feeds, held_out_feeds, budget):
    calibrated, report = onnx_lowrank.compress(cnn_model, budget, calibration=calibration_feeds,
                                               inputs=held_out_feeds, allow_slower=True)
    weight_only, weight_report = onnx_lowrank.compress(cnn_model, budget, weight_only=True, inputs=held_out_feeds,
                                                       allow_slower=True)
    # same size class
    assert report.params_ratio <= budget and weight_report.params_ratio <= budget
    assert abs(report.params_ratio - weight_report.params_ratio) < 0.02
    # errors recomputed independently on the held-out samples, agreeing with the reports (which verified on them)
    data_aware = _error(cnn_model, calibrated, held_out_feeds)
    blind = _error(cnn_model, weight_only, held_out_feeds)
    assert data_aware == pytest.approx(report.verification.worst_relative_l2, rel=1e-6)
    assert blind == pytest.approx(weight_report.verification.worst_relative_l2, rel=1e-6)
    assert not report.in_sample and report.verified_on == "given samples"
    assert data_aware < 0.5 * blind, (data_aware, blind)


def test_budget_one_with_calibration_returns_the_original(cnn_model, calibration_feeds, held_out_feeds):
    model, report = onnx_lowrank.compress(cnn_model, 1.0, calibration=calibration_feeds, inputs=held_out_feeds,
                                          allow_slower=True)
    assert report.factorized == ()
    assert report.message and "unchanged" in report.message
    assert model.SerializeToString() == cnn_model.SerializeToString()


def test_full_rank_calibrated_factors_reproduce_the_original(cnn_model, calibrated_analysis, held_out_feeds):
    full = Plan(layers={a.layer.name: (1, a.decompositions[1].max_rank) for a in calibrated_analysis.layers})
    model, report = onnx_lowrank.apply(cnn_model, full, analysis=calibrated_analysis, inputs=held_out_feeds)
    assert [row.name for row in report.factorized] == list(CNN_LAYERS)
    assert all(row.error == pytest.approx(0.0, abs=1e-6) for row in report.factorized)
    assert _error(cnn_model, model, held_out_feeds) < 1e-5


# ------------------------------------------------------------------------------------ 2. measure and exact errors


def test_measure_is_output_with_calibration_and_spectral_without(cnn_model, calibration_feeds, calibrated_analysis,
                                                                 tmp_path):
    assert calibrated_analysis.measure == "output"
    assert calibrated_analysis.calibration == "given samples"
    plain = onnx_lowrank.analyze(cnn_model, allow_slower=True)
    assert plain.measure == "spectral" and plain.calibration is None

    _, report = onnx_lowrank.compress(cnn_model, 0.5, calibration=calibration_feeds, allow_slower=True)
    assert report.measure == "output" and report.calibrated_on == "given samples"
    summary = report.to_dict()["summary"]
    assert "output" in summary["layer_error_measure"] and summary["calibrated_on"] == "given samples"
    assert summary["refit"] is False
    _, plain_report = onnx_lowrank.compress(cnn_model, 0.5, allow_slower=True)
    assert plain_report.measure == "spectral" and plain_report.calibrated_on is None
    plain_summary = plain_report.to_dict()["summary"]
    assert "spectral" in plain_summary["layer_error_measure"] and plain_summary["calibrated_on"] is None

    folder = tmp_path / "cal"
    folder.mkdir()
    for index, feed in enumerate(calibration_feeds[:4]):  # fewer than 4 compress weight-only (test_few_samples)
        np.savez(folder / f"{index}.npz", **feed)
    _, path_report = onnx_lowrank.compress(cnn_model, 0.5, calibration=folder, allow_slower=True)
    assert path_report.calibrated_on == str(folder)
    assert json.loads(json.dumps(path_report.to_dict()))["summary"]["calibrated_on"] == str(folder)


def test_layer_errors_equal_the_planned_candidate_errors(cnn_model, calibration_feeds, calibrated_analysis):
    _, report = onnx_lowrank.compress(cnn_model, 0.4, calibration=calibration_feeds, allow_slower=True)
    assert report.factorized
    for row in report.factorized:
        candidate = next(c for c in calibrated_analysis.layer(row.name).candidates if (c.k, c.rank) == (row.k, row.rank))
        assert row.planned_error == pytest.approx(candidate.error, rel=1e-12, abs=1e-15)
        assert row.error == pytest.approx(row.planned_error, rel=1e-9, abs=1e-12)


def test_weight_only_layer_errors_stay_within_the_planned_bound(cnn_model):
    _, report = onnx_lowrank.compress(cnn_model, 0.4, weight_only=True, allow_slower=True)
    assert report.factorized
    for row in report.factorized:
        assert row.error <= row.planned_error + 1e-9
        if row.k == 1:  # the bound is exact for k = 1
            assert row.error == pytest.approx(row.planned_error, rel=1e-6)


def test_data_aware_layer_error_is_the_real_output_error():
    """One Gemm: the model's output is the layer's output, so its relative error (to the output's variation) on the
    calibration rows, recomputed from onnxruntime, must equal the reported layer error (shrinkage 0: exact)."""
    model = build_gemm()
    rng = np.random.default_rng(3)
    basis = rng.standard_normal((6, 32))
    feeds = [{"x": (rng.standard_normal((4, 6)) @ basis + 0.05 * rng.standard_normal((4, 32))).astype(np.float32)}
             for _ in range(16)]
    compressed, report = onnx_lowrank.compress(model, 0.5, calibration=feeds, shrinkage=0.0, verify=False,
                                               allow_slower=True)
    (row,) = report.factorized
    original = np.concatenate([run(model, f)[0] for f in feeds]).astype(np.float64)
    approx = np.concatenate([run(compressed, f)[0] for f in feeds]).astype(np.float64)
    relative = np.linalg.norm(original - approx) / np.linalg.norm(original - original.mean(axis=0))
    assert row.error == pytest.approx(relative, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("builder, shape", [(build_gemm, (4, 32)), (build_matmul, (2, 6, 24))], ids=["gemm", "matmul"])
def test_gemm_and_matmul_calibrate_too(builder, shape):
    model = builder()
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(6)]
    compressed, report = onnx_lowrank.compress(model, 0.6, calibration=feeds, allow_slower=True)
    assert report.measure == "output" and report.factorized and report.params_ratio <= 0.6
    assert report.verification.worst_relative_l2 == pytest.approx(_error(model, compressed, feeds), rel=1e-6)


def test_progress_reports_calibration(cnn_model, calibration_feeds):
    seen = []
    onnx_lowrank.compress(cnn_model, 0.5, calibration=calibration_feeds[:5], verify=False, allow_slower=True,
                          progress=lambda stage, done, total: seen.append((stage, done, total)))
    calibrating = [(done, total) for stage, done, total in seen if stage == "calibrating"]
    assert calibrating == [(i, 5) for i in range(1, 6)]
    assert ("analyzing", len(CNN_LAYERS), len(CNN_LAYERS)) in seen


# ----------------------------------------------------------------------------------------- 3. where data comes from


def test_inputs_alone_calibrate_in_sample_and_weight_only_opts_out(cnn_model, held_out_feeds):
    _, report = onnx_lowrank.compress(cnn_model, 0.5, inputs=held_out_feeds, allow_slower=True)
    assert report.measure == "output" and report.calibrated_on == "given samples"
    assert report.in_sample and report.to_dict()["summary"]["verification_in_sample"] is True

    _, opted_out = onnx_lowrank.compress(cnn_model, 0.5, inputs=held_out_feeds, weight_only=True,
                                         allow_slower=True)
    assert opted_out.measure == "spectral" and opted_out.calibrated_on is None
    assert not opted_out.in_sample and opted_out.verification is not None
    assert opted_out.to_dict()["summary"]["verification_in_sample"] is False

    assert onnx_lowrank.analyze(cnn_model, inputs=held_out_feeds, allow_slower=True).measure == "output"
    weight_only = onnx_lowrank.analyze(cnn_model, inputs=held_out_feeds, weight_only=True, allow_slower=True)
    assert weight_only.measure == "spectral"


def test_calibration_alone_verifies_in_sample(cnn_model, calibration_feeds):
    _, report = onnx_lowrank.compress(cnn_model, 0.5, calibration=calibration_feeds, allow_slower=True)
    assert report.in_sample and report.verification.samples == len(calibration_feeds)


def test_calibration_and_weight_only_are_refused(cnn_model, calibration_feeds, calibrated_analysis):
    with pytest.raises(InvalidOptionError):
        onnx_lowrank.compress(cnn_model, 0.5, calibration=calibration_feeds, weight_only=True)
    with pytest.raises(InvalidOptionError):
        onnx_lowrank.analyze(cnn_model, calibration=calibration_feeds, weight_only=True)
    plan = onnx_lowrank.plan(calibrated_analysis, 0.5, allocator="alds")
    with pytest.raises(InvalidOptionError):
        onnx_lowrank.apply(cnn_model, plan, calibration=calibration_feeds, weight_only=True)
    with pytest.raises(InvalidOptionError):
        sweep(cnn_model, [0.5], calibration=calibration_feeds, weight_only=True, latency=False)


def test_cli_prints_the_in_sample_warning(files, capsys):
    model_path, folder, held = files
    out = model_path.parent / "out"
    # 16 samples: one sample alone would compress weight-only (too few to calibrate, test_few_samples)
    code = main(["compress", str(model_path), str(out / "a.onnx"), "--budget", "0.5", "--inputs", str(folder),
                 "--report", str(out / "a.json"), *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "in-sample" in captured.out
    assert json.loads((out / "a.json").read_text())["summary"]["verification_in_sample"] is True

    code = main(["compress", str(model_path), str(out / "b.onnx"), "--budget", "0.5", "--inputs", str(held),
                 "--weight-only", *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "in-sample" not in captured.out
    assert "Weight-only" in captured.out


def test_cli_calibration_with_weight_only_exits_2(files, capsys):
    model_path, folder, _ = files
    out = model_path.parent / "out" / "c.onnx"
    code = main(["compress", str(model_path), str(out), "--budget", "0.5", "--calibration", str(folder),
                 "--weight-only"])
    assert code == 2
    assert capsys.readouterr().err.startswith("onnx-lowrank: error:")
    assert not out.exists()


def test_cli_analyze_and_sweep_take_calibration(files, capsys):
    model_path, folder, held = files
    out = model_path.parent / "out"
    code = main(["analyze", str(model_path), "--calibration", str(folder), "--shrinkage", "0.01",
                 "--report", str(out / "a.json"), "--quiet", *FAST])
    assert code == 0, capsys.readouterr().err
    calibrated = json.loads((out / "a.json").read_text())
    code = main(["analyze", str(model_path), "--weight-only", "--inputs", str(held), "--report", str(out / "w.json"),
                 "--quiet", *FAST])
    assert code == 0, capsys.readouterr().err
    weight_only = json.loads((out / "w.json").read_text())
    assert [l["name"] for l in calibrated["layers"]] == [l["name"] for l in weight_only["layers"]] == list(CNN_LAYERS)
    assert calibrated["layers"][0]["candidates"] != weight_only["layers"][0]["candidates"]

    code = main(["sweep", str(model_path), "--budgets", "0.5", "--calibration", str(folder), "--inputs", str(held),
                 "--no-latency", "--report", str(out / "s.json"), "--quiet", *FAST])
    assert code == 0, capsys.readouterr().err
    data = json.loads((out / "s.json").read_text())
    assert data["measure"] == "output" and data["calibration"] == str(folder)
    assert [p["allocator"].split(":")[0] for p in data["points"]] == ["auto"]


def test_cli_negative_shrinkage_exits_2(files, capsys):
    model_path, folder, _ = files
    code = main(["analyze", str(model_path), "--calibration", str(folder), "--shrinkage", "-1", "--quiet"])
    assert code == 2
    assert capsys.readouterr().err.startswith("onnx-lowrank: error:")


# ---------------------------------------------------------------------------- 4. folders of varying spatial size


@pytest.fixture
def dynamic_folder(tmp_path):
    """A dynamic-H/W CNN and a folder of samples of different spatial sizes."""
    model = build_cnn(input_shape=("N", 3, "H", "W"))
    folder = tmp_path / "varying"
    folder.mkdir()
    rng = np.random.default_rng(5)
    sizes = [(16, 16), (20, 20), (12, 24), (24, 12), (16, 20), (18, 14)]
    for index, (h, w) in enumerate(sizes):
        np.savez(folder / f"{index:02d}.npz", x=rng.standard_normal((1, 3, h, w)).astype(np.float32))
    return model, folder, len(sizes)


def test_calibration_from_a_folder_of_varying_sizes(dynamic_folder):
    model, folder, count = dynamic_folder
    analysis = onnx_lowrank.analyze(model, calibration=folder, allow_slower=True)
    assert analysis.measure == "output" and analysis.calibration == str(folder)
    compressed, report = onnx_lowrank.compress(model, 0.5, calibration=folder, allow_slower=True)
    assert report.factorized and report.params_ratio <= 0.5
    assert report.calibrated_on == str(folder) and report.in_sample
    assert report.verification.samples == count
    onnx.checker.check_model(compressed, full_check=True)
    feeds = list(onnx_lowrank.graph.inputs.Samples.from_path(folder, model))
    assert len({f["x"].shape for f in feeds}) == count
    assert report.verification.worst_relative_l2 == pytest.approx(_error(model, compressed, feeds), rel=1e-6)


def test_calibration_folder_is_streamed(dynamic_folder, monkeypatch):
    """Samples are read one file at a time and dropped: never more than a couple alive at once, whatever their
    number, over a whole compress (calibration, auto allocator, refit and verification passes)."""
    model, folder, count = dynamic_folder
    original_read = onnx_lowrank.graph.inputs._read_npz
    state = {"reads": 0, "alive": 0, "peak": 0}

    def released() -> None:
        state["alive"] -= 1

    def counting_read(file):
        arrays = original_read(file)
        state["reads"] += 1
        for array in arrays.values():
            state["alive"] += 1
            state["peak"] = max(state["peak"], state["alive"])
            weakref.finalize(array, released)
        return arrays

    monkeypatch.setattr(onnx_lowrank.graph.inputs, "_read_npz", counting_read)
    onnx_lowrank.compress(model, 0.5, calibration=folder, refit=True, allow_slower=True)
    assert state["reads"] >= 3 * count  # several passes, each reading the files again
    assert state["peak"] <= 3, state
    assert state["alive"] == 0


# ----------------------------------------------------------------------------------------------- 5. auto allocator


@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_auto_picks_the_plan_with_the_smallest_calibration_error(cnn_model, calibration_feeds, calibrated_analysis,
                                                                 budget):
    chosen = onnx_lowrank.plan(calibrated_analysis, budget, model=cnn_model, calibration=calibration_feeds)
    assert chosen.allocator in CANDIDATES
    assert len(chosen.notes) == 1 and chosen.notes[0].startswith("auto:") and chosen.allocator in chosen.notes[0]

    # issue 19: plans are scored on held-out calibration rows, each built on an analysis of the other rows
    from onnx_lowrank.graph.inputs import samples_from
    from onnx_lowrank.stages import judge
    samples = samples_from(calibration_feeds, cnn_model)
    [(scored, judged, _)], where = judge._folds(cnn_model, dataclasses.replace(calibrated_analysis,
                                                                           calibration_key=samples.key), samples)
    assert where in chosen.notes[0]
    scored_feeds = list(scored)

    def held_out_error(plan: Plan) -> float:
        model, _ = onnx_lowrank.apply(cnn_model, plan, analysis=judged, verify=False)
        return _error(cnn_model, model, scored_feeds)

    best = held_out_error(onnx_lowrank.plan(judged, budget, allocator=chosen.allocator))
    for name in CANDIDATES:
        other = onnx_lowrank.plan(judged, budget, allocator=name)
        assert best <= held_out_error(other) + 1e-9, name

    # compress with calibration defaults to auto and lands on the same plan, notes included
    _, report = onnx_lowrank.compress(cnn_model, budget, calibration=calibration_feeds, allow_slower=True)
    assert report.plan.allocator == chosen.allocator
    assert dict(report.plan.layers) == dict(chosen.layers)
    assert report.plan.notes == chosen.notes


def test_default_allocator_without_data_is_alds(cnn_model):
    _, report = onnx_lowrank.compress(cnn_model, 0.5, allow_slower=True)
    assert report.plan.allocator == "alds" and report.plan.notes == ()


def test_auto_without_calibration_is_refused(cnn_model, held_out_feeds, calibrated_analysis):
    with pytest.raises(InvalidOptionError):
        onnx_lowrank.compress(cnn_model, 0.5, allocator="auto")
    with pytest.raises(InvalidOptionError):
        onnx_lowrank.compress(cnn_model, 0.5, allocator="auto", inputs=held_out_feeds, weight_only=True)
    with pytest.raises(InvalidOptionError):
        onnx_lowrank.plan(onnx_lowrank.analyze(cnn_model), 0.5, allocator="auto")
    # a calibrated analysis keeps its samples (issue 18): auto runs its plans on them
    assert onnx_lowrank.plan(calibrated_analysis, 0.5, allocator="auto").notes[0].startswith("auto:")
    orphan = dataclasses.replace(calibrated_analysis, context=None)  # calibrated, but nothing to run the plans on
    with pytest.raises(InvalidOptionError, match="pass model= and calibration="):
        onnx_lowrank.plan(orphan, 0.5, allocator="auto")


# -------------------------------------------------------------------------------------------------------- 6. refit


def test_refit_writes_a_valid_model_within_budget(cnn_model, calibration_feeds, held_out_feeds):
    plain, plain_report = onnx_lowrank.compress(cnn_model, 0.4, calibration=calibration_feeds, inputs=held_out_feeds,
                                                allow_slower=True)
    refit, report = onnx_lowrank.compress(cnn_model, 0.4, calibration=calibration_feeds, inputs=held_out_feeds,
                                          refit=True, allow_slower=True)
    onnx.checker.check_model(refit, full_check=True)
    assert report.refit and report.to_dict()["summary"]["refit"] is True
    assert report.params_ratio <= 0.4
    assert report.params_ratio == pytest.approx(plain_report.params_ratio)
    assert dict(report.plan.layers) == dict(plain_report.plan.layers)
    error = report.verification.worst_relative_l2
    assert math.isfinite(error)
    # refitting the decoders on the compressed network's own activations must not hurt on the calibration data
    assert _error(cnn_model, refit, calibration_feeds) <= _error(cnn_model, plain, calibration_feeds) + 1e-6


def test_refit_without_calibration_data_is_refused(cnn_model, held_out_feeds, calibrated_analysis):
    with pytest.raises(InvalidOptionError):
        onnx_lowrank.compress(cnn_model, 0.5, refit=True, allow_slower=True)
    with pytest.raises(InvalidOptionError):
        onnx_lowrank.compress(cnn_model, 0.5, refit=True, inputs=held_out_feeds, weight_only=True,
                              allow_slower=True)
    plan = onnx_lowrank.plan(calibrated_analysis, 0.5, allocator="alds")
    with pytest.raises(InvalidOptionError):  # the analysis was calibrated, but apply was given no samples
        onnx_lowrank.apply(cnn_model, plan, analysis=calibrated_analysis, refit=True)


def test_cli_apply_with_refit(files, capsys):
    model_path, folder, held = files
    out = model_path.parent / "out"
    code = main(["compress", str(model_path), str(out / "a.onnx"), "--budget", "0.5", "--calibration", str(folder),
                 "--inputs", str(held), "--plan-out", str(out / "p.json"), "--quiet", *FAST])
    assert code == 0, capsys.readouterr().err
    code = main(["apply", str(model_path), str(out / "b.onnx"), "--plan", str(out / "p.json"), "--calibration",
                 str(folder), "--inputs", str(held), "--refit", "--report", str(out / "r.json"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    onnx.checker.check_model(onnx.load(str(out / "b.onnx")), full_check=True)
    summary = json.loads((out / "r.json").read_text())["summary"]
    assert summary["refit"] is True and summary["calibrated_on"] == str(folder)
    assert summary["verification_in_sample"] is False
    assert summary["params_ratio"] <= 0.5


# ------------------------------------------------------------------------------------------------- 7. target search


@pytest.mark.parametrize("target", [0.05, 0.2])
def test_target_error_finds_the_smallest_passing_budget(cnn_model, calibration_feeds, held_out_feeds, target):
    model, report = onnx_lowrank.compress(cnn_model, target_error=target, calibration=calibration_feeds,
                                          inputs=held_out_feeds, allow_slower=True)
    assert report.search and report.search_goal and f"{target:g}" in report.search_goal
    achieved = _error(cnn_model, model, held_out_feeds)
    assert achieved <= target
    assert report.verification.worst_relative_l2 == pytest.approx(achieved, rel=1e-6)
    passed = [step for step in report.search if step.passed]
    assert passed, report.search
    for step in report.search:
        assert step.passed == (step.value <= target)
    smallest = min(passed, key=lambda step: step.budget)
    assert report.plan.budget == smallest.budget
    assert report.params_ratio == pytest.approx(smallest.achieved)
    assert achieved == pytest.approx(smallest.value, rel=1e-6)
    assert report.params_ratio < 1.0 and (report.factorized or report.narrowed)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["search"]["goal"] == report.search_goal
    assert len(data["search"]["steps"]) == len(report.search)
    assert {"budget", "achieved", "value", "passed"} <= set(data["search"]["steps"][0])


def test_target_zero_returns_the_uncompressed_model(cnn_model, calibration_feeds, held_out_feeds):
    model, report = onnx_lowrank.compress(cnn_model, target_error=0.0, calibration=calibration_feeds,
                                          inputs=held_out_feeds, allow_slower=True)
    assert report.factorized == ()
    assert model.SerializeToString() == cnn_model.SerializeToString()
    assert report.search and not any(step.passed and step.value > 0 for step in report.search)


def test_target_with_evaluate_and_min_score(cnn_model, calibration_feeds, held_out_feeds):
    calls = []

    def evaluate(candidate: onnx.ModelProto) -> float:
        calls.append(1)
        return -_error(cnn_model, candidate, held_out_feeds)

    model, report = onnx_lowrank.compress(cnn_model, calibration=calibration_feeds, inputs=held_out_feeds,
                                          evaluate=evaluate, min_score=-0.2, allow_slower=True)
    assert len(calls) == len(report.search) >= 2
    assert evaluate(model) >= -0.2
    assert "score" in report.search_goal
    passed = [step for step in report.search if step.passed]
    assert passed and all(step.value >= -0.2 for step in passed)
    assert all(step.passed == (step.value >= -0.2) for step in report.search)
    assert report.plan.budget == min(step.budget for step in passed)
    assert report.factorized


@pytest.mark.parametrize("kwargs", [
    {"budget": 0.5, "target_error": 0.1},
    {},
    {"evaluate": lambda m: 1.0},
    {"min_score": 0.5},
    {"budget": 0.5, "evaluate": lambda m: 1.0, "min_score": 0.5},
    {"target_error": 0.1, "evaluate": lambda m: 1.0, "min_score": 0.5},
    {"target_error": -0.1},
], ids=["budget and target", "neither", "evaluate alone", "min_score alone", "budget and evaluate",
        "target and evaluate", "negative target"])
def test_inconsistent_goals_are_refused(cnn_model, calibration_feeds, kwargs):
    with pytest.raises(InvalidOptionError):
        onnx_lowrank.compress(cnn_model, calibration=calibration_feeds, **kwargs)


def test_cli_target_error(files, capsys):
    model_path, folder, held = files
    out = model_path.parent / "out"
    code = main(["compress", str(model_path), str(out / "t.onnx"), "--target-error", "0.3", "--calibration",
                 str(folder), "--inputs", str(held), "--report", str(out / "t.json"), *FAST])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    compressed = onnx.load(str(out / "t.onnx"))
    onnx.checker.check_model(compressed, full_check=True)
    data = json.loads((out / "t.json").read_text())
    assert data["search"]["steps"] and "0.3" in data["search"]["goal"]
    assert data["verification"]["worst_relative_l2"] <= 0.3
    assert data["summary"]["params_ratio"] < 1.0
    assert "Search" in captured.out


def test_cli_budget_and_target_error_together_exit_2(files, capsys):
    model_path, _, _ = files
    out = model_path.parent / "out" / "x.onnx"
    assert main(["compress", str(model_path), str(out), "--budget", "0.5", "--target-error", "0.1"]) == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists()


# -------------------------------------------------------------------------------------------------- 8. determinism


@pytest.mark.parametrize("refit", [False, True])
def test_calibrated_compress_is_deterministic(cnn_model, calibration_feeds, refit):
    first, _ = onnx_lowrank.compress(cnn_model, 0.4, calibration=calibration_feeds, refit=refit, allow_slower=True)
    second, _ = onnx_lowrank.compress(build_cnn(), 0.4, calibration=[dict(f) for f in calibration_feeds],
                                      refit=refit, allow_slower=True)
    assert first.SerializeToString() == second.SerializeToString()


def test_folder_and_in_memory_calibration_give_the_same_model(files, calibration_feeds):
    model_path, folder, _ = files
    from_folder, _ = onnx_lowrank.compress(model_path, 0.4, calibration=folder, verify=False, allow_slower=True)
    in_memory, _ = onnx_lowrank.compress(model_path, 0.4, calibration=calibration_feeds[:8], verify=False,
                                         allow_slower=True)
    assert from_folder.SerializeToString() == in_memory.SerializeToString()


# --------------------------------------------------------------------------------- 9. files untouched, and sweep


def test_model_and_samples_are_not_modified(files):
    model_path, folder, held = files
    digests = {p: sha256(p) for p in [model_path, held, *sorted(folder.iterdir())]}
    onnx_lowrank.analyze(model_path, calibration=folder, allow_slower=True)
    onnx_lowrank.compress(model_path, 0.5, calibration=folder, inputs=held, refit=True, allow_slower=True)
    onnx_lowrank.compress(model_path, target_error=0.3, calibration=folder, inputs=held, allow_slower=True)
    assert {p: sha256(p) for p in digests} == digests


def test_sweep_with_calibration_uses_auto(files, calibration_feeds, held_out_feeds):
    model_path, _, _ = files
    digest = sha256(model_path)
    result = sweep(model_path, [0.6, 0.4], calibration=calibration_feeds, inputs=held_out_feeds, latency=False,
                   allow_slower=True)
    assert sha256(model_path) == digest
    assert result.measure == "output" and result.calibration == "given samples"
    assert [p.budget for p in result.points] == [0.6, 0.4]
    for point in result.points:
        prefix, _, name = point.allocator.partition(":")
        assert prefix == "auto" and name in CANDIDATES, point.allocator
        assert point.params_ratio <= point.budget
        assert math.isfinite(point.output_error)
    assert result.to_dict()["calibration"] == "given samples"


# ------------------------------------------------------------------------------------------------------ 10. memory


def test_statistics_size_does_not_grow_with_the_number_of_samples(cnn_model, calibration_feeds):
    layers = discover(cnn_model).layers
    few = collect_statistics(cnn_model, layers, calibration_feeds[:2])
    many = collect_statistics(cnn_model, layers, calibration_feeds * 4)  # 64 samples
    assert set(few) == set(many) == set(CNN_LAYERS)
    for layer in layers:
        d = layer.matrix_shape[1]
        small, large = few[layer.name], many[layer.name]
        assert small.gram.shape == large.gram.shape == (d, d)
        assert small.total.shape == large.total.shape == (d,)
        assert small.gram.nbytes + small.total.nbytes == large.gram.nbytes + large.total.nbytes
        assert large.count == 32 * small.count  # only the counts grow
    capped = collect_statistics(cnn_model, layers, calibration_feeds[:4], max_rows=16)
    assert all(capped[layer.name].count <= 4 * 16 for layer in layers)


# ------------------------------------------------------------------------- regressions of bugs found by these tests


def test_target_search_starts_at_a_reachable_budget():
    """smallest_budget() * total must not round below the smallest cost (the search starts there)."""
    model = build_matmul()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((2, 6, 24)).astype(np.float32)} for _ in range(4)]
    _, report = onnx_lowrank.compress(model, target_error=0.5, calibration=feeds, allow_slower=True)
    assert report.search


def test_apply_with_a_given_analysis_is_not_in_sample(cnn_model, calibrated_analysis, held_out_feeds):
    """The factors came from the analysis' calibration samples, not from the inputs verified on."""
    plan = onnx_lowrank.plan(calibrated_analysis, 0.5, allocator="alds")
    _, report = onnx_lowrank.apply(cnn_model, plan, analysis=calibrated_analysis, inputs=held_out_feeds)
    assert not report.in_sample


def test_infinite_shrinkage_is_an_invalid_option(cnn_model, calibration_feeds):
    with pytest.raises(InvalidOptionError):
        onnx_lowrank.compress(cnn_model, 0.5, calibration=calibration_feeds, shrinkage=float("inf"))


def test_apply_with_a_given_analysis_verified_on_its_calibration_samples_is_in_sample(
        cnn_model, calibrated_analysis, calibration_feeds):
    plan = onnx_lowrank.plan(calibrated_analysis, 0.5, allocator="alds")
    _, report = onnx_lowrank.apply(cnn_model, plan, analysis=calibrated_analysis, inputs=calibration_feeds)
    assert report.in_sample
