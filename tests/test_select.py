"""The `auto` judge (`select`): the plan whose outputs move least on the calibration samples, unless another plan's
error cannot be told from it (two jackknife standard errors) and it is measured faster."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import onnx_lowrank
from onnx_lowrank.stages import judge as select
from onnx_lowrank.stages.verify import OutputComparison, Verification

from conftest import build_cnn


def _verification(errors_per_sample: list[float]) -> Verification:
    """One output whose per-sample reference energy is 1 and error energy is the given squares."""
    squares = tuple((e * e, 1.0) for e in errors_per_sample)
    pooled = math.sqrt(sum(d for d, _ in squares) / sum(r for _, r in squares))
    return Verification(outputs=(OutputComparison("y", pooled, 0.0, 1.0, None),), samples=len(squares),
                        squares=(squares,))


def test_leave_one_out_is_the_pooled_error_without_each_sample():
    errors = [0.1, 0.3, 0.2, 0.05]
    check = _verification(errors)
    for i, value in enumerate(check.leave_one_out()):
        rest = [e for j, e in enumerate(errors) if j != i]
        assert value == pytest.approx(math.sqrt(sum(e * e for e in rest) / len(rest)))
    assert _verification([0.2]).leave_one_out() == []


def test_a_difference_within_the_noise_of_the_samples_is_a_tie_and_a_consistent_one_is_not():
    best = _verification([0.10, 0.30, 0.05, 0.20, 0.12, 0.25])
    noisy = _verification([0.15, 0.22, 0.09, 0.24, 0.08, 0.30])  # worse in the pool, better on two samples
    worse = _verification([0.12, 0.32, 0.07, 0.22, 0.14, 0.27])  # worse on every sample, by little
    assert noisy.worst_relative_l2 > best.worst_relative_l2 and worse.worst_relative_l2 > best.worst_relative_l2
    assert select._indistinguishable(noisy, best)
    assert not select._indistinguishable(worse, best)
    assert select._indistinguishable(best, best)


def test_the_judge_takes_the_fastest_plan_the_samples_cannot_tell_from_the_best(monkeypatch):
    rng = np.random.default_rng(0)
    model = build_cnn()
    feeds = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(6)]
    analysis = onnx_lowrank.analyze(model, calibration=feeds, method="lowrank", allow_slower=True)
    checks = {"alds": _verification([0.10, 0.30, 0.05, 0.20, 0.12, 0.25]),
              "uniform": _verification([0.15, 0.22, 0.09, 0.24, 0.08, 0.30]),
              "energy": _verification([0.12, 0.32, 0.07, 0.22, 0.14, 0.27])}
    times = {"alds": 3.0, "uniform": 2.0, "energy": 1.0}
    judged_plans: list[str] = []  # the allocators whose plans are judged, in order (all three differ here)
    real_allocate = select.allocate

    def allocate(analysis, budget, metric, allocator):
        judged_plans.append(allocator)
        return real_allocate(analysis, budget, metric=metric, allocator=allocator)

    def fake_verify(original, candidates, samples):
        assert judged_plans == list(checks)
        return [checks[name] for name in judged_plans]

    timed = []

    def fake_times(model, analysis, plans, feed):
        timed.append(sorted(plans))
        return {name: times[name] for name in plans}

    monkeypatch.setattr(select, "allocate", allocate)
    monkeypatch.setattr(select, "verify_many", fake_verify)
    monkeypatch.setattr(select, "measured_times", fake_times)
    samples = onnx_lowrank.graph.inputs.Samples.given(feeds, "test")
    timed_analysis = dataclasses.replace(analysis, costs={**analysis.costs, "latency": None})  # as if timed
    chosen = select.choose_plan(model, timed_analysis, 0.5, "params", samples)
    assert timed == [["alds", "uniform"]]  # only the plans the samples cannot tell apart are timed
    assert chosen.allocator == "uniform"  # energy is faster still, but worse on every sample
    assert "within two standard errors of alds's and measured faster" in chosen.notes[0]

    judged_plans.clear()  # layers not timed (--allow-slower): the smallest error wins
    assert select.choose_plan(model, analysis, 0.5, "params", samples).allocator == "alds"
    assert len(timed) == 1


def test_tied_plans_are_timed_as_written_models(tmp_path):
    rng = np.random.default_rng(1)
    model = build_cnn()
    feeds = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(6)]
    analysis = onnx_lowrank.analyze(model, calibration=feeds, method="both", latency_cache=tmp_path / "c.json")
    plans = {name: select.allocate(analysis, 0.8, metric="params", allocator=name) for name in ("alds", "uniform")}
    times = select.measured_times(model, analysis, plans, feeds[0])
    assert set(times) == {"alds", "uniform"} and all(ms > 0 for ms in times.values())
