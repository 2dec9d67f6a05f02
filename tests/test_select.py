"""The `auto` judge (`select`): the plan whose outputs move least on the calibration samples, unless another plan's
error cannot be told from it (two jackknife standard errors) and it is measured faster."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import onnx_lowrank
from onnx_lowrank.settings import SpeedSettings
from onnx_lowrank.stages import judge as select
from onnx_lowrank.stages.verify import OutputComparison, Verification

from helpers.builders import build_cnn
from helpers.timers import ScriptedTimer


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


BEST = [0.10, 0.30, 0.05, 0.20, 0.12, 0.25] * 3  # 18 rows: at least select.TIE_ROWS
NOISY = [0.15, 0.22, 0.09, 0.24, 0.08, 0.30] * 3  # worse in the pool, better on a third of the rows
WORSE = [0.12, 0.32, 0.07, 0.22, 0.14, 0.27] * 3  # worse on every row, by little


def test_a_difference_within_the_noise_of_the_samples_is_a_tie_and_a_consistent_one_is_not():
    best, noisy, worse = map(_verification, (BEST, NOISY, WORSE))
    assert noisy.worst_relative_l2 > best.worst_relative_l2 and worse.worst_relative_l2 > best.worst_relative_l2
    assert select._indistinguishable(noisy, best)
    assert not select._indistinguishable(worse, best)
    assert select._indistinguishable(best, best)


def test_on_fewer_held_out_rows_than_tie_rows_a_worse_plan_is_never_tied():
    # ppocr-cls scored on 4 held-out rows: a plan with 17x the best error was 'within two standard errors'
    best = _verification([0.02, 0.01, 0.03, 0.02])
    much_worse = _verification([0.02, 0.01, 0.03, 0.60])
    assert select.TIE_ROWS > 4
    assert not select._indistinguishable(much_worse, best)
    assert not select._indistinguishable(_verification(NOISY[:6]), _verification(BEST[:6]))
    assert select._indistinguishable(best, best)


def _judged(monkeypatch, checks: dict):
    """The CNN analysed (layers not timed), its samples, and `checks` (allocator -> Verification) standing in for the
    plans' measured output errors; the list of allocators whose plans were judged, in order."""
    rng = np.random.default_rng(0)
    model = build_cnn()
    feeds = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(6)]
    analysis = onnx_lowrank.analyze(model, calibration=feeds, method="lowrank", allow_slower=True)
    judged_plans: list[str] = []  # the allocators whose plans are judged, in order (all three differ here)
    real_allocate = select.allocate

    def allocate(analysis, budget, metric, allocator):
        judged_plans.append(allocator)
        return real_allocate(analysis, budget, metric=metric, allocator=allocator)

    def fake_verify(original, candidates, samples):
        assert judged_plans == list(checks)
        return [checks[name] for name in judged_plans]

    monkeypatch.setattr(select, "allocate", allocate)
    monkeypatch.setattr(select, "verify_many", fake_verify)
    # the data-aware plans alone, scored on one fold (folds and weight-only plans: tests/test_few_samples.py)
    monkeypatch.setattr(select, "weight_only", lambda analysis: None)
    monkeypatch.setattr(select, "_folds", lambda model, analysis, samples: ([(samples, analysis, samples)], "the samples"))
    return model, analysis, onnx_lowrank.graph.inputs.Samples.given(feeds, "test"), judged_plans


def _written_bytes(model, analysis, allocator: str) -> bytes:
    return select._written(model, analysis, select.allocate(analysis, 0.5, "params", allocator)).SerializeToString()


def _timer_by_plan(model, analysis, times: dict) -> ScriptedTimer:
    """A scripted timer giving each allocator's written model (at budget 0.5, by params) the time in `times`."""
    by_model = {_written_bytes(model, analysis, name): ms for name, ms in times.items()}
    return ScriptedTimer(lambda written: by_model[written.SerializeToString()])


CHECKS = {"alds": _verification(BEST),
          "uniform": _verification(NOISY),  # cannot be told from alds
          "energy": _verification(WORSE)}  # worse than alds on every row


@pytest.mark.parametrize("times, chosen_allocator", [({"alds": 3.0, "uniform": 2.0, "energy": 1.0}, "uniform"),
                                                     ({"alds": 2.0, "uniform": 3.0, "energy": 1.0}, "alds")])
def test_the_judge_takes_the_fastest_plan_the_samples_cannot_tell_from_the_best(monkeypatch, tmp_path, times,
                                                                               chosen_allocator):
    model, analysis, samples, judged_plans = _judged(monkeypatch, CHECKS)
    timer = _timer_by_plan(model, analysis, times)
    judged_plans.clear()
    timed_analysis = dataclasses.replace(analysis, costs={**analysis.costs, "latency": None})  # as if timed
    speed = SpeedSettings(cache=tmp_path / "latency.json", timer=timer)
    chosen = select.choose_plan(model, timed_analysis, 0.5, "params", samples, speed)
    assert [len(models) for models in timer.calls] == [2]  # only the plans the samples cannot tell apart are timed
    assert {m.SerializeToString() for m in timer.calls[0]} == {_written_bytes(model, analysis, name)
                                                               for name in ("alds", "uniform")}
    assert chosen.allocator == chosen_allocator  # energy is faster still, but worse on every sample
    assert ("within two standard errors of alds's and measured faster" in chosen.notes[0]) == (
        chosen_allocator != "alds")

    judged_plans.clear()  # layers not timed (--allow-slower): the smallest error wins
    assert select.choose_plan(model, analysis, 0.5, "params", samples, speed).allocator == "alds"
    assert len(timer.calls) == 1


def test_the_judge_reads_its_timings_from_the_latency_cache(monkeypatch, tmp_path):
    """Runs sharing a cache choose the same plan: the second one times nothing."""
    model, analysis, samples, judged_plans = _judged(monkeypatch, CHECKS)
    timed_analysis = dataclasses.replace(analysis, costs={**analysis.costs, "latency": None})  # as if timed
    cache = tmp_path / "latency.json"
    chosen = []
    for times in ({"alds": 3.0, "uniform": 2.0, "energy": 1.0}, {"alds": 2.0, "uniform": 3.0, "energy": 1.0}):
        timer = _timer_by_plan(model, analysis, times)
        judged_plans.clear()
        chosen.append(select.choose_plan(model, timed_analysis, 0.5, "params", samples,
                                         SpeedSettings(cache=cache, timer=timer)))
    assert [p.allocator for p in chosen] == ["uniform", "uniform"]  # the second timer would have said alds ...
    assert timer.calls == []  # ... but the judge read the first run's times
    assert chosen[0].notes == chosen[1].notes


def test_tied_plans_are_timed_as_written_models(tmp_path):
    rng = np.random.default_rng(1)
    model = build_cnn()
    feeds = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(6)]
    analysis = onnx_lowrank.analyze(model, calibration=feeds, method="both", latency_cache=tmp_path / "c.json")
    plans = {name: select.allocate(analysis, 0.8, metric="params", allocator=name) for name in ("alds", "uniform")}
    times = select.measured_times(model, analysis, plans, feeds[0])
    assert set(times) == {"alds", "uniform"} and all(ms > 0 for ms in times.values())
    timer = ScriptedTimer(lambda written: float(len(written.graph.node)))
    speed = SpeedSettings(cache=tmp_path / "judge.json", timer=timer)
    assert select.measured_times(model, analysis, plans, feeds[0], speed) == {
        name: float(len(select._written(model, analysis, plan).graph.node)) for name, plan in plans.items()}
    assert select.measured_times(model, analysis, plans, feeds[0], speed) == {
        name: float(len(select._written(model, analysis, plan).graph.node)) for name, plan in plans.items()}
    assert len(timer.calls) == 1  # the second time from the cache
