"""Issue 19: on models it has never seen, the defaults keep their promises.

Correctness tests with the default options (never-slower guard on, onnxruntime's own clock): tiny layers whose
weights are exactly low rank compress losslessly at params 0.8, and hidden units that duplicate others (exactly, or
positively scaled through ReLU / LeakyRelu) are removed losslessly by `eliminate` and by the default `both`, checked
on samples disjoint from calibration. Nothing timed may decide them: every layer here runs near onnxruntime's
per-node overhead, which the guard does not judge alone, or (a 2-D conv) is far cheaper in its exact form. Then scripted-timer tests of the guard's statistics and of
the whole-model check.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers.builders import make_model, tensor
from helpers.files import save
from helpers.timers import ScriptedTimer, weights_and_nodes
from onnx import helper

from onnx_lowrank import api
from onnx_lowrank.cli.main import main
from onnx_lowrank.errors import SlowerModelError
from onnx_lowrank.plan import Plan
from onnx_lowrank.math.noise import tolerated_rounds
from onnx_lowrank.stages.cost_models import FormTiming, LatencyCost, LayerTiming

LOSSLESS = 1e-4


def low_rank(rng, rows, cols, rank=4):
    return (rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / np.sqrt(cols)).astype(np.float32)


def gemm_model(c_shape, trans_b, alpha=1.0, beta=1.0):
    rng = np.random.default_rng(1)
    w = low_rank(rng, 48, 40)  # (in, out)
    inits = {"w": w.T.copy() if trans_b else w}
    inputs = ["x", "w"]
    if c_shape is not None:
        inits["c"] = rng.standard_normal(c_shape).astype(np.float32)
        inputs.append("c")
    node = helper.make_node("Gemm", inputs, ["y"], transB=trans_b, alpha=alpha, beta=beta, name="fc")
    return make_model([node], [tensor("x", [4, 48])], [tensor("y", [4, 40])], inits)


def matmul_3d_model():
    rng = np.random.default_rng(2)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    return make_model([node], [tensor("x", [2, 6, 48])], [tensor("y", [2, 6, 40])], {"w": low_rank(rng, 48, 40)})


def conv_model(dims, c_in=16, c_out=32, side=6):
    rng = np.random.default_rng(3)
    kernel = (3,) * dims
    w = low_rank(rng, c_out, c_in * 3 ** dims).reshape(c_out, c_in, *kernel)
    spatial = [side] * dims
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1] * 2 * dims, name="conv")
    return make_model([node], [tensor("x", [1, c_in, *spatial])], [tensor("y", [1, c_out, *spatial])],
                      {"w": w, "b": rng.standard_normal(c_out).astype(np.float32)})


LOW_RANK = {
    "gemm scalar C transB 0 alpha beta": lambda: gemm_model((), 0, alpha=0.5, beta=2.0),
    "gemm vector C transB 1": lambda: gemm_model((40,), 1),
    "gemm no C transB 1 alpha": lambda: gemm_model(None, 1, alpha=1.5),
    "matmul 3-D input": matmul_3d_model,
    "conv 1-D": lambda: conv_model(1),
    # a 2-D conv runs in onnxruntime's blocked layout, whose reorders cost ~25 us at any size: never near the
    # per-node overhead, so it is judged, and made big enough that its exact form (rank 4, written at the smallest
    # rank on the channel block) is several times cheaper than dense, not a coin toss
    "conv 2-D": lambda: conv_model(2, c_in=32, c_out=64, side=8),
}


def _lossless(report, budget):
    assert report.verification is not None
    assert report.verification.worst_relative_l2 < LOSSLESS
    assert report.params_ratio <= budget + 1e-9


@pytest.mark.parametrize("name", sorted(LOW_RANK))
def test_exactly_low_rank_tiny_layers_compress_losslessly_with_the_defaults(name, tmp_path):
    _, report = api.compress(LOW_RANK[name](), 0.8, latency_cache=tmp_path / "latency.json")
    assert report.guarded  # the guard was on, and measured: it must not remove a lossless candidate of a tiny layer
    _lossless(report, 0.8)


def test_exactly_low_rank_gemm_compresses_losslessly_from_the_command_line(tmp_path):
    source = save(gemm_model((40,), 1), tmp_path / "m.onnx")
    out, report = tmp_path / "c.onnx", tmp_path / "r.json"
    assert main(["compress", str(source), str(out), "--budget", "0.8", "--report", str(report)]) == 0
    summary = json.loads(report.read_text())["summary"]
    assert summary["params_ratio"] <= 0.8 and summary["never_slower_guard"] is True
    assert json.loads(report.read_text())["verification"]["worst_relative_l2"] < LOSSLESS
    assert onnx.load(out).graph.node


# ------------------------------------------------------------------------------------------ duplicated hidden units


def _duplicated(rng, width, copies, positive_scale):
    """Source index of every hidden unit (the last `copies` repeat earlier ones) and its positive scale."""
    sources = np.concatenate([np.arange(width - copies), rng.choice(width - copies, copies, replace=False)])
    scales = rng.uniform(0.5, 2.0, width).astype(np.float32) if positive_scale else np.ones(width, np.float32)
    scales[: width - copies] = 1.0
    return sources, scales


def mlp_relu():
    rng = np.random.default_rng(4)
    sources, scales = _duplicated(rng, 64, 16, positive_scale=True)
    w1, b1 = rng.standard_normal((24, 48)).astype(np.float32) / 5, rng.standard_normal(48).astype(np.float32) / 5
    w1, b1 = w1[:, sources] * scales, b1[sources] * scales
    w2 = rng.standard_normal((64, 24)).astype(np.float32) / 8
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2")]
    return make_model(nodes, [tensor("x", [4, 24])], [tensor("y", [4, 24])], {"w1": w1, "b1": b1, "w2": w2}), [4, 24]


def ffn_gelu():
    rng = np.random.default_rng(5)
    sources, _ = _duplicated(rng, 136, 40, positive_scale=False)  # Gelu is not positively homogeneous: exact copies
    w1 = (rng.standard_normal((24, 96)).astype(np.float32) / 5)[:, sources]
    b1 = (rng.standard_normal(96).astype(np.float32) / 5)[sources]
    w2 = rng.standard_normal((136, 24)).astype(np.float32) / 10
    f = lambda value: np.array(value, np.float32)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"], name="up"), helper.make_node("Add", ["m", "b1"], ["a"]),
             helper.make_node("Div", ["a", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["a", "e1"], ["g0"]),
             helper.make_node("Mul", ["g0", "half"], ["g"]), helper.make_node("MatMul", ["g", "w2"], ["y"], name="down")]
    inits = {"w1": w1, "b1": b1, "w2": w2, "sqrt2": f(np.sqrt(2.0)), "one": f(1.0), "half": f(0.5)}
    return make_model(nodes, [tensor("x", [1, 8, 24])], [tensor("y", [1, 8, 24])], inits, opset=17), [1, 8, 24]


def conv_bn_relu():
    # 16 of 32 channels duplicate the other 16: a 2-D conv chain keeps widths on onnxruntime's channel block (8 or 16)
    rng = np.random.default_rng(6)
    sources, scales = _duplicated(rng, 32, 16, positive_scale=True)
    w1 = (rng.standard_normal((16, 8, 3, 3)).astype(np.float32) / 8)[sources]
    mean = (rng.standard_normal(16).astype(np.float32) / 5)[sources]
    var = rng.uniform(0.5, 1.5, 16).astype(np.float32)[sources]
    gamma = rng.uniform(0.5, 1.5, 16).astype(np.float32)[sources] * scales
    beta = (rng.standard_normal(16).astype(np.float32) / 5)[sources] * scales
    w2 = rng.standard_normal((8, 32, 1, 1)).astype(np.float32) / 6
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], epsilon=1e-5),
             helper.make_node("Relu", ["n"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    inits = {"w1": w1, "gamma": gamma, "beta": beta, "mean": mean, "var": var, "w2": w2}
    return make_model(nodes, [tensor("x", [1, 8, 6, 6])], [tensor("y", [1, 8, 6, 6])], inits), [1, 8, 6, 6]


def conv_leaky():
    rng = np.random.default_rng(7)
    sources, scales = _duplicated(rng, 32, 16, positive_scale=True)
    w1 = (rng.standard_normal((16, 8, 1, 1)).astype(np.float32) / 3)[sources] * scales[:, None, None, None]
    b1 = (rng.standard_normal(16).astype(np.float32) / 5)[sources] * scales
    w2 = rng.standard_normal((8, 32, 1, 1)).astype(np.float32) / 6
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv1"),
             helper.make_node("LeakyRelu", ["c"], ["r"], alpha=0.1),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    return (make_model(nodes, [tensor("x", [1, 8, 5, 5])], [tensor("y", [1, 8, 5, 5])], {"w1": w1, "b1": b1, "w2": w2}),
            [1, 8, 5, 5])


DUPLICATES = {"mlp relu": mlp_relu, "ffn gelu": ffn_gelu, "conv bn relu": conv_bn_relu, "1x1 conv leaky": conv_leaky}


def _samples(shape, count, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


@pytest.mark.parametrize("method", ["eliminate", None])  # None: the default, both
@pytest.mark.parametrize("name", sorted(DUPLICATES))
def test_duplicated_hidden_units_are_removed_losslessly_with_the_defaults(name, method, tmp_path):
    model, shape = DUPLICATES[name]()
    calibration, held_out = _samples(shape, 64, seed=10), _samples(shape, 64, seed=11)  # disjoint
    _, report = api.compress(model, 0.9, method=method, calibration=calibration, inputs=held_out,
                             latency_cache=tmp_path / "latency.json")
    assert report.guarded and not report.in_sample
    _lossless(report, 0.9)


def test_plans_exact_to_float_rounding_tie_and_the_one_adding_fewest_nodes_wins(tmp_path, monkeypatch):
    """Errors of 1e-7 and 5e-8 are both float rounding: the judge must not prefer a factorized plan (one more node,
    measured 1.10x slower than the original on this model) over an exact narrowing because its rounding is smaller."""
    from onnx_lowrank.stages import judge
    from onnx_lowrank.stages.verify import OutputComparison, Verification

    model, shape = conv_bn_relu()
    nodes = len(model.graph.node)

    def scripted(original, candidates, feeds):
        feeds = list(feeds)
        checks = []
        for candidate in candidates:
            error = 5e-8 if len(candidate.graph.node) > nodes else 1e-7  # the factorized plans round smaller
            squares = tuple((error ** 2, 1.0) for _ in feeds)
            checks.append(Verification((OutputComparison("y", error, 0.0, 1.0, None),), len(feeds), len(feeds),
                                       squares=(squares,)))
        return checks

    monkeypatch.setattr(judge, "verify_many", scripted)
    calibration = _samples(shape, 64, seed=10)
    _, report = api.compress(model, 0.9, calibration=calibration, verify=False, allow_slower=True,
                             latency_cache=tmp_path / "latency.json")
    assert "latency" not in report.plan.notes[0]  # the layers are at the per-node overhead: not timed
    assert not report.plan.layers and report.plan.widths, report.plan.notes[0]
    assert "adds fewer nodes" in report.plan.notes[0]


# ----------------------------------------------------------------------- the guard's statistics (scripted timers)


def test_the_sign_test_needs_every_one_of_seven_rounds_and_fifteen_of_twenty():
    assert tolerated_rounds(4) == -1 and tolerated_rounds(7) == 0 and tolerated_rounds(20) == 5


def _latency(form_rounds, dense_rounds, overhead=0.1):
    timing = LayerTiming(dense_ms=float(np.median(dense_rounds)), dense_rounds=tuple(dense_rounds),
                         forms={1: FormTiming(points=((4, float(np.median(form_rounds))),),
                                              rounds=(tuple(form_rounds),))})
    return LatencyCost(total=10.0, timings={"fc": timing}, overhead_ms=overhead)


class _Layer:
    name = "fc"


def test_a_candidate_slower_beyond_noise_is_removed_one_within_noise_kept():
    dense = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0]
    slower = _latency([d * 1.03 for d in dense], dense, overhead=0.01)  # 3% slower in every round: beyond noise
    assert slower.slower(_Layer(), 1, 4)
    noisy = _latency([1.2, 0.9, 1.1, 0.8, 1.1, 1.0, 1.3], dense)  # slower median, faster in two rounds
    assert not noisy.slower(_Layer(), 1, 4)


def test_a_form_slower_by_less_than_one_node_overhead_is_not_filtered():
    dense = [1.0] * 7
    assert not _latency([1.05] * 7, dense, overhead=0.1).slower(_Layer(), 1, 4)  # the extra node's own cost
    assert _latency([1.15] * 7, dense, overhead=0.1).slower(_Layer(), 1, 4)


def test_a_layer_at_the_per_node_overhead_is_not_filtered():
    dense = [0.15] * 7
    assert _latency([0.3] * 7, dense, overhead=0.1).at_overhead([_Layer()])
    assert not _latency([0.3] * 7, dense, overhead=0.1).slower(_Layer(), 1, 4)  # twice as slow, yet kept
    assert _latency([0.3] * 7, dense, overhead=0.01).slower(_Layer(), 1, 4)


def _two_layer_model():
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], name="big"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="small")]
    inits = {"w1": low_rank(rng, 256, 256, 16), "w2": low_rank(rng, 256, 24, 4)}
    return make_model(nodes, [tensor("x", [1, 256])], [tensor("y", [1, 24])], inits)


def _slow_when(condition):
    """weights_and_nodes, 10 ms more for a whole model (3 nodes or more: layers alone have 1 or 2) meeting it."""
    return lambda model: weights_and_nodes(model) + (10.0 if len(model.graph.node) > 3 and condition(model) else 0.0)


def _apply_both(tmp_path, timer):
    model = _two_layer_model()
    cache = tmp_path / "latency.json"
    analysis = api.analyze(model, timer=timer, latency_cache=cache)
    assert all(entry.candidates for entry in analysis.layers)
    plan = Plan(layers={"big": (1, 16), "small": (1, 4)}, metric="params", budget=0.8)
    return api.apply(model, plan, analysis=analysis, timer=timer)[1]


def test_the_whole_model_check_drops_the_least_saving_layer_until_faster(tmp_path):
    # any whole model with "small" factorized (its weight w2 gone) is 10 ms slower, whatever the layers measure
    timer = ScriptedTimer(_slow_when(lambda m: "w2" not in {t.name for t in m.graph.initializer}))
    report = _apply_both(tmp_path, timer)
    check = report.speed_check
    assert check is not None and check.kept and check.dropped == ("small",)
    assert set(report.plan.layers) == {"big"}
    assert report.to_dict()["summary"]["never_slower_check"]["kept"] is True


def test_a_model_slower_whatever_is_taken_out_is_not_written(tmp_path):
    timer = ScriptedTimer(_slow_when(lambda m: True))  # every compressed model is 10 ms slower, in every round
    with pytest.raises(SlowerModelError, match="never-slower guard wrote nothing"):
        _apply_both(tmp_path, timer)


def test_compress_refuses_a_slower_model_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from onnx_lowrank.stages import judge, layer_timing, timing

    scripted = ScriptedTimer(_slow_when(lambda m: True))
    for module in (timing, judge, layer_timing):  # the command line has no timer: onnxruntime's is replaced
        monkeypatch.setattr(module, "OnnxruntimeTimer", lambda *args, **kwargs: scripted)
    monkeypatch.setenv("ONNX_LOWRANK_CACHE", str(tmp_path / "cache"))
    source = save(_two_layer_model(), tmp_path / "m.onnx")
    before = source.read_bytes()
    out = tmp_path / "c.onnx"
    assert main(["compress", str(source), str(out), "--budget", "0.8"]) != 0
    assert not out.exists() and source.read_bytes() == before
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "never-slower guard wrote nothing" in error[0]


def _same_time_when_whole(model):
    """Layers alone as weights_and_nodes; every whole model (3 nodes or more) the same 20 ms: never beyond noise."""
    return 20.0 if len(model.graph.node) >= 3 else weights_and_nodes(model)


def test_a_model_not_faster_beyond_noise_is_not_written(tmp_path):
    # the same time as the original: not slower, but not shown faster either (5 measurements cannot tell a few
    # percent apart on a small model, and such models measured 2-7% slower when timed again)
    with pytest.raises(SlowerModelError, match="not faster than the original beyond noise"):
        _apply_both(tmp_path, ScriptedTimer(_same_time_when_whole))


def _three_percent_faster_whole(model):
    """Layers alone as weights_and_nodes; a compressed whole model (more than 3 nodes) 3% faster than the original."""
    nodes = len(model.graph.node)
    return 20.0 if nodes == 3 else 19.4 if nodes > 3 else weights_and_nodes(model)


def test_a_speedup_within_the_spread_between_sessions_is_not_called_faster(tmp_path):
    # 3% faster in every round of every measurement, while sessions differ by 6% from one measurement to the next
    with pytest.raises(SlowerModelError):
        _apply_both(tmp_path, ScriptedTimer(_three_percent_faster_whole, session_jitter=0.06))
    report = _apply_both(tmp_path, ScriptedTimer(_three_percent_faster_whole))  # the sessions agree: faster
    assert report.speed_check.kept and len(report.latency.pair_ratios) > 1
    assert set(report.plan.layers) == {"big", "small"}


def test_sweep_keeps_the_promise_compress_keeps(tmp_path):
    """The benchmark's cells are what compress would write: sweep runs the same whole-model check."""
    from onnx_lowrank.sweep import sweep

    timer = ScriptedTimer(_slow_when(lambda m: "w2" not in {t.name for t in m.graph.initializer}))
    result = sweep(_two_layer_model(), (0.8,), allocators=("alds",), timer=timer, latency_cache=tmp_path / "c.json")
    point = result.points[0]
    assert point.never_slower is True and point.latency_ratio < 1.0 and point.layers_factorized == 1  # "small" out
    unguarded = sweep(_two_layer_model(), (0.8,), allocators=("alds",), allow_slower=True, latency=False)
    assert unguarded.points[0].layers_factorized == 2 and unguarded.points[0].never_slower is None
    nothing_helps = sweep(_two_layer_model(), (0.8,), allocators=("alds",), latency_cache=tmp_path / "d.json",
                          timer=ScriptedTimer(_slow_when(lambda m: True)))
    assert not nothing_helps.points and "never-slower guard wrote nothing" in nothing_helps.unreachable[0][2]
    within_noise = sweep(_two_layer_model(), (0.8,), allocators=("alds",), latency_cache=tmp_path / "e.json",
                         timer=ScriptedTimer(_same_time_when_whole))
    assert not within_noise.points and "not faster than the original" in within_noise.unreachable[0][2]
