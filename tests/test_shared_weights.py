"""Weights shared by several nodes: an unrolled recurrent net reuses one Gemm weight at every time step.

Discovery lists one layer per shared weight (its nodes as `Layer.shared`); the budget counts its parameters once
and its FLOPs for every node; calibration pools the inputs of all its nodes; the rewrite adds the factors once and
points every node at them. Weights shared in ways one set of factors cannot serve are skipped with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from onnx_lowrank import api

from onnx_lowrank.cli import main as cli

from onnx_lowrank.stages import costs as cost
from onnx_lowrank.stages.calibrate import collect_statistics
from onnx_lowrank.stages.discover import discover
from onnx_lowrank.stages.latency_cache import LatencyCache
from onnx_lowrank.stages.layer_timing import measure_layers
from onnx_lowrank.graph.runtime import RuntimeSettings
from onnx_lowrank.math.statistics import StatisticsAccumulator

from helpers.builders import make_model, rng_for, tensor, weights
from helpers.files import save
from helpers.rewrites import full_rank
from helpers.running import run

STEPS = 4


def build_rnn(seed: int = 0, *, steps: int = STEPS, hidden: int = 24, features: int = 16, batch: int = 3,
              trans_b: int = 1, matmul: bool = False) -> onnx.ModelProto:
    """h_{t+1} = tanh(x_t W + h_t U + b) unrolled over `steps`: W and U are each read by `steps` nodes (Gemm, or
    MatMul + Add with `matmul`). Inputs x (steps, batch, features) and h0 (batch, hidden); output the last h."""
    rng = rng_for(seed)
    w = weights(rng, hidden, features) if trans_b else weights(rng, features, hidden)
    u = weights(rng, hidden, hidden)
    bias = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    inits = {"W": w.T.copy() if matmul and trans_b else w, "U": u, "b": bias}
    nodes = [helper.make_node("Split", ["x", "split"], [f"x{t}_3d" for t in range(steps)], axis=0)]
    inits["split"] = np.ones(steps, dtype=np.int64)
    inits["squeeze_axes"] = np.array([0], dtype=np.int64)
    state = "h0"
    for t in range(steps):
        nodes.append(helper.make_node("Squeeze", [f"x{t}_3d", "squeeze_axes"], [f"x{t}"]))
        if matmul:
            nodes.append(helper.make_node("MatMul", [f"x{t}", "W"], [f"xw{t}"], name=f"step{t}/W"))
            nodes.append(helper.make_node("MatMul", [state, "U"], [f"hu{t}"], name=f"step{t}/U"))
            nodes.append(helper.make_node("Add", [f"xw{t}", "b"], [f"xwb{t}"]))
            nodes.append(helper.make_node("Add", [f"xwb{t}", f"hu{t}"], [f"pre{t}"]))
        else:
            nodes.append(helper.make_node("Gemm", [f"x{t}", "W", "b"], [f"xw{t}"], name=f"step{t}/W",
                                          transB=trans_b, alpha=0.9, beta=0.5))
            nodes.append(helper.make_node("Gemm", [state, "U"], [f"hu{t}"], name=f"step{t}/U", transB=1))
            nodes.append(helper.make_node("Add", [f"xw{t}", f"hu{t}"], [f"pre{t}"]))
        last = t == steps - 1
        nodes.append(helper.make_node("Tanh", [f"pre{t}"], ["h" if last else f"h{t + 1}"]))
        state = f"h{t + 1}"
    return make_model(nodes, [tensor("x", [steps, batch, features]), tensor("h0", [batch, hidden])],
                      [tensor("h", [batch, hidden])], inits)


def build_two_branch_conv(seed: int = 0, *, c_in: int = 8, c_out: int = 16, second_stride: int = 1,
                          bias: bool = True) -> onnx.ModelProto:
    """One 3x3 Conv weight applied to two branches (the input, and its ReLU); their outputs are added."""
    rng = rng_for(seed)
    inits = {"W": weights(rng, c_out, c_in, 3, 3)}
    extra = ["B"] if bias else []
    if bias:
        inits["B"] = (rng.standard_normal(c_out) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W", *extra], ["a"], name="branch_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["x"], ["rx"]),
        helper.make_node("Conv", ["rx", "W", *extra], ["c"], name="branch_b", pads=[1, 1, 1, 1],
                         strides=[second_stride, second_stride]),
    ]
    if second_stride == 1:
        nodes.append(helper.make_node("Add", ["a", "c"], ["y"]))
        outputs = [tensor("y", [2, c_out, 10, 10])]
    else:
        nodes.append(helper.make_node("Identity", ["a"], ["y"]))
        nodes.append(helper.make_node("Identity", ["c"], ["z"]))
        outputs = [tensor("y", [2, c_out, 10, 10]), tensor("z", [2, c_out, 5, 5])]
    return make_model(nodes, [tensor("x", [2, c_in, 10, 10])], outputs, inits)


def rnn_feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = rng_for(seed)
    return {v.name: rng.standard_normal([d.dim_value for d in v.type.tensor_type.shape.dim]).astype(np.float32)
            for v in model.graph.input}


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


# ------------------------------------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("matmul", [False, True])
def test_one_layer_per_shared_weight(matmul):
    discovery = discover(build_rnn(matmul=matmul))
    assert [layer.weight_name for layer in discovery.layers] == ["W", "U"]
    assert discovery.skipped == ()
    w, u = discovery.layers
    assert [view.name for view in w.views()] == [f"step{t}/W" for t in range(STEPS)]
    assert [view.input_name for view in w.views()] == [f"x{t}" for t in range(STEPS)]
    assert [view.input_name for view in u.views()] == ["h0"] + [f"h{t}" for t in range(1, STEPS)]
    assert all(view.shared == () for view in w.views())


def test_flops_count_every_node_and_params_once():
    model = build_rnn()
    shapes = {**{f"xw{t}": (3, 24) for t in range(STEPS)}, **{f"hu{t}": (3, 24) for t in range(STEPS)}}
    w, _ = discover(model, shapes=shapes).layers
    assert w.output_positions == 3 * STEPS
    assert cost.dense_flops(w) == STEPS * 2 * 3 * 24 * 16
    assert cost.dense_params(w) == 24 * 16
    assert [view.output_positions for view in w.views()] == [3] * STEPS


def test_conv_shared_by_two_branches_is_one_layer():
    (layer,) = discover(build_two_branch_conv()).layers
    assert [view.name for view in layer.views()] == ["branch_a", "branch_b"]
    assert layer.bias_size == 16  # only the two Convs read B: a bias correction replaces it once


def _skip_reasons(model):
    discovery = discover(model)
    return discovery.layers, {s.name: s.reason for s in discovery.skipped}


def test_weight_shared_by_different_ops_is_skipped():
    rng = rng_for(0)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["a"], name="gemm", transB=1),
             helper.make_node("MatMul", ["x", "W"], ["b"], name="matmul"),
             helper.make_node("Add", ["a", "b"], ["y"])]
    model = make_model(nodes, [tensor("x", [4, 8])], [tensor("y", [4, 8])], {"W": weights(rng, 8, 8)})
    layers, reasons = _skip_reasons(model)
    assert layers == ()
    assert set(reasons) == {"gemm", "matmul"}
    assert all("different ops" in r for r in reasons.values())


def test_weight_also_read_by_another_op_is_skipped():
    rng = rng_for(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["a", "W"], ["b"], name="mm2"),
             helper.make_node("Add", ["b", "W"], ["y"])]
    model = make_model(nodes, [tensor("x", [4, 8])], [tensor("y", [4, 8])], {"W": weights(rng, 8, 8)})
    layers, reasons = _skip_reasons(model)
    assert layers == ()
    assert "different ops" in reasons["mm1"] and "Add" in reasons["mm1"]


def test_gemm_with_different_attributes_or_biases_is_skipped():
    rng = rng_for(0)
    inits = {"W": weights(rng, 8, 8), "b1": np.zeros(8, np.float32), "b2": np.ones(8, np.float32)}
    alpha = [helper.make_node("Gemm", ["x", "W"], ["a"], name="g1", transB=1),
             helper.make_node("Gemm", ["a", "W"], ["y"], name="g2", transB=1, alpha=2.0)]
    _, reasons = _skip_reasons(make_model(alpha, [tensor("x", [4, 8])], [tensor("y", [4, 8])], inits))
    assert "different attributes" in reasons["g1"] and reasons["g1"] == reasons["g2"]
    biases = [helper.make_node("Gemm", ["x", "W", "b1"], ["a"], name="g1", transB=1),
              helper.make_node("Gemm", ["a", "W", "b2"], ["y"], name="g2", transB=1)]
    _, reasons = _skip_reasons(make_model(biases, [tensor("x", [4, 8])], [tensor("y", [4, 8])], inits))
    assert "different biases" in reasons["g1"]


def test_weight_read_twice_by_one_node_is_skipped():
    rng = rng_for(0)
    nodes = [helper.make_node("MatMul", ["W", "W"], ["y"], name="square")]
    model = make_model(nodes, [], [tensor("y", [8, 8])], {"W": weights(rng, 8, 8)})
    _, reasons = _skip_reasons(model)
    assert reasons == {"square": "weight is read twice by the same node"}


def test_shared_conv_with_batchnorm_is_skipped():
    rng = rng_for(0)
    inits = {"W": weights(rng, 4, 4, 1, 1), "g": np.ones(4, np.float32), "be": np.zeros(4, np.float32),
             "m": np.zeros(4, np.float32), "v": np.ones(4, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["a"], name="c1"),
             helper.make_node("BatchNormalization", ["a", "g", "be", "m", "v"], ["an"]),
             helper.make_node("Conv", ["an", "W"], ["y"], name="c2")]
    model = make_model(nodes, [tensor("x", [1, 4, 3, 3])], [tensor("y", [1, 4, 3, 3])], inits)
    _, reasons = _skip_reasons(model)
    assert "BatchNormalization" in reasons["c1"] and reasons["c2"] == reasons["c1"]


def test_exclude_matching_one_reader_skips_the_shared_weight():
    layers, reasons = _skip_reasons_with(build_rnn(), r"step2/W")
    assert [layer.weight_name for layer in layers] == ["U"]
    assert len([r for r in reasons.values() if "step2/W" in r]) == STEPS


def _skip_reasons_with(model, exclude):
    discovery = discover(model, exclude=exclude)
    return discovery.layers, {s.name: s.reason for s in discovery.skipped}


# --------------------------------------------------------------------------------------------------------- rewrite


@pytest.mark.parametrize("build", [build_rnn, lambda: build_rnn(matmul=True), lambda: build_rnn(trans_b=0),
                                   build_two_branch_conv, lambda: build_two_branch_conv(second_stride=2)])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("shift", [False, True])
def test_full_rank_rewrite_reproduces_outputs_with_factors_added_once(build, k, shift):
    model = build()
    rewritten = full_rank(model, k, shift)
    feeds = rnn_feeds(model)
    for expected, got in zip(run(model, feeds), run(rewritten, feeds)):
        assert relative_error(expected, got) < 1e-5
    names = [t.name for t in rewritten.graph.initializer]
    assert len(names) == len(set(names))
    assert "W" not in names
    factors = [n for n in names if "_lowrank_encoder" in n or "_lowrank_decoder" in n]
    assert len(factors) == 2 * len(discover(model).layers)  # one encoder and one decoder per shared weight
    readers = [node for node in rewritten.graph.node if any(n in node.input for n in factors)]
    assert len(readers) == 2 * sum(len(layer.views()) for layer in discover(model).layers)


SETTINGS = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(seed=st.integers(0, 2**16), steps=st.integers(2, 4), hidden=st.sampled_from([4, 6, 8]),
       features=st.sampled_from([2, 4, 6]), trans_b=st.integers(0, 1), matmul=st.booleans(),
       k=st.sampled_from([1, 2]), shift=st.booleans())
def test_full_rank_property_for_shared_weights(seed, steps, hidden, features, trans_b, matmul, k, shift):
    """Mirrors tests/test_full_rank_property.py for unrolled recurrent nets of random sizes."""
    model = build_rnn(seed, steps=steps, hidden=hidden, features=features, trans_b=trans_b, matmul=matmul)
    rewritten = full_rank(model, k, shift)
    feeds = rnn_feeds(model, seed)
    (expected,), (got,) = run(model, feeds), run(rewritten, feeds)
    assert relative_error(expected, got) < 1e-5


# ----------------------------------------------------------------------------------------------------- calibration


def test_calibration_pools_the_inputs_of_every_reader():
    model = build_rnn()
    feeds = [rnn_feeds(model, seed) for seed in range(3)]
    layers = discover(model).layers
    stats = collect_statistics(model, layers, feeds)
    w = stats["W"] if "W" in stats else stats[layers[0].name]
    expected = StatisticsAccumulator(16)
    for feed in feeds:
        for t in range(STEPS):
            expected.add(feed["x"][t])
    expected = expected.result()
    assert w.count == expected.count == 3 * STEPS * 3
    np.testing.assert_allclose(w.total, expected.total, rtol=1e-5)
    np.testing.assert_allclose(w.gram, expected.gram, rtol=1e-4, atol=1e-5)


def test_calibrated_compression_of_shared_weights():
    model = build_rnn(hidden=32, features=32)
    feeds = [rnn_feeds(model, seed) for seed in range(4)]
    compressed, report = api.compress(model, 0.6, calibration=feeds, allow_slower=True)
    onnx.checker.check_model(compressed, full_check=True)
    assert report.measure == "output"
    assert report.after["params"] == cost.model_params(compressed) <= 0.6 * report.before["params"]
    run(compressed, feeds[0])


def test_refit_uses_the_inputs_of_every_reader(monkeypatch):
    """The refit decoder must serve all four time steps: it is fitted on rows from every reader of the weight."""
    from onnx_lowrank.stages import refit

    model = build_rnn(hidden=32, features=32)
    feeds = [rnn_feeds(model, seed) for seed in range(4)]
    rows = []
    original_add = refit._Sums.add

    def counting_add(self, x, x_tilde):
        rows.append((self.layer.name, x.shape[0]))
        return original_add(self, x, x_tilde)

    monkeypatch.setattr(refit._Sums, "add", counting_add)
    compressed, report = api.compress(model, 0.6, calibration=feeds, allow_slower=True, refit=True,
                                      allocator="alds")
    onnx.checker.check_model(compressed, full_check=True)
    assert report.refit
    per_layer = {}
    for name, count in rows:
        per_layer[name] = per_layer.get(name, 0) + 1
    readers = {layer.name: 1 + len(layer.shared) for layer in discover(model).layers}
    assert per_layer and all(readers[name] > 1 and per_layer[name] == len(feeds) * readers[name] for name in per_layer)
    run(compressed, feeds[0])


# ---------------------------------------------------------------------------------------------------- command line


@pytest.mark.parametrize("build", [lambda: build_rnn(hidden=32, features=32),
                                   lambda: build_rnn(hidden=32, features=32, matmul=True),
                                   lambda: build_two_branch_conv(c_in=16, c_out=32)])
def test_cli_compresses_shared_weights(tmp_path, build):
    model = build()
    source, target = save(model, tmp_path / "in.onnx"), tmp_path / "out.onnx"
    assert cli.main(["compress", str(source), str(target), "--budget", "0.6", "--allow-slower"]) == 0
    written = onnx.load(str(target))
    onnx.checker.check_model(written, full_check=True)
    names = [t.name for t in written.graph.initializer]
    assert len(names) == len(set(names))
    factor_names = [n for n in names if "_lowrank_" in n]
    assert factor_names, "nothing was factorized"
    readers = {n: sum(n in node.input for node in written.graph.node) for n in factor_names
               if "_encoder" in n or "_decoder" in n}
    layers = {layer.weight_name: len(layer.views()) for layer in discover(model).layers}
    assert all(count == layers[name.split("_lowrank_")[0]] for name, count in readers.items())
    assert cost.model_params(written) <= 0.6 * cost.model_params(model)
    feeds = rnn_feeds(model)
    for expected, got in zip(run(model, feeds), run(written, feeds)):
        assert expected.shape == got.shape and np.isfinite(got).all()


def test_params_before_and_after_count_a_shared_weight_once():
    model = build_rnn(hidden=32, features=32)
    compressed, report = api.compress(model, 0.6, allow_slower=True)
    assert report.before["params"] == cost.model_params(model)
    assert report.after["params"] == cost.model_params(compressed)
    predicted = report.before["params"] + sum(after - before for before, after in
                                              (row.costs["params"] for row in report.layers))
    assert predicted == report.after["params"]
    assert len(report.layers) == 2


def test_cli_calibrated_compression_of_shared_weights(tmp_path):
    model = build_rnn(hidden=32, features=32)
    source, target, folder = save(model, tmp_path / "in.onnx"), tmp_path / "out.onnx", tmp_path / "calib"
    folder.mkdir()
    for seed in range(4):
        np.savez(folder / f"{seed:02d}.npz", **rnn_feeds(model, seed))
    code = cli.main(["compress", str(source), str(target), "--budget", "0.6", "--allow-slower",
                     "--calibration", str(folder)])
    assert code == 0
    written = onnx.load(str(target))
    onnx.checker.check_model(written, full_check=True)
    assert cost.model_params(written) <= 0.6 * cost.model_params(model)
    (expected,), (got,) = run(model, rnn_feeds(model, 9)), run(written, rnn_feeds(model, 9))
    assert relative_error(expected, got) < 1.0  # the outputs are tanh-bounded: the model still computes its state


# ---------------------------------------------------------------------------------------------------------- timing


def test_a_shared_weight_is_timed_at_every_reader(tmp_path):
    """Readers with different attributes (strides) are timed apart; the layer's times are their sum."""
    model = build_two_branch_conv(c_in=16, c_out=32, second_stride=2)
    shapes = {"x": (2, 16, 10, 10), "rx": (2, 16, 10, 10)}
    (layer,) = discover(model, shapes=shapes).layers
    cache = LatencyCache(tmp_path / "latency.json")
    settings = RuntimeSettings(threads=1)
    alone = measure_layers(model, layer.views(), shapes, settings, cache)
    timed = measure_layers(model, [layer], shapes, settings, cache)[layer.name]  # from the cache: the same numbers
    assert timed.dense_ms == pytest.approx(sum(t.dense_ms for t in alone.values()))
    assert set(timed.forms) == set(alone[layer.name].forms)
    for k, form in timed.forms.items():
        for index, (rank, ms) in enumerate(form.points):
            assert ms == pytest.approx(sum(t.forms[k].points[index][1] for t in alone.values()))
