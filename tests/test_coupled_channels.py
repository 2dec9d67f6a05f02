"""Coupled channels (`chains`): a residual stream or a squeeze-excite gate joins the channels of several producers,
which are then cut together. Graphs whose channels are exact copies in every producer shrink with the outputs
unchanged in onnxruntime; a set that reaches something it cannot cut is skipped with the op that stops it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank import analyze

from onnx_lowrank.graph import runtime
from onnx_lowrank.stages.analyze import cuts_of
from onnx_lowrank.stages.channel_sets import find_chains
from onnx_lowrank.stages.discover import discover
from onnx_lowrank.passes import eliminate_channels

from helpers.running import assert_same_outputs


class _Builder:
    """A graph under construction, with channels that copy each other in every producer: channel j of every set
    equals channel `source[j]`, so whatever acts on each channel alone keeps them copies."""

    def __init__(self, rng, channels: int, independent: int):
        self.rng, self.channels = rng, channels
        self.source = np.concatenate([np.arange(independent), rng.integers(0, independent, channels - independent)])
        self.source = self.source[np.argsort(rng.permutation(channels))]  # copies anywhere, not only last
        self.source = self.source[self.source]  # a copy of a copy is a copy of its independent channel
        self.nodes, self.initializers = [], []

    def constant(self, name: str, value: np.ndarray, dtype=np.float32) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def per_channel(self, low: float = -1.0, high: float = 1.0) -> np.ndarray:
        """Values per channel, equal on copies."""
        return self.rng.uniform(low, high, self.channels)[self.source]

    def rows(self, columns: int) -> np.ndarray:
        """A weight with one row per channel, equal on copies."""
        return self.rng.standard_normal((self.channels, columns))[self.source]

    def node(self, op: str, inputs, output: str, **attributes) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=output, **attributes))
        return output

    def conv(self, x: str, name: str, in_channels: int, out_channels: int | None, kernel: int, bias: str) -> str:
        """A Conv writing the copied channels (out_channels None) or `out_channels` free ones; `bias`: none,
        input (Conv's third input) or reshaped (Add of a Reshape, as Paddle exports it)."""
        if out_channels is None:
            weight = self.rows(in_channels * kernel * kernel).reshape(self.channels, in_channels, kernel, kernel)
        else:
            weight = self.rng.standard_normal((out_channels, in_channels, kernel, kernel))
        count = weight.shape[0]
        values = self.per_channel() if out_channels is None else self.rng.standard_normal(count)
        inputs = [x, self.constant(f"{name}_w", weight)]
        if bias == "input":
            inputs.append(self.constant(f"{name}_b", values))
        y = self.node("Conv", inputs, name, pads=[kernel // 2] * 4)
        if bias == "reshaped":
            shape = self.constant(f"{name}_shape", np.array([1, count, 1, 1]), np.int64)
            reshaped = self.node("Reshape", [self.constant(f"{name}_bflat", values), shape], f"{name}_bias")
            y = self.node("Add", [y, reshaped], f"{name}_biased")
        return y

    def batchnorm(self, x: str, name: str) -> str:
        scale, shift = self.per_channel(0.5, 2.0), self.per_channel()
        mean, variance = self.per_channel(), self.per_channel(0.5, 2.0)
        inputs = [x] + [self.constant(f"{name}_{p}", v) for p, v in
                        (("scale", scale), ("shift", shift), ("mean", mean), ("var", variance))]
        return self.node("BatchNormalization", inputs, name)

    def activation(self, x: str, name: str, kind: str) -> str:
        if kind == "SiLU":
            return self.node("Mul", [x, self.node("Sigmoid", [x], f"{name}_s")], name)
        return self.node(kind, [x], name)

    def model(self, inputs, outputs) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "g", inputs, outputs, self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _residual_model(rng, channels, independent, activation, batchnorm, bias, squeeze_excite, single=False):
    """conv0 -> [BN] -> act -> s0; block: conv1 -> act -> conv2 -> [BN] (-> squeeze-excite gate) -> + s0 -> act -> s1;
    head conv reads s1. conv0 and conv2 (and the gate's conv) write one set of channels. `single`: the block is
    conv2 alone, reading s0 (after an activation) and adding to it: a layer that reads and writes one set."""
    b = _Builder(rng, channels, independent)
    s0 = b.conv("x", "conv0", 3, None, 3, bias)
    s0 = b.activation(b.batchnorm(s0, "bn0") if batchnorm else s0, "act0", activation)
    if single:
        r = b.conv(b.node("Relu", [s0], "act1"), "conv2", channels, None, 3, bias)
    else:
        inner = b.activation(b.conv(s0, "conv1", channels, 6, 3, bias), "act1", "Relu")
        r = b.conv(inner, "conv2", 6, None, 1, bias)
    r = b.batchnorm(r, "bn2") if batchnorm else r
    if squeeze_excite:  # x * hardsigmoid(conv(relu(conv(GAP(x))))): the gate's conv writes the set's channels too
        pooled = b.node("GlobalAveragePool", [r], "gap")
        squeezed = b.node("Relu", [b.conv(pooled, "se1", channels, 3, 1, bias)], "se_relu")
        gate = b.node("HardSigmoid", [b.conv(squeezed, "se2", 3, None, 1, bias)], "se_gate")
        r = b.node("Mul", [r, gate], "se_scaled")
    s1 = b.activation(b.node("Add", [s0, r], "residual"), "act2", activation)
    y = b.conv(s1, "head", channels, 4, 3, "input")
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                    [helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, 4, 8, 8])])
    return model, {"x": (2, 3, 8, 8)}


def _residual_matmul_model(rng, channels, independent, activation):
    """A feed-forward residual block without normalization: h0 = x W0 + b0; h1 = h0 + act(h0 W1 + b1) W2 + b2;
    y = h1 W3. W0 and W2 write one set of channels; W1 and W3 read it."""
    b = _Builder(rng, channels, independent)
    d = 5
    h0 = b.node("Add", [b.node("MatMul", ["x", b.constant("w0", b.rows(d).T)], "mm0"),
                        b.constant("b0", b.per_channel())], "h0")
    hidden = b.node("Add", [b.node("MatMul", [h0, b.constant("w1", rng.standard_normal((channels, 7)))], "mm1"),
                            b.constant("b1", rng.standard_normal(7))], "a1")
    hidden = b.activation(hidden, "act1", activation)
    r = b.node("Add", [b.node("MatMul", [hidden, b.constant("w2", b.rows(7).T)], "mm2"),
                       b.constant("b2", b.per_channel())], "r")
    h1 = b.node("Add", [h0, r], "residual")
    y = b.node("MatMul", [h1, b.constant("w3", rng.standard_normal((channels, 3)))], "mm3")
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, d])],
                    [helper.make_tensor_value_info(y, TensorProto.FLOAT, [2, 6, 3])])
    return model, {"x": (2, 6, d)}


def _narrowed_to_rank(model, shapes, producers, samples=12, seed=0):
    """Analyse with the production path (calibration, channel statistics, the coupled set), cut the set written by
    `producers` to its numerical rank; the model, the set and its width."""
    rng = np.random.default_rng(seed)
    feeds = [{"x": rng.standard_normal(shapes["x"]).astype(np.float32)} for _ in range(samples)]
    analysis = analyze(model, calibration=feeds, method="eliminate", allow_slower=True, latency_cache=False)
    (entry,) = [e for e in analysis.chains if {p.name for p in e.chain.producers} == set(producers)]
    width = entry.elimination.rank
    narrowed, count = eliminate_channels(model, cuts_of(analysis, {entry.chain.name: width}))
    assert count == 1
    onnx.checker.check_model(narrowed, full_check=True)
    return narrowed, entry.chain, width, feeds


def _rows(model, node_name: str) -> int:
    """Output channels of the weight a node reads now."""
    weights = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name or n.output[0] == node_name)
    return int(weights[node.input[1]].dims[0 if node.op_type == "Conv" else 1])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), independent=st.integers(2, 4), extra=st.integers(1, 4),
       activation=st.sampled_from(["Relu", "Identity", "SiLU", "Tanh"]), batchnorm=st.booleans(),
       bias=st.sampled_from(["none", "input", "reshaped"]), squeeze_excite=st.booleans(), single=st.booleans())
def test_a_residual_stream_of_copied_channels_shrinks_in_every_producer_without_changing_outputs(
        seed, independent, extra, activation, batchnorm, bias, squeeze_excite, single):
    rng = np.random.default_rng(seed)
    channels = independent + extra
    model, shapes = _residual_model(rng, channels, independent, activation, batchnorm, bias, squeeze_excite, single)
    producers = {"conv0", "conv2"} | ({"se2"} if squeeze_excite else set())
    narrowed, chain, width, feeds = _narrowed_to_rank(model, shapes, producers)
    assert width <= independent + 1 < channels + 1  # a constant channel may take a pivot when the others are few
    readers = {"conv2" if single else "conv1", "head"} | ({"se1"} if squeeze_excite else set())
    assert {r.name for r in chain.readers} == readers
    for name in producers:
        assert _rows(narrowed, name) == width
    # a squeeze-excite gate scales the folded reader's float32 round-off (1e-7) by activations in the hundreds
    assert_same_outputs(model, narrowed, feeds, tolerance=5e-5 if squeeze_excite else 1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), independent=st.integers(2, 4), extra=st.integers(1, 4),
       activation=st.sampled_from(["Relu", "Identity", "Tanh"]))
def test_a_matmul_residual_stream_of_copied_channels_shrinks_without_changing_outputs(seed, independent, extra,
                                                                                      activation):
    rng = np.random.default_rng(seed)
    model, shapes = _residual_matmul_model(rng, independent + extra, independent, activation)
    narrowed, chain, width, feeds = _narrowed_to_rank(model, shapes, {"mm0", "mm2"})
    assert width < independent + extra and _rows(narrowed, "mm0") == _rows(narrowed, "mm2") == width
    assert_same_outputs(model, narrowed, feeds)


def test_a_residual_block_on_the_graph_input_is_skipped_with_the_op_that_couples_it():
    """The stream's first tensor is the graph input: its channels cannot be cut, so neither can the block's."""
    rng = np.random.default_rng(2)
    b = _Builder(rng, 4, 4)
    inner = b.node("Relu", [b.conv("x", "conv1", 4, 4, 3, "none")], "r1")
    s = b.node("Add", [b.conv(inner, "conv2", 4, 4, 3, "none"), "x"], "residual")
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                    [helper.make_tensor_value_info(b.node("Relu", [s], "y"), TensorProto.FLOAT, [1, 4, 8, 8])])
    chains = find_chains(model, discover(model))
    assert [c.name for c in chains.chains] == ["conv1"]
    (skipped,) = chains.skipped
    assert skipped.name == "conv2" and "Add 'residual'" in skipped.reason and "graph input 'x'" in skipped.reason


def test_a_residual_block_is_one_set_cut_consistently():
    """conv0 writes the stream, conv2 adds to it: one set with both producers and both readers; a width cuts both
    producers' rows, both readers' columns, and nothing else."""
    rng = np.random.default_rng(4)
    model, shapes = _residual_model(rng, 8, 8, "Relu", True, "input", squeeze_excite=False)
    chains = find_chains(model, discover(model))
    (stream,) = [c for c in chains.chains if len(c.producers) > 1]
    assert [p.name for p in stream.producers] == ["conv0", "conv2"]
    assert [r.name for r in stream.readers] == ["conv1", "head"]
    feeds = [{"x": rng.standard_normal(shapes["x"]).astype(np.float32)} for _ in range(12)]
    analysis = analyze(model, calibration=feeds, method="eliminate", allow_slower=True, latency_cache=False)
    narrowed, _ = eliminate_channels(model, cuts_of(analysis, {"conv0": 5}))
    assert _rows(narrowed, "conv0") == _rows(narrowed, "conv2") == 5
    weights = {t.name: numpy_helper.to_array(t) for t in narrowed.graph.initializer}
    for reader in ("conv1", "head"):
        node = next(n for n in narrowed.graph.node if n.name == reader)
        assert weights[node.input[1]].shape[1] == 5
    after = runtime.session(narrowed)
    for feed in feeds:  # the cut is approximate here (no copies): it runs, with the original's output shape
        assert runtime.run(after, feed)[after.get_outputs()[0].name].shape == (2, 4, 8, 8)


@pytest.mark.parametrize("op", ["Concat", "Transpose"])
def test_a_set_reaching_a_concat_or_a_transpose_is_skipped_whole(op):
    """Both producers of a residual set are skipped with the same reason when one tensor of the set reaches an op
    that does not act on each channel alone."""
    rng = np.random.default_rng(5)
    b = _Builder(rng, 4, 4)
    s0 = b.conv("x", "conv0", 3, 4, 1, "none")
    s1 = b.node("Add", [s0, b.conv(b.node("Relu", [s0], "r"), "conv1", 4, 4, 1, "none")], "residual")
    out = (b.node("Concat", [s1, "x"], "join", axis=1) if op == "Concat"
           else b.node("Transpose", [s1], "join", perm=[0, 2, 3, 1]))
    model = b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                    [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    chains = find_chains(model, discover(model))
    assert not chains.chains
    reasons = {s.name: s.reason for s in chains.skipped}
    assert set(reasons) == {"conv0", "conv1"} and all(f"{op} 'join'" in r for r in reasons.values())
