"""The benchmark runner still runs end to end (one model, one budget, a weight-only and a calibrated method), so it
cannot rot."""

from __future__ import annotations

import dataclasses
import re

import pytest

from benchmarks import run


SMOKE_METHODS = ("weight alds", "data both", "data auto")


@pytest.fixture
def without_guard(monkeypatch):
    """The smoke methods with the never-slower guard lifted (as --allow-slower does): with it, whether budget 0.7 is
    reachable and which layers are factorized depend on this machine's timings."""
    for name in SMOKE_METHODS:
        monkeypatch.setitem(run.METHODS, name, dataclasses.replace(run.METHODS[name], guard=False))


@pytest.mark.slow
def test_runner_writes_results_and_plot(tmp_path, without_guard):
    code = run.main(["--models", "ppocr-cls", "--budgets", "0.7", "--methods", ",".join(SMOKE_METHODS),
                     "--repeats", "2", "--out", str(tmp_path)])
    assert code == 0
    results = (tmp_path / "RESULTS.md").read_text()
    rows = [line for line in results.splitlines()
            if re.match(r"\| (weight alds|data (both|auto) \([^|]+\)) \| 0\.7 \|", line)]
    assert len(rows) == 3
    header = _cells(next(line for line in results.splitlines() if line.startswith("| method |")))
    for row in rows:
        cell = dict(zip(header, _cells(row)))
        # ("pred", the predicted latency ratio, is "-" here: layers are not timed without the guard)
        params, flops, latency, task, out_err = (float(cell[c]) for c in ("params", "FLOPs", "latency", "task",
                                                                            "out err"))
        assert 0.6 < params <= 0.7 and 0 < flops <= 1 and latency > 0 and 0 <= task <= 1 and out_err >= 0
    assert "Default (`data both`) against weight-only: 0.7: out err" in results
    # both against low rank alone, their models timed against each other (or the same model written twice)
    assert re.search(r"data both vs data auto: 0\.7: out err [0-9.]+ vs [0-9.]+, (same model|latency [0-9.]+x)",
                     results)
    for plot in ("ppocr-cls.png", "ppocr-cls-latency.png"):  # the frontier, and latency against the budget
        assert re.search(rf"!\[[^\]]+\]\(plots/{re.escape(plot)}\)", results), plot
        assert (tmp_path / "plots" / plot).stat().st_size > 10_000


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_unknown_model_is_refused(capsys):
    assert run.main(["--models", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_the_few_samples_study_calls_a_cell_better_or_worse_only_beyond_noise():
    from benchmarks import few_samples

    def cell(errors, task=0.9, rows=40):
        """One output; feed i has reference energy 1 and error energy errors[i % len(errors)]**2."""
        return {"task": {"metric": task}, "squares": [[[errors[i % len(errors)] ** 2, 1.0] for i in range(rows)]]}

    weight = cell([0.10, 0.30, 0.05, 0.20])
    assert few_samples._verdict(cell([0.05, 0.15, 0.02, 0.10]), weight, 0.01) == "better"  # half the error
    assert few_samples._verdict(cell([0.20, 0.60, 0.10, 0.40]), weight, 0.01) == "worse"
    assert few_samples._verdict(cell([0.11, 0.28, 0.06, 0.21]), weight, 0.01) == "same"  # within noise
    assert few_samples._verdict(cell([0.11, 0.28, 0.06, 0.21], task=0.85), weight, 0.01) == "worse"  # task lower
    low, high = few_samples.error_difference(weight, weight)
    assert low == high == 0.0


@pytest.mark.slow
def test_the_profile_names_the_stages_where_the_time_went(tmp_path):
    """benchmarks/profile.py on the smallest real model: every stage row it reads off the profile is a real
    function of the pipeline (a renamed one would silently vanish from PROFILE.md)."""
    import importlib.util
    from pathlib import Path

    path = Path(run.__file__).with_name("profile.py")
    spec = importlib.util.spec_from_file_location("benchmark_profile", path)
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    out = tmp_path / "PROFILE.md"
    assert profile.main(["--models", "ppocr-cls", "--out", str(out)]) == 0
    text = out.read_text()
    for label in ("calibration pass", "decompositions", "judge (auto)", "allocation", "writing plans"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} "))
        assert float(_cells(row)[1]) > 0, row
    assert "| ppocr-cls | 16 |" in text


def test_the_plain_baselines_meet_their_budget_and_keep_the_outputs_close():
    """benchmarks/baselines.py: what the tool's speed is compared against must do the job it stands for."""
    import numpy as np

    from benchmarks.baselines import bare_svd, plain_calibrated
    from helpers.builders import make_model, tensor
    from onnx import helper

    from onnx_lowrank.stages import costs
    from onnx_lowrank.stages.verify import verify

    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((64, 16)).astype(np.float32)
    w1 = (hidden @ rng.standard_normal((16, 64)).astype(np.float32) / 8).astype(np.float32)  # rank 16 of 64
    w2 = rng.standard_normal((64, 16)).astype(np.float32) / 8
    model = make_model([helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                        helper.make_node("MatMul", ["r", "w2"], ["y"])],
                       [tensor("x", [4, 64])], [tensor("y", [4, 16])], {"w1": w1, "w2": w2})
    feeds = [{"x": rng.standard_normal((4, 64)).astype(np.float32)} for _ in range(8)]
    for compressed in (plain_calibrated(model, feeds, 0.8), bare_svd(model, 0.8)):
        assert costs.model_params(compressed) <= 0.8 * costs.model_params(model)
        assert verify(model, compressed, feeds).worst_relative_l2 < 1e-5  # w1 is exactly rank 16: kept exactly


def test_the_int8_benchmark_takes_split_sizes_for_every_model_or_per_model():
    import argparse

    from benchmarks import int8

    per_model = int8._counts("ppocrv4-rec=64,ppocrv4-det=16")
    assert int8._count(per_model, "ppocrv4-rec") == 64 and int8._count(per_model, "ppocrv4-det") == 16
    assert int8._count(per_model, "yolov8n-320") == 0  # not named: the workload's own split
    assert int8._count(int8._counts("32"), "yolov8n-320") == 32
    with pytest.raises(argparse.ArgumentTypeError, match="unknown model 'yolo'"):
        int8._counts("yolo=3")


@pytest.mark.slow
def test_the_int8_benchmark_writes_its_tables_plot_and_results_section(tmp_path):
    from benchmarks import int8

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nearlier sections\n")
    arguments = ["--models", "text-transformer", "--budgets", "0.8,latency:0.9", "--out", str(tmp_path / "INT8.md"),
                 "--plots", str(tmp_path / "plots"), "--results", str(results),
                 "--evaluation", "text-transformer=512"]
    assert int8.main(arguments) == 0
    table = (tmp_path / "INT8.md").read_text()
    assert "--evaluation text-transformer=512`" in table and " 512 evaluation samples)" in table
    for label in ("int8 alone (static QDQ", "int8 alone (dynamic", "ours 0.8 + int8 |", "ours latency 0.9 + int8 |",
                  "ours 0.8 + int8-dynamic |"):
        assert label in table, label
    assert (tmp_path / "plots" / "int8-text-transformer.png").stat().st_size > 10_000
    assert int8.main(arguments) == 0  # run again: the section is replaced, not appended
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\nearlier sections") and text.count(int8.RESULTS_START) == 1


@pytest.mark.slow
def test_the_int8_ablation_prints_each_part_in_float_and_int8(capsys):
    from benchmarks import int8_ablation

    assert int8_ablation.main(["text-transformer", "0.6", "--each"]) == 0
    printed = capsys.readouterr().out
    assert "int8 alone" in printed and "| whole plan |" in printed
    rows = [line for line in printed.splitlines() if line.startswith("| ") and not line.startswith("| part")
            and not line.startswith("| ---")]
    assert len(rows) >= 2 and all(len(row.split("|")) == 5 for row in rows)
    for row in rows:  # both columns are task metrics
        assert all(0.0 <= float(cell) <= 1.0 for cell in row.split("|")[2:4])


@pytest.mark.slow
def test_the_int8_calibration_study_scores_every_range_method_at_every_size(capsys):
    from benchmarks import int8_calibration
    from onnx_lowrank.stages.quantize import RANGES

    assert int8_calibration.main(["text-transformer", "--calibration", "8,32"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and line[2].isdigit()]
    assert [(int(r[0]), r[1].strip()) for r in rows] == [(n, ranges) for n in (8, 32) for ranges in RANGES]
    assert all(0.0 <= float(r[3]) <= 1.0 for r in rows)
    for n in (8, 32):  # one method chosen per size: the least output error on the calibration samples
        mine = [r for r in rows if int(r[0]) == n]
        chosen = [r for r in mine if r[4].strip() == "chosen"]
        assert len(chosen) == 1 and float(chosen[0][2]) == min(float(r[2]) for r in mine)
