"""Issue 19, "Advice that fits": a large change's cure matches what happened (no calibration, thin calibration,
--weight-only, the guard, one layer dominating the error, a plan far below its budget), and never asks for
calibration data that was given."""

from __future__ import annotations

import dataclasses

import pytest

from onnx_lowrank.plan import Gap, Plan
from onnx_lowrank.settings import AnalysisSettings
from onnx_lowrank.stages.analyze import ThinLayer
from onnx_lowrank.stages.report import LayerRow, NarrowedRow, Report
from onnx_lowrank.stages.verify import OutputComparison, Verification


def _row(name: str, error: float | None, rank: int | None = 4) -> LayerRow:
    return LayerRow(name=name, op="Gemm", weight_shape=(16, 16), k=None if rank is None else 1, rank=rank,
                    costs={"params": (256.0, 256.0 if rank is None else 128.0)}, error=error, planned_error=error)


def _report(moved: float = 0.5, errors=(0.3, 0.25), calibrated_on: str | None = "cal.npz", **changes) -> Report:
    """A report of two factorized layers fc1, fc2 whose outputs moved by `moved`, at params 0.5 of budget 0.5."""
    rows = tuple(_row(f"fc{index}", error) for index, error in enumerate(errors, 1))
    verification = Verification(outputs=(OutputComparison("y", moved, 1.0, 0.9, None),), samples=4)
    report = Report(layers=rows, skipped=(), before={"params": 512.0}, after={"params": 256.0},
                    plan=Plan(layers={row.name: (1, 4) for row in rows}, metric="params", budget=0.5),
                    verification=verification, verified_on="held.npz", calibrated_on=calibrated_on,
                    measure="output" if calibrated_on else "spectral")
    return dataclasses.replace(report, **changes)


def _movement(report: Report) -> str:
    return next(line for line in report.verdict if line.startswith("Outputs moved by"))


def test_small_changes_get_no_cure():
    line = _movement(_report(moved=0.03))
    assert line.endswith("a small change; check your task metric.")


def test_without_calibration_data_the_cure_is_calibration_data():
    line = _movement(_report(calibrated_on=None))
    assert "likely wrong. Give calibration data (--calibration), or raise the budget." in line


def test_calibration_given_is_never_asked_for_and_the_budget_is_the_cure():
    report = _report()
    line = _movement(report)
    assert "--calibration" not in line and line.endswith("likely wrong. Raise the budget.")
    assert report.cures == ("raise the budget",)


def test_weight_only_with_calibration_available_is_told_to_use_it():
    settings = AnalysisSettings(weight_only=True)
    report = _report(calibrated_on=None)
    report = dataclasses.replace(report, plan=dataclasses.replace(report.plan, settings=settings))
    assert report.cures[0] == "plan on calibration data (--calibration, without --weight-only)"
    assert "give calibration data" not in " ".join(report.cures)


def test_weight_only_because_the_samples_were_too_few_asks_for_more_samples():
    settings = AnalysisSettings(weight_only=True)
    report = _report(calibrated_on=None, few_samples=2)
    report = dataclasses.replace(report, plan=dataclasses.replace(report.plan, settings=settings))
    assert report.cures[0] == "calibrate on more samples (at least 4; 2 given)"
    assert "--weight-only" not in " ".join(report.cures) and "give calibration data" not in " ".join(report.cures)


def test_weight_only_chosen_by_the_judge_asks_for_more_samples():
    settings = AnalysisSettings(weight_only=True, method="lowrank")
    report = _report(calibrated_on=None)
    report = dataclasses.replace(report, plan=dataclasses.replace(report.plan, settings=settings,
                                                                   allocator="alds (weight only)"))
    assert report.cures[0].startswith("calibrate on more samples (on these, every data-aware plan did worse")
    assert "--weight-only" not in " ".join(report.cures)


def test_thin_calibration_asks_for_more_samples_or_weight_only():
    thin = (ThinLayer("fc1", 6, 512, False), ThinLayer("fc2", 6, 64, False))
    line = _movement(_report(thin_calibration=thin))
    assert "Calibrate on more samples (fc1 saw 6 rows for 512 inputs and 1 more)" in line
    assert "plan on the weights alone (--weight-only)" in line and "--calibration)" not in line


def test_thin_layers_that_already_fell_back_are_not_told_weight_only():
    report = _report(thin_calibration=(ThinLayer("fc1", 6, 512, True),))
    assert report.cures == ("calibrate on more samples (fc1 saw 6 rows for 512 inputs)", "raise the budget")


def test_a_layer_that_dominates_the_error_is_named_with_its_exclude_pattern():
    report = _report(errors=(0.6, 0.1), layers=(_row("/blk.0/fc", 0.6), _row("fc2", 0.1)))
    assert "keep /blk.0/fc dense (--exclude '^/blk\\.0/fc$')" in report.cures
    assert not any("--exclude" in cure for cure in _report(errors=(0.3, 0.2)).cures)  # nothing stands out
    assert not any("--exclude" in cure for cure in _report(errors=(0.6,)).cures)  # excluding it leaves nothing


def test_a_narrowed_layer_can_dominate_too():
    narrowed = (NarrowedRow(name="conv1", op="Conv", readers=("conv2",), channels=32, width=8, error=0.9,
                            planned_error=0.9, savings={"params": 100.0}),)
    assert "keep conv1 dense (--exclude '^conv1$')" in _report(narrowed=narrowed).cures


def _gapped(report: Report, gap: Gap, guarded: bool, ratio: float = 0.445) -> Report:
    plan = dataclasses.replace(report.plan, budget=0.9, gaps=(gap,))
    return dataclasses.replace(report, plan=plan, guarded=guarded, after={"params": ratio * 512})


def test_far_below_the_budget_the_verdict_says_why_in_one_line():
    """The issue's case: a 0.9 budget met by the one surviving candidate at 0.445 of the params."""
    report = _gapped(_report(errors=(0.24,)), Gap("fc1", 0.12, None, only=True), guarded=True)
    lines = report.verdict
    assert lines[0].startswith("Budget met: params 0.445")
    assert lines[1] == ("Far below the budget (params 0.445, asked 0.9): no layer had a form between this plan and "
                        "the budget (fc1: the only candidate keeps 0.12 of its params) (only candidates measured "
                        "faster count; --allow-slower lifts that).")
    # raising the budget cannot help short of 1: nothing sits between; the guard is what removed the rest
    assert report.cures == ("let factorizations not measured faster count (--allow-slower)",)
    unguarded = _gapped(_report(errors=(0.24,)), Gap("fc1", 0.12, None, only=True), guarded=False)
    assert "--allow-slower" not in " ".join(unguarded.verdict)
    assert unguarded.to_dict()["plan"]["gaps"] == [{"layer": "fc1", "kept": 0.12, "next_kept": None, "only": True}]


def test_a_gap_with_a_next_candidate_keeps_the_budget_cure():
    report = _gapped(_report(errors=(0.24,)), Gap("fc1", 0.3, 0.95), guarded=True)
    assert "fc1: keeps 0.30 of its params; the next candidate up keeps 0.95, more than the budget leaves" in \
        report.verdict[1]
    assert report.cures == ("raise the budget",)


def test_no_gap_line_near_the_budget():
    assert not any(line.startswith("Far below") for line in _report().verdict)


@pytest.mark.parametrize("moved", [float("nan"), float("inf")])
def test_unknown_movement_gets_the_not_finite_words_only(moved):
    line = _movement(_report(moved=moved))
    assert "NaN or infinite" in line and "Raise the budget" not in line


def test_a_layer_stuck_on_a_deep_cut_among_others_is_the_one_to_exclude():
    report = _gapped(_report(errors=(0.3, 0.25)), Gap("fc2", 0.12, None, only=True), guarded=False)
    assert report.cures == ("keep fc2 dense (--exclude '^fc2$')",)
