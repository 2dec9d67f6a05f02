"""The one timing loop (`OnnxruntimeTimer`) and measure_latency_ratio on it return sane numbers (no timing
thresholds: CI machines are noisy); with a scripted timer the numbers are exactly the script's."""

from __future__ import annotations

import math
import statistics

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.stages import timing as latency
from onnx_lowrank.errors import InputDataError, InvalidOptionError
from onnx_lowrank.graph.runtime import RuntimeSettings
from onnx_lowrank.math.noise import EARLY_LEVEL, EARLY_MEASUREMENTS, NOISE_LEVEL, ratio_bounds
from onnx_lowrank.settings import SpeedSettings
from onnx_lowrank.stages.timing import (MEASUREMENTS, LatencyComparison, OnnxruntimeTimer, compare_models,
                                       measure_latency_ratio, model_latency)

from helpers.timers import ScriptedTimer


def matmul_chain(ranks: tuple[int, ...]) -> onnx.ModelProto:
    """x [N, 64] through MatMuls of the given inner sizes back to 64: (64,) is dense, (16, 64) a rank-16 pair."""
    rng = np.random.default_rng(0)
    sizes = (64, *ranks)
    nodes, weights, current = [], [], "x"
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        weights.append(numpy_helper.from_array(rng.standard_normal((n_in, n_out)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"]))
        current = f"h{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


FEEDS = [{"x": np.ones((8, 64), np.float32)}, {"x": np.zeros((2, 64), np.float32)}]


def test_returns_positive_medians_and_their_ratio():
    result = measure_latency_ratio(matmul_chain((64,)), matmul_chain((16, 64)), FEEDS, repeats=5, warmup=1,
                                   threads=1)
    assert isinstance(result, LatencyComparison)
    assert result.original_ms > 0 and result.compressed_ms > 0
    assert result.ratio == pytest.approx(result.compressed_ms / result.original_ms)
    assert set(result.to_dict()) == {"original_ms", "compressed_ms", "ratio", "rounds", "rounds_not_faster",
                                     "measurements", "ratio_bounds", "bounds_level", "faster_beyond_noise",
                                     "slower_beyond_noise", "against"}
    assert len(result.original_rounds) == len(result.compressed_rounds) == 5


class _LoggedSession:
    """An onnxruntime session that appends (label, batch size of the feed) to `log` on every run."""

    def __init__(self, sess, label, log):
        self._sess, self._label, self._log = sess, label, log

    def run(self, names, feed, *args, **kwargs):
        self._log.append((self._label, len(feed["x"])))
        return self._sess.run(names, feed, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._sess, name)


def _log_runs_and_pauses(monkeypatch) -> list:
    """Record every session run (the first session created is the original) and every sleep, in order."""
    log = []
    labels = iter(["original", "compressed"])
    real_session = latency.runtime.session
    monkeypatch.setattr(latency.runtime, "session",
                        lambda *args, **kwargs: _LoggedSession(real_session(*args, **kwargs), next(labels), log))
    monkeypatch.setattr(latency.time, "sleep", lambda seconds: log.append(("pause", seconds)))
    return log


def test_interleaves_rounds_over_the_feeds_without_pausing(monkeypatch):
    """Timing sessions stop their threads spinning at the end of each run, so no pause is needed between runs (the
    `pause_s` option is gone)."""
    log = _log_runs_and_pauses(monkeypatch)
    result = measure_latency_ratio(matmul_chain((64,)), matmul_chain((16, 64)), FEEDS, repeats=3, warmup=0)
    # one untimed round (warmup 0 still checks the feeds), then three timed rounds: round i runs feed i mod 2
    # (batch 8, then 2) on both models, the original first in even rounds and the compressed one first in odd ones
    warmup = [("original", 8), ("compressed", 8)]
    timed = [("original", 8), ("compressed", 8), ("compressed", 2), ("original", 2), ("original", 8), ("compressed", 8)]
    assert log == warmup + timed
    assert result.original_ms > 0 and result.compressed_ms > 0
    assert not hasattr(latency, "PAUSE_S")
    with pytest.raises(TypeError):
        measure_latency_ratio(matmul_chain((64,)), matmul_chain((64,)), FEEDS, pause_s=0.0)


def test_does_not_pause_by_default(monkeypatch):
    log = _log_runs_and_pauses(monkeypatch)
    measure_latency_ratio(matmul_chain((64,)), matmul_chain((64,)), FEEDS[:1], repeats=3, warmup=2)
    # two warm-up rounds, three timed ones (in alternating order), no pause
    assert log == [("original", 8), ("compressed", 8)] * 3 + [("compressed", 8), ("original", 8)] + [
        ("original", 8), ("compressed", 8)]


def test_the_timer_returns_every_round_and_the_medians():
    timings = OnnxruntimeTimer(RuntimeSettings(threads=1)).time(
        [matmul_chain((64,)), matmul_chain((16, 64))], [FEEDS, FEEDS[:1]], rounds=4)
    assert len(timings.medians) == 2 and [len(s) for s in timings.samples] == [4, 4]
    assert all(ms > 0 for ms in timings.medians)
    assert all(min(s) <= m <= max(s) for m, s in zip(timings.medians, timings.samples))


def test_a_scripted_timer_decides_the_ratio_and_the_model_time():
    timer = ScriptedTimer(lambda model: float(len(model.graph.node)))  # 2 nodes dense, 3 factorized
    result = measure_latency_ratio(matmul_chain((64,)), matmul_chain((16, 64)), FEEDS, repeats=3, timer=timer)
    assert (result.original_ms, result.compressed_ms, result.ratio) == (2.0, 3.0, 1.5)
    assert model_latency(matmul_chain((64,)), FEEDS[0], RuntimeSettings(), timer=timer) == 2.0
    assert len(timer.calls) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"repeats": 0}, "'repeats'"),
        ({"warmup": -1}, "'warmup'"),
        ({"threads": 0}, "'threads'"),
        ({"repeats": 2.5}, "'repeats'"),
    ],
)
def test_rejects_bad_options(kwargs, match):
    with pytest.raises(InvalidOptionError, match=match):
        measure_latency_ratio(matmul_chain((64,)), matmul_chain((64,)), FEEDS, **kwargs)


def test_rejects_missing_or_bad_feeds():
    with pytest.raises(InputDataError, match="No samples"):
        measure_latency_ratio(matmul_chain((64,)), matmul_chain((64,)), [])
    with pytest.raises(InputDataError, match="rejected the inputs"):
        measure_latency_ratio(matmul_chain((64,)), matmul_chain((64,)), [{"x": np.ones((1, 3), np.float32)}],
                              warmup=0)


# ------------------------------------------------------------------ whole models: several measurements, fresh sessions


def test_ratio_bounds_come_from_the_spread_of_independent_measurements():
    assert ratio_bounds([0.9]) == pytest.approx((0.9, 0.9))
    assert ratio_bounds([0.9] * 5) == pytest.approx((0.9, 0.9))
    lower, upper = ratio_bounds([0.86, 1.09, 0.86, 1.09, 0.86])
    centre = math.exp(statistics.fmean(math.log(r) for r in [0.86, 1.09, 0.86, 1.09, 0.86]))
    assert lower < centre < upper and lower < 1.0 < upper
    lower, upper = ratio_bounds([0.95, 0.96, 0.94, 0.95, 0.955])
    assert upper < 1.0  # a consistent 5% across fresh sessions is beyond noise


def test_compare_models_stops_early_when_the_difference_is_clear():
    """3% faster in every measurement, no spread: clear after the early look, at its stricter level."""
    timer = ScriptedTimer(lambda model: 1.0 if len(model.graph.node) == 2 else 0.97)
    result = compare_models(matmul_chain((64,)), matmul_chain((16, 64)), FEEDS, SpeedSettings(timer=timer))
    assert len(timer.calls) == EARLY_MEASUREMENTS == len(result.pair_ratios) < MEASUREMENTS
    assert result.level == EARLY_LEVEL
    assert result.ratio == pytest.approx(0.97) and result.faster and not result.slower


def test_compare_models_takes_every_measurement_when_the_early_look_cannot_tell():
    """3% faster, sessions differing by +-1%: the first three measurements cannot call it at the early level, all
    five can at the rest of the level (the two looks share NOISE_LEVEL)."""
    timer = ScriptedTimer(lambda model: 1.0 if len(model.graph.node) == 2 else 0.97, session_jitter=0.01)
    result = compare_models(matmul_chain((64,)), matmul_chain((16, 64)), FEEDS, SpeedSettings(timer=timer))
    assert ratio_bounds(result.pair_ratios[:EARLY_MEASUREMENTS], EARLY_LEVEL)[1] > 1.0
    assert len(timer.calls) == MEASUREMENTS == len(result.pair_ratios)
    assert result.level == pytest.approx(NOISE_LEVEL - EARLY_LEVEL)
    assert result.faster and not result.slower


def test_compare_models_with_few_measurements_has_no_early_look():
    timer = ScriptedTimer(lambda model: 1.0 if len(model.graph.node) == 2 else 0.97)
    result = compare_models(matmul_chain((64,)), matmul_chain((16, 64)), FEEDS, SpeedSettings(timer=timer),
                            measurements=EARLY_MEASUREMENTS)
    assert len(timer.calls) == EARLY_MEASUREMENTS and result.level == NOISE_LEVEL


def test_an_early_slower_verdict_also_stops():
    timer = ScriptedTimer(lambda model: 1.0 if len(model.graph.node) == 2 else 1.2)
    result = compare_models(matmul_chain((64,)), matmul_chain((16, 64)), FEEDS, SpeedSettings(timer=timer))
    assert len(timer.calls) == EARLY_MEASUREMENTS and result.slower and not result.faster


def test_a_difference_every_round_of_one_measurement_shares_is_not_beyond_noise():
    """3% faster in every round of every measurement, but sessions differ by 6% from one measurement to the next:
    one measurement's rounds would call it faster (the sign test), the measurements together cannot."""
    timer = ScriptedTimer(lambda model: 1.0 if len(model.graph.node) == 2 else 0.97, session_jitter=0.06)
    first = timer.time([matmul_chain((64,)), matmul_chain((16, 64))], [FEEDS, FEEDS], rounds=8)
    assert all(c < o for c, o in zip(*reversed(first.samples)))  # every round of one measurement agrees
    result = compare_models(matmul_chain((64,)), matmul_chain((16, 64)), FEEDS, SpeedSettings(timer=timer))
    assert min(result.pair_ratios) < 0.9 and max(result.pair_ratios) > 1.05
    assert not result.faster and not result.slower


class _NullTimer:
    """Two models of the same speed, sessions differing at random (3% spread of the logs, seeded): every verdict
    of "faster" is a false one."""

    def __init__(self, rng):
        self.rng = rng

    def time(self, models, feeds, rounds, warmup=1, block_s=0.0):
        medians = (1.0, float(np.exp(self.rng.normal(0.0, 0.03))))
        return latency.Timings(medians, tuple((ms,) * rounds for ms in medians))


def test_the_early_look_keeps_the_false_faster_rate_within_the_noise_level():
    """Two looks at the same data call more differences than one: at NOISE_LEVEL each, 7.8% of no-difference pairs
    came out faster (20,000 simulated pairs); with the early look at EARLY_LEVEL and the last at the rest, 4.6%."""
    timer = _NullTimer(np.random.default_rng(0))
    speed = SpeedSettings(timer=timer)
    trials = 4000
    faster = sum(compare_models(matmul_chain((64,)), matmul_chain((64,)), FEEDS[:1], speed).faster
                 for _ in range(trials))
    assert faster / trials <= NOISE_LEVEL + 0.005
