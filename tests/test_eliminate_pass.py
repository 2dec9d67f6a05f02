"""Channel elimination through real graphs: chains are found (or skipped with the reason), and channels that are
exact copies, positive multiples or constants of others are removed with the outputs unchanged in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.graph import runtime
from onnx_lowrank.stages.calibrate import collect_statistics
from onnx_lowrank.stages.channel_sets import find_chains
from onnx_lowrank.stages.discover import discover
from onnx_lowrank.math.elimination import ChannelElimination, Reader
from onnx_lowrank.passes import eliminate_channels

from helpers.running import assert_same_outputs


def _dependent_rows(rng, channels: int, independent: int, columns: int, activation: str):
    """A producer weight (channels, columns) and bias whose outputs after `activation` have `independent`
    independent channels: the others copy one of them (times a positive factor when the activation allows it) or
    are constant (a zero row)."""
    base = rng.standard_normal((independent, columns))
    base_bias = rng.standard_normal(independent)
    rows, biases = [base], [base_bias]
    for _ in range(channels - independent):
        source = int(rng.integers(independent))
        if rng.random() < 0.25:  # a dead or constant channel
            rows.append(np.zeros((1, columns)))
            biases.append(rng.standard_normal(1))
        else:
            factor = rng.uniform(0.5, 2.0) if activation in ("Relu", "Identity") else 1.0
            rows.append(base[source : source + 1] * factor)
            biases.append(base_bias[source : source + 1] * factor)
    order = rng.permutation(channels)
    return np.concatenate(rows)[order], np.concatenate(biases)[order]


def _activation(name: str, x: str, y: str) -> list[onnx.NodeProto]:
    if name == "Identity":
        return [helper.make_node("Identity", [x], [y])]
    if name == "SiLU":
        return [helper.make_node("Sigmoid", [x], [y + "_s"]), helper.make_node("Mul", [x, y + "_s"], [y])]
    if name == "ErfGelu":  # what torch.onnx.export writes for GELU below opset 20: x * (erf(x / sqrt 2) + 1) * 0.5
        constants = [helper.make_node("Constant", [], [y + f"_c{i}"], value=numpy_helper.from_array(
            np.array(value, dtype=np.float32))) for i, value in enumerate((2 ** 0.5, 1.0, 0.5))]
        return constants + [
            helper.make_node("Div", [x, y + "_c0"], [y + "_d"]), helper.make_node("Erf", [y + "_d"], [y + "_e"]),
            helper.make_node("Add", [y + "_e", y + "_c1"], [y + "_a"]),
            helper.make_node("Mul", [x, y + "_a"], [y + "_m"]), helper.make_node("Mul", [y + "_m", y + "_c2"], [y])]
    return [helper.make_node(name, [x], [y])]


def _conv_chain(rng, channels, independent, activation, batchnorm, readers, kernel, pads, reader_batchnorm=False,
                depthwise=False):
    c_in = 3
    weight, bias = _dependent_rows(rng, channels, independent, c_in * 9, activation)
    init = [numpy_helper.from_array(weight.reshape(channels, c_in, 3, 3).astype(np.float32), "w0"),
            numpy_helper.from_array(bias.astype(np.float32), "b0")]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="producer", pads=[1, 1, 1, 1])]
    source = "c0"
    if batchnorm:
        scale = rng.uniform(0.5, 2.0, channels)  # positive: keeps copies copies through ReLU
        init += [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
                 ((scale, "g"), (rng.standard_normal(channels) * 0, "beta"), (np.zeros(channels), "mean"),
                  (np.ones(channels), "var"))]
        if activation not in ("Relu", "Identity"):
            init[-4] = numpy_helper.from_array(np.ones(channels, np.float32), "g")
        nodes.append(helper.make_node("BatchNormalization", ["c0", "g", "beta", "mean", "var"], ["bn0"]))
        source = "bn0"
    if depthwise:  # a MobileNet block: the same 3x3 filter on every channel keeps copies copies (up to a constant;
        # unpadded, so a constant channel stays constant)
        nodes += _activation(activation, source, "a")
        filters = np.tile(rng.standard_normal((1, 1, 3, 3)), (channels, 1, 1, 1)).astype(np.float32)
        init += [numpy_helper.from_array(filters, "dw"),
                 numpy_helper.from_array(np.full(channels, rng.standard_normal(), np.float32), "dwb")]
        nodes.append(helper.make_node("Conv", ["a", "dw", "dwb"], ["h"], name="depthwise", group=channels))
    else:
        nodes += _activation(activation, source, "h")
    outputs = []
    for index in range(readers):
        w = rng.standard_normal((4, channels, kernel, kernel)).astype(np.float32)
        init.append(numpy_helper.from_array(w, f"rw{index}"))
        inputs = ["h", f"rw{index}"]
        if index % 2 == 0:
            init.append(numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), f"rb{index}"))
            inputs.append(f"rb{index}")
        side = (6 if depthwise else 8) - kernel + 1 + 2 * pads
        if reader_batchnorm and index == 0:  # folded into the reader: the rewrite merges it into one Conv
            nodes.append(helper.make_node("Conv", inputs, ["rc0"], name=f"reader{index}", pads=[pads] * 4))
            bn = [rng.uniform(0.5, 2, 4), rng.standard_normal(4), rng.standard_normal(4), rng.uniform(0.5, 2, 4)]
            names = [f"rbn{i}" for i in range(4)]
            init += [numpy_helper.from_array(a.astype(np.float32), n) for a, n in zip(bn, names)]
            nodes.append(helper.make_node("BatchNormalization", ["rc0", *names], [f"y{index}"], name="reader_bn"))
        else:
            nodes.append(helper.make_node("Conv", inputs, [f"y{index}"], name=f"reader{index}", pads=[pads] * 4))
        outputs.append(helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, [2, 4, side, side]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c_in, 8, 8])],
                              outputs, init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {"x": (2, c_in, 8, 8)}


def _matmul_chain(rng, channels, independent, activation, readers, gemm):
    d = 6
    weight, bias = _dependent_rows(rng, channels, independent, d, activation)
    init = [numpy_helper.from_array(weight.T.astype(np.float32), "w0"),
            numpy_helper.from_array(bias.astype(np.float32), "b0")]
    if gemm:
        init[0] = numpy_helper.from_array(weight.astype(np.float32), "w0")
        nodes = [helper.make_node("Gemm", ["x", "w0", "b0"], ["a0"], name="producer", transB=1)]
    else:
        nodes = [helper.make_node("MatMul", ["x", "w0"], ["m0"], name="producer"),
                 helper.make_node("Add", ["m0", "b0"], ["a0"])]
    nodes += _activation(activation, "a0", "h")
    outputs = []
    for index in range(readers):
        w = rng.standard_normal((channels, 5)).astype(np.float32)
        init.append(numpy_helper.from_array(w, f"rw{index}"))
        nodes.append(helper.make_node("MatMul", ["h", f"rw{index}"], [f"y{index}"], name=f"reader{index}"))
        outputs.append(helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, [16, 5] if gemm else [2, 8, 5]))
    shape = (16, d) if gemm else (2, 8, d)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              outputs, init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {"x": shape}


def _narrowed(model, shapes, seed=0, width=None):
    """Find the producer's chain, cut it to its numerical rank on random calibration samples, return the new
    model, the chain and the width."""
    from onnx_lowrank.graph.shapes import tensor_shapes

    names = {t for n in model.graph.node for t in n.output}
    discovery = discover(model, shapes=tensor_shapes(model, shapes, sorted(names)))
    chains = find_chains(model, discovery)
    (chain,) = [c for c in chains.chains if c.name == "producer"]
    rng = np.random.default_rng(seed)
    feeds = [{"x": rng.standard_normal(shapes["x"]).astype(np.float32)} for _ in range(4)]
    statistics = collect_statistics(model, chain.readers, feeds)
    elimination = ChannelElimination([Reader(r.read_matrix(), r.taps, statistics[r.name], r.bias)
                                      for r in chain.readers], chain.channels)
    width = elimination.rank if width is None else width
    narrowed, count = eliminate_channels(model, [(chain, elimination.fold(width))])
    assert count == 1
    onnx.checker.check_model(narrowed, full_check=True)
    return narrowed, chain, width, feeds


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), independent=st.integers(2, 5), extra=st.integers(1, 5),
       activation=st.sampled_from(["Relu", "Identity", "SiLU", "Tanh"]), batchnorm=st.booleans(),
       readers=st.integers(1, 2), kernel=st.sampled_from([1, 3]), reader_batchnorm=st.booleans(),
       depthwise=st.booleans())
def test_conv_chains_with_dependent_channels_shrink_without_changing_outputs(seed, independent, extra, activation,
                                                                             batchnorm, readers, kernel,
                                                                             reader_batchnorm, depthwise):
    rng = np.random.default_rng(seed)
    channels = independent + extra
    model, shapes = _conv_chain(rng, channels, independent, activation, batchnorm, readers, kernel, pads=0,
                                reader_batchnorm=reader_batchnorm, depthwise=depthwise)
    narrowed, chain, width, feeds = _narrowed(model, shapes)
    assert width <= independent + 1  # a constant channel may take a pivot when the others are few
    weights = {t.name: numpy_helper.to_array(t) for t in narrowed.graph.initializer}
    producer = next(n for n in narrowed.graph.node if n.name == "producer")
    assert weights[producer.input[1]].shape[0] == width
    assert_same_outputs(model, narrowed, feeds)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), independent=st.integers(2, 5), extra=st.integers(1, 5),
       activation=st.sampled_from(["Relu", "Identity", "SiLU", "ErfGelu", "Tanh"]), readers=st.integers(1, 2),
       gemm=st.booleans())
def test_matmul_chains_with_dependent_channels_shrink_without_changing_outputs(seed, independent, extra, activation,
                                                                               readers, gemm):
    rng = np.random.default_rng(seed)
    model, shapes = _matmul_chain(rng, independent + extra, independent, activation, readers, gemm)
    narrowed, chain, width, feeds = _narrowed(model, shapes)
    assert width < independent + extra
    assert_same_outputs(model, narrowed, feeds)


def test_a_constant_channel_read_with_zero_padding_is_approximate_at_the_border():
    """A constant channel folded into the bias is exact inside and off at the padded border: measured."""
    rng = np.random.default_rng(1)
    model, shapes = _conv_chain(rng, 4, 4, "Relu", False, 1, 3, pads=1)
    weights = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    weights["w0"][3] = 0.0
    weights["b0"][3] = 2.0  # channel 3 is relu(2) = 2 everywhere
    for tensor in model.graph.initializer:
        tensor.CopyFrom(numpy_helper.from_array(weights[tensor.name], tensor.name))
    narrowed, chain, width, feeds = _narrowed(model, shapes, width=3)
    producer = next(n for n in narrowed.graph.node if n.name == "producer")
    kept_bias = numpy_helper.to_array(next(t for t in narrowed.graph.initializer if t.name == producer.input[2]))
    assert 2.0 not in kept_bias  # the constant channel is the one dropped
    before = runtime.run(runtime.session(model), feeds[0])["y0"]
    after = runtime.run(runtime.session(narrowed), feeds[0])["y0"]
    inner = np.abs(after - before)[:, :, 1:-1, 1:-1].max()
    border = np.abs(after - before).max()
    assert inner < 1e-4 * np.abs(before).max() < border


def test_a_residual_block_is_skipped_with_the_op_that_couples_it():
    rng = np.random.default_rng(2)
    init = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), n) for n in ("w1", "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "x"], ["s"], name="residual"),
             helper.make_node("Relu", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    chains = find_chains(model, discover(model))
    assert [c.name for c in chains.chains] == ["conv1"]
    (skipped,) = chains.skipped
    assert skipped.name == "conv2" and "Add 'residual'" in skipped.reason and "coupled" in skipped.reason


@pytest.mark.parametrize("op", ["Concat", "Flatten"])
def test_channels_reaching_a_concat_or_a_flatten_are_skipped(op):
    rng = np.random.default_rng(3)
    init = [numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w1")]
    coupling = (helper.make_node("Concat", ["c1", "x"], ["y"], axis=1, name="join") if op == "Concat"
                else helper.make_node("Flatten", ["c1"], ["y"], name="join"))
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"), coupling], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    chains = find_chains(model, discover(model))
    assert not chains.chains and f"{op} 'join'" in chains.skipped[0].reason
