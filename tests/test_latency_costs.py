"""The latency cost model: interpolation, the disk cache, the timing grid, the guard and the latency budget.

No test here asserts a speed: timings on a CI machine are noise. They check what is computed from timings (given
synthetic ones, or a scripted timer, where the outcome must be known), and that the cache makes a second run time
nothing.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from helpers.builders import build_cnn
from helpers.timers import ScriptedTimer
from onnx_lowrank.stages import layer_timing
from onnx_lowrank.stages.allocate import allocate
from onnx_lowrank.stages.analyze import analyze_layers
from onnx_lowrank.stages.cost_models import FormTiming, LatencyCost, LayerTiming, interpolate
from onnx_lowrank.stages.discover import discover
from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.stages.latency_cache import LatencyCache, variant_key
from onnx_lowrank.stages.layer_timing import blocked, largest_candidate_rank, measure_layers, rank_grid
from onnx_lowrank.passes.isolate import ISOLATED_INPUT, isolate_layer
from onnx_lowrank.graph import runtime
from onnx_lowrank.graph.runtime import RuntimeSettings

SHAPES = {"x": (1, 3, 16, 16), "r1": (1, 16, 16, 16), "r2": (1, 32, 8, 8), "flat": (1, 32), "r4": (1, 64)}


# ---------------------------------------------------------------------------------------------------- interpolation


def test_interpolation_is_exact_at_points_linear_between_and_clamped_outside():
    points = ((16, 1.0), (32, 2.0), (64, 6.0))
    assert interpolate(points, 16) == 1.0 and interpolate(points, 32) == 2.0 and interpolate(points, 64) == 6.0
    assert interpolate(points, 24) == pytest.approx(1.5)
    assert interpolate(points, 48) == pytest.approx(4.0)
    assert interpolate(points, 1) == 1.0  # never extrapolated below the first point ...
    assert interpolate(points, 100) == 6.0  # ... nor above the last
    with pytest.raises(ValueError):
        interpolate((), 3)


def test_form_offers_only_ranks_on_its_alignment():
    form = FormTiming(points=((16, 1.0), (48, 3.0)), aligned_to=16)
    assert form.offers(32) and not form.offers(31)
    assert form.ms(32) == pytest.approx(2.0)
    assert FormTiming(points=((1, 1.0), (9, 2.0))).offers(5)


# ------------------------------------------------------------------------------------------------------------ cache


def _key(**changes):
    layer = {"op": "Conv", "attributes": ["[1, 1]strides"], "input": [1, 16, 8, 8], "weight": [32, 16, 3, 3],
             "dtype": "float32", "bias": True}
    settings = RuntimeSettings(threads=2)
    form = (1, 16)
    for name, value in changes.items():
        if name == "form":
            form = value
        elif name == "settings":
            settings = value
        else:
            layer[name] = value
    return variant_key(layer, form, settings)


def test_keys_change_with_everything_a_time_depends_on():
    base = _key()
    assert base == _key()  # stable
    others = [_key(input=[1, 16, 16, 16]), _key(weight=[32, 16, 1, 1]), _key(attributes=["[2, 2]strides"]),
              _key(dtype="float64"), _key(bias=False), _key(op="Gemm"), _key(form=(2, 16)), _key(form=(1, 32)),
              _key(form=None), _key(settings=RuntimeSettings(threads=1)),
              _key(settings=RuntimeSettings(threads=2, optimization="basic"))]
    assert len({base, *others}) == len(others) + 1


def test_cache_round_trips_through_its_file(tmp_path):
    path = tmp_path / "sub" / "latency.json"
    cache = LatencyCache(path)
    cache.put("a", 1.5)
    cache.save()
    assert LatencyCache(path).get("a") == 1.5
    assert not [p for p in path.parent.iterdir() if p.name != "latency.json"]  # no temporary file left behind


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format": "other", "version": 1, "entries": {}}),
                                  json.dumps({"format": "onnx-lowrank-latency-cache", "version": 1,
                                              "entries": {"a": "fast"}}),
                                  json.dumps([1, 2])])
def test_a_corrupt_cache_is_ignored_with_a_warning_and_replaced(tmp_path, text):
    path = tmp_path / "latency.json"
    path.write_text(text)
    with pytest.warns(UserWarning, match="ignoring the latency cache"):
        cache = LatencyCache(path)
    assert len(cache) == 0
    cache.put("b", 2.0)
    cache.save()
    assert json.loads(path.read_text())["entries"] == {"b": 2.0}


def test_an_unwritable_cache_only_warns(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = LatencyCache(blocker / "latency.json")  # its folder would have to be inside a file
    cache.put("a", 1.0)
    with pytest.warns(UserWarning, match="cannot write the latency cache"):
        cache.save()


# ------------------------------------------------------------------------------------------------------ timing grid


def test_rank_grid_is_on_the_block_and_keeps_both_ends():
    assert rank_grid(100, 16, 5) == [16, 32, 48, 80, 96]  # 6 multiples, 5 kept evenly, both ends in
    grid = rank_grid(230, 16, 5)
    assert grid[0] == 16 and grid[-1] == 224 and len(grid) == 5 and all(r % 16 == 0 for r in grid)
    assert rank_grid(10, 16, 5) == []  # no rank on the block fits: nothing to offer
    assert rank_grid(9, 1, 4) == [1, 4, 6, 9]
    assert rank_grid(0, 1, 4) == []


def test_blocked_layout_rule():
    layers = {l.name: l for l in discover(build_cnn(), shapes=SHAPES).layers}
    assert blocked(layers["conv2"], 16) and blocked(layers["conv2"], 8)
    assert blocked(layers["conv1"], 16)  # channel counts off the block are padded: still blocked
    assert not blocked(layers["fc1"], 16)  # Gemm


def test_isolated_layer_keeps_the_node_and_its_attributes():
    model = build_cnn()
    before = model.SerializeToString()
    layer = next(l for l in discover(model, shapes=SHAPES).layers if l.name == "conv2")
    isolated = isolate_layer(model, layer, SHAPES["r1"])
    onnx.checker.check_model(isolated, full_check=True)
    (node,) = isolated.graph.node
    original = next(n for n in model.graph.node if n.name == "conv2")
    assert node.op_type == "Conv" and list(node.attribute) == list(original.attribute)
    assert isolated.graph.input[0].name == ISOLATED_INPUT
    assert list(isolated.graph.output[0].type.tensor_type.shape.dim)[1].dim_value == 32
    assert model.SerializeToString() == before  # the caller's model is untouched


def test_measure_layers_times_every_form_and_a_warm_cache_times_nothing(monkeypatch):
    model = build_cnn()
    layers = discover(model, shapes=SHAPES).layers
    cache = LatencyCache(None)
    settings = RuntimeSettings(threads=1)
    monkeypatch.setattr(layer_timing, "ROUNDS", 2)
    monkeypatch.setattr(layer_timing, "block_size", lambda: 8)
    timings = measure_layers(model, layers, SHAPES, settings, cache, max_groups=2)
    assert set(timings) == {l.name for l in layers}
    conv3 = next(l for l in layers if l.name == "conv3")  # 32 -> 32, 3x3: blocked with an 8-channel block
    forms = timings["conv3"].forms
    assert set(forms) == {1, 2}
    for k, form in forms.items():
        assert form.aligned_to == 8 and all(r % 8 == 0 for r, _ in form.points)
        assert form.points[-1][0] <= largest_candidate_rank(conv3, k)
    assert all(ms > 0 for t in timings.values() for f in t.forms.values() for _, ms in f.points)
    assert timings["fc1"].forms[1].aligned_to == 1  # Gemm: any rank
    entries = len(cache)

    def no_session(*args, **kwargs):
        raise AssertionError("a warm cache must not time anything")

    monkeypatch.setattr(runtime, "session", no_session)
    timer = ScriptedTimer()
    again = measure_layers(model, layers, SHAPES, settings, cache, max_groups=2, timer=timer)
    assert again == timings and len(cache) == entries and timer.calls == []


def test_measure_layers_keeps_what_the_timer_measured():
    model = build_cnn()
    layers = discover(model, shapes=SHAPES).layers
    timer = ScriptedTimer(lambda m: float(len(m.graph.node)))  # a layer alone: 1 node; factorized: more
    timings = measure_layers(model, layers, SHAPES, RuntimeSettings(threads=1), LatencyCache(None), max_groups=2,
                             timer=timer)
    assert len(timer.calls) == len(layers)  # every layer's variants in one interleaved call
    assert all(t.dense_ms == 1.0 for t in timings.values())
    assert all(ms > 1.0 for t in timings.values() for f in t.forms.values() for _, ms in f.points)


# ----------------------------------------------------------------------------------------- guard and latency budget


def _synthetic_analysis(guard: bool):
    """conv2/conv3/fc1/fc2 priced by made-up timings: conv2 gets faster with lower rank, conv3 is never faster."""
    model = build_cnn()
    discovery = discover(model, shapes=SHAPES)
    timings = {}
    for layer in discovery.layers:
        if layer.name == "conv3":
            timings[layer.name] = LayerTiming(1.0, {1: FormTiming(((8, 1.0), (16, 1.2)), aligned_to=8)})
        else:
            top = largest_candidate_rank(layer, 1)
            timings[layer.name] = LayerTiming(1.0, {1: FormTiming(((1, 0.1), (max(top, 2), 0.9)))})
    latency = LatencyCost(total=10.0, timings=timings)
    return model, analyze_layers(model, discovery, SHAPES, max_groups=1, latency=latency, guard=guard)


def test_guard_drops_the_candidates_measured_slower_than_dense():
    _, guarded = _synthetic_analysis(guard=True)
    _, free = _synthetic_analysis(guard=False)
    assert guarded.guarded and not free.guarded
    # no per-round times (made by hand): the medians decide; conv3 is as fast as dense at rank 8, slower above
    assert [c.rank for c in guarded.layer("conv3").candidates] == [8]
    assert free.layer("conv3").candidates and all(c.rank % 8 == 0 for c in free.layer("conv3").candidates)
    assert len(free.layer("conv3").candidates) > 1
    for entry in guarded.layers:
        assert all(c.costs["latency"] <= entry.dense["latency"] for c in entry.candidates)


def test_latency_budget_counts_the_fixed_rest():
    _, analysis = _synthetic_analysis(guard=True)
    plan = allocate(analysis, 0.8, metric="latency")
    rest = analysis.total("latency") - sum(e.dense["latency"] for e in analysis.layers)
    kept = rest + sum(
        next(c.costs["latency"] for c in e.candidates if (c.k, c.rank) == plan.layers[e.layer.name])
        if e.layer.name in plan.layers else e.dense["latency"]
        for e in analysis.layers
    )
    assert plan.metric == "latency" and plan.layers
    assert kept <= 0.8 * analysis.total("latency") + 1e-9


def test_latency_metric_without_measurements_says_what_to_do():
    model = build_cnn()
    analysis = analyze_layers(model, discover(model, shapes=SHAPES), SHAPES, max_groups=1)
    with pytest.raises(InvalidOptionError, match="latency metric needs"):
        allocate(analysis, 0.5, metric="latency")


def test_whole_model_time_is_cached_with_the_layers_and_measured_again_with_them(tmp_path, monkeypatch):
    from onnx_lowrank import api

    calls = []
    original = layer_timing.realized_fraction
    monkeypatch.setattr(layer_timing, "realized_fraction", lambda *a, **k: calls.append(1) or original(*a, **k))
    cache = tmp_path / "latency.json"
    model = build_cnn()
    timer = ScriptedTimer()
    first = api.analyze(model, threads=1, latency_cache=cache, timer=timer)
    assert timer.calls
    second = api.analyze(model, threads=1, latency_cache=cache, timer=(timer := ScriptedTimer()))
    assert len(calls) == 1 and second.total("latency") == first.total("latency")
    assert timer.calls == []  # nothing timed again
    entries = json.loads(cache.read_text())["entries"]
    entries.pop(next(iter(entries)))  # one timing gone: that layer, and the whole model, are timed again
    cache.write_text(json.dumps({"format": "onnx-lowrank-latency-cache", "version": 1, "entries": entries}))
    api.analyze(model, threads=1, latency_cache=cache, timer=timer)
    assert len(calls) == 2


def test_realized_fraction_scales_every_saving():
    timing = LayerTiming(2.0, {1: FormTiming(((16, 1.0), (32, 1.5)))})
    layer = discover(build_cnn(), shapes=SHAPES).layers[1]
    full = LatencyCost(total=10.0, timings={layer.name: timing})
    half = LatencyCost(total=10.0, timings={layer.name: timing}, realized=0.5)
    assert full.factorized(layer, 1, 16) == pytest.approx(1.0)
    assert half.factorized(layer, 1, 16) == pytest.approx(1.5)  # half of the 1.0 ms saving
    assert half.factorized(layer, 1, 32) == pytest.approx(1.75)
    assert half.dense(layer) == 2.0 and half.factorized(layer, 2, 16) is None


def test_probe_measures_a_bounded_fraction():
    model = build_cnn()
    layers = discover(model, shapes=SHAPES).layers
    timings = {l.name: LayerTiming(1.0, {1: FormTiming(((1, 0.5),))}) for l in layers}
    feed = {"x": np.zeros(SHAPES["x"], np.float32)}
    total, fraction = layer_timing.realized_fraction(model, layers, timings, feed, RuntimeSettings(threads=1), rounds=3)
    assert total > 0
    assert layer_timing.MIN_REALIZED <= fraction <= layer_timing.MAX_REALIZED
    no_forms = {l.name: LayerTiming(1.0) for l in layers}
    assert layer_timing.realized_fraction(model, layers, no_forms, feed, RuntimeSettings(threads=1))[1] == 1.0


@pytest.mark.parametrize("probe_ms, fraction", [(9.0, 0.4), (0.0, layer_timing.MAX_REALIZED),
                                                (10.0, layer_timing.MIN_REALIZED)])
def test_probe_fraction_is_what_the_timer_measured_bounded(probe_ms, fraction):
    model = build_cnn()
    layers = discover(model, shapes=SHAPES).layers  # five layers, each predicted to save 0.5 ms: 2.5 ms in all
    timings = {l.name: LayerTiming(1.0, {1: FormTiming(((1, 0.5),))}) for l in layers}
    feed = {"x": np.zeros(SHAPES["x"], np.float32)}
    original = model.SerializeToString()
    timer = ScriptedTimer(lambda m: 10.0 if m.SerializeToString() == original else probe_ms)
    total, measured = layer_timing.realized_fraction(model, layers, timings, feed, RuntimeSettings(), timer=timer)
    assert total == 10.0 and measured == pytest.approx(fraction)
    assert [len(models) for models in timer.calls] == [2]  # the original and the probe, interleaved
