"""calibrate.collect_statistics: per-layer input statistics, checked against the real layer inputs in onnxruntime.

The reference never uses `patches.conv_rows`: the intermediate tensors come from an onnxruntime session of our own
(the tensor added as a graph output by hand) and the im2col patches from plain numpy loops over output positions
and kernel taps, each patch checked to give the real Conv output (W @ patch + b) before it is trusted.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import pytest
from helpers.builders import initializer_arrays, make_model, rng_for, tensor, weights, with_outputs
from helpers.running import run
from onnx import helper

import onnx_lowrank
from onnx_lowrank.stages.calibrate import calibrate, collect_statistics
from onnx_lowrank.math.decomposition import WeightDecomposition
from onnx_lowrank.stages.discover import discover
from onnx_lowrank.passes import factorize_layers

RTOL = 1e-5


# ----------------------------------------------------------------------------------------------------------- helpers


def conv_attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def own_pads(attrs: dict, spatial, kernel) -> tuple[list[int], list[int]]:
    """(begins, ends) as the ONNX Conv spec defines them, computed here from scratch."""
    dims = len(kernel)
    strides = list(attrs.get("strides", [1] * dims))
    dilations = list(attrs.get("dilations", [1] * dims))
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            begins.append(begin)
            ends.append(total - begin)
        return begins, ends
    if auto_pad == "VALID":
        return [0] * dims, [0] * dims
    pads = list(attrs.get("pads", [0] * (2 * dims)))
    return pads[:dims], pads[dims:]


def own_patches(x: np.ndarray, node: onnx.NodeProto, kernel) -> np.ndarray:
    """im2col rows (n, o1, o2, ...) x (c, k1, k2, ...) of x for this Conv node, by explicit loops (float64)."""
    attrs = conv_attrs(node)
    dims = len(kernel)
    strides = list(attrs.get("strides", [1] * dims))
    dilations = list(attrs.get("dilations", [1] * dims))
    spatial = x.shape[2:]
    begins, ends = own_pads(attrs, spatial, kernel)
    out = [
        (size + b + e - (k - 1) * d - 1) // s + 1
        for size, b, e, k, d, s in zip(spatial, begins, ends, kernel, dilations, strides)
    ]
    rows = []
    for n in range(x.shape[0]):
        for position in itertools.product(*(range(o) for o in out)):
            patch = np.zeros((x.shape[1], *kernel))
            for tap in itertools.product(*(range(k) for k in kernel)):
                coords = [p * s - b + t * d for p, s, b, t, d in zip(position, strides, begins, tap, dilations)]
                if all(0 <= c < size for c, size in zip(coords, spatial)):
                    patch[(slice(None), *tap)] = x[(n, slice(None), *coords)]
            rows.append(patch.ravel())
    return np.array(rows), out


def intermediates(model: onnx.ModelProto, names, feed) -> dict[str, np.ndarray]:
    """The named tensors of one run, by a session of our own (the tensors added as plain graph outputs)."""
    copy = with_outputs(model, names)
    values = run(copy, feed)
    return dict(zip([o.name for o in copy.graph.output], values))


def node_of(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if n.name == name]
    return node


def reference_rows(model: onnx.ModelProto, layer_name: str, feed, initializers) -> np.ndarray:
    """The rows the layer multiplies, from the real input tensor; a Conv's patches are checked against its output."""
    node = node_of(model, layer_name)
    values = {**feed, **intermediates(model, [node.input[0], node.output[0]], feed)}
    x = values[node.input[0]].astype(np.float64)
    if node.op_type != "Conv":
        return x.reshape(-1, x.shape[-1])
    w = initializers[node.input[1]].astype(np.float64)
    rows, out = own_patches(x, node, w.shape[2:])
    # the patches are what the Conv multiplies: W @ patch (+ b) is the Conv output onnxruntime computes
    product = rows @ w.reshape(w.shape[0], -1).T
    if len(node.input) > 2 and node.input[2]:
        product += initializers[node.input[2]]
    real = np.moveaxis(values[node.output[0]], 1, -1).reshape(-1, w.shape[0])
    assert list(values[node.output[0]].shape[2:]) == out
    np.testing.assert_allclose(product, real, rtol=1e-4, atol=1e-4 * np.abs(real).max())
    return rows


def assert_statistics(stats, rows: np.ndarray, rtol: float = RTOL) -> None:
    gram = rows.T @ rows
    total = rows.sum(axis=0)
    assert stats.count == rows.shape[0]
    assert stats.gram.shape == gram.shape and stats.total.shape == total.shape
    np.testing.assert_allclose(stats.gram, gram, rtol=rtol, atol=rtol * np.abs(gram).max())
    np.testing.assert_allclose(stats.total, total, rtol=rtol, atol=rtol * np.abs(rows).sum(axis=0).max())


def assert_same(a, b, rtol: float = 0.0) -> None:
    assert a.count == b.count
    if rtol == 0.0:
        assert np.array_equal(a.gram, b.gram) and np.array_equal(a.total, b.total)
    else:
        np.testing.assert_allclose(a.gram, b.gram, rtol=rtol, atol=rtol * np.abs(b.gram).max())
        np.testing.assert_allclose(a.total, b.total, rtol=rtol, atol=rtol * np.abs(b.total).max() + 1e-12)


# ------------------------------------------------------------------------------------------------------------ models

INPUT_SHAPE = (3, 11, 10)


def build_calibration_model(seed: int = 0) -> onnx.ModelProto:
    """x (N, 3, 11, 10), dynamic batch:

    conv_a: 3->4, 3x3, strides (2, 1), dilations (1, 2), explicit asymmetric pads (1, 0, 2, 1), bias; Relu
    conv_b: 4->6, 3x2, strides (2, 2), auto_pad SAME_UPPER (asymmetric pads 0/1 on both axes); Relu
    conv_c: 6->4, 2x2, dilations (2, 1), pads (1, 1, 1, 1); Relu
    Flatten -> fc (Gemm transB=1, 60->12, C) -> Relu -> Reshape (N, 3, 4) -> mm (MatMul 4->5) -> y (N, 3, 5)
    """
    rng = rng_for(seed)
    init = {
        "a.w": weights(rng, 4, 3, 3, 3),
        "a.b": (0.1 * rng.standard_normal(4)).astype(np.float32),
        "b.w": weights(rng, 6, 4, 3, 2),
        "c.w": weights(rng, 4, 6, 2, 2),
        "fc.w": weights(rng, 12, 60),
        "fc.b": (0.1 * rng.standard_normal(12)).astype(np.float32),
        "shape": np.array([0, 3, 4], dtype=np.int64),
        "mm.w": weights(rng, 5, 4).T.copy(),
    }
    nodes = [
        helper.make_node("Conv", ["x", "a.w", "a.b"], ["ca"], name="conv_a", kernel_shape=[3, 3], strides=[2, 1],
                         dilations=[1, 2], pads=[1, 0, 2, 1]),
        helper.make_node("Relu", ["ca"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["ra", "b.w"], ["cb"], name="conv_b", kernel_shape=[3, 2], strides=[2, 2],
                         auto_pad="SAME_UPPER"),
        helper.make_node("Relu", ["cb"], ["rb"], name="relu_b"),
        helper.make_node("Conv", ["rb", "c.w"], ["cc"], name="conv_c", dilations=[2, 1], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["cc"], ["rc"], name="relu_c"),
        helper.make_node("Flatten", ["rc"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["f"], name="fc", transB=1),
        helper.make_node("Relu", ["f"], ["rf"], name="relu_f"),
        helper.make_node("Reshape", ["rf", "shape"], ["seq"], name="reshape"),
        helper.make_node("MatMul", ["seq", "mm.w"], ["y"], name="mm"),
    ]
    return make_model(nodes, [tensor("x", ["N", *INPUT_SHAPE])], [tensor("y", ["N", 3, 5])], init)


LAYERS = ("conv_a", "conv_b", "conv_c", "fc", "mm")
CONVS = ("conv_a", "conv_b", "conv_c")


def feeds_for(seed: int, samples: int, batch: int = 2) -> list[dict[str, np.ndarray]]:
    rng = rng_for(seed)
    return [{"x": rng.standard_normal((batch, *INPUT_SHAPE)).astype(np.float32)} for _ in range(samples)]


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return build_calibration_model()


@pytest.fixture(scope="module")
def layers(model):
    found = discover(model).layers
    assert tuple(layer.name for layer in found) == LAYERS
    return found


# ------------------------------------------------------------------------------------------------ exact statistics


def test_statistics_equal_those_of_the_real_layer_inputs(model, layers):
    feeds = feeds_for(1, samples=2)
    stats = collect_statistics(model, layers, feeds, max_rows=None)
    assert set(stats) == set(LAYERS)
    init = initializer_arrays(model)
    for layer in layers:
        rows = np.concatenate([reference_rows(model, layer.name, feed, init) for feed in feeds])
        assert rows.shape[1] == layer.matrix_shape[1]
        assert_statistics(stats[layer.name], rows)
    # the Conv counts are batch * output positions: conv_a 6x7, conv_b 3x4 (SAME_UPPER, stride 2), conv_c 3x5
    assert [stats[name].count for name in CONVS] == [2 * 2 * 42, 2 * 2 * 12, 2 * 2 * 15]
    assert stats["fc"].count == 4 and stats["mm"].count == 12


def test_statistics_are_those_of_w_times_x(model, layers):
    """W mu and W Sigma W^T from the statistics are the mean and second moment of the layer's bias-free output."""
    feeds = feeds_for(2, samples=1, batch=3)
    stats = collect_statistics(model, layers, feeds, max_rows=None)
    for layer in layers:
        node = node_of(model, layer.name)
        y = intermediates(model, [node.output[0]], feeds[0])[node.output[0]].astype(np.float64)
        y = np.moveaxis(y, 1, -1) if layer.op == "Conv" else y
        y = y.reshape(-1, layer.out_channels) - (0.0 if layer.bias is None else layer.bias)
        w = layer.read_matrix()
        np.testing.assert_allclose(w @ stats[layer.name].total, y.sum(axis=0), rtol=1e-4,
                                   atol=1e-4 * np.abs(y).sum(axis=0).max())
        gram = w @ stats[layer.name].gram @ w.T
        np.testing.assert_allclose(gram, y.T @ y, rtol=1e-4, atol=1e-4 * np.abs(gram).max())


@pytest.mark.parametrize("nd", [1, 3])
def test_other_spatial_ranks(nd):
    rng = rng_for(10 + nd)
    spatial = (9,) if nd == 1 else (4, 5, 4)
    kernel = (3,) if nd == 1 else (2, 3, 2)
    attrs = (dict(strides=[2], dilations=[2], pads=[2, 1]) if nd == 1
             else dict(strides=[1, 2, 1], auto_pad="SAME_UPPER"))
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    init = {"w": weights(rng, 4, 2, *kernel)}
    m = make_model([node], [tensor("x", [None, 2, *spatial])], [tensor("y", [None] * (nd + 2))], init)
    feeds = [{"x": rng.standard_normal((2, 2, *spatial)).astype(np.float32)} for _ in range(2)]
    (layer,) = discover(m).layers
    stats = collect_statistics(m, [layer], feeds, max_rows=None)["conv"]
    rows = np.concatenate([reference_rows(m, "conv", feed, init) for feed in feeds])
    assert_statistics(stats, rows)


@pytest.mark.parametrize("layer_name, k", [("conv_c", 2), ("conv_c", 3), ("conv_b", 2), ("conv_b", 4)])
def test_group_blocks_are_the_statistics_of_the_grouped_encoder_input(model, layers, layer_name, k):
    """The k diagonal blocks of a layer's gram are the statistics of what each group of the grouped Conv(group=k)
    encoder reads: the patches of its channel group (numpy), and the second moments of its output in onnxruntime."""
    (layer,) = [layer for layer in layers if layer.name == layer_name]
    feeds = feeds_for(3, samples=2)
    stats = collect_statistics(model, [layer], feeds, max_rows=None)[layer_name]
    m = layer.matrix_shape[1] // k
    channels = layer.in_channels // k

    # 1. the diagonal blocks equal the statistics of each channel group's own patches
    node = node_of(model, layer_name)
    for g in range(k):
        rows = []
        for feed in feeds:
            x = intermediates(model, [node.input[0]], feed)[node.input[0]].astype(np.float64)
            rows.append(own_patches(x[:, g * channels : (g + 1) * channels], node, layer.kernel_shape)[0])
        rows = np.concatenate(rows)
        block = slice(g * m, (g + 1) * m)
        np.testing.assert_allclose(stats.gram[block, block], rows.T @ rows, rtol=RTOL,
                                   atol=RTOL * np.abs(rows.T @ rows).max())
        np.testing.assert_allclose(stats.total[block], rows.sum(axis=0), rtol=RTOL,
                                   atol=RTOL * np.abs(rows).sum(axis=0).max())

    # 2. the grouped encoder the rewrite writes (Conv group=k) outputs E_g x_g: its second moments are E_g G_gg E_g^T
    rank = min(3, layer.out_channels, m)
    factors = WeightDecomposition(layer.read_matrix(), k).factors(rank)
    rewritten, _ = factorize_layers(model, [(layer, factors)])
    (encoder,) = [n for n in rewritten.graph.node if n.op_type == "Conv" and n.input[0] == node.input[0]]
    assert conv_attrs(encoder)["group"] == k
    sums = np.zeros((k * rank, k * rank))
    totals = np.zeros(k * rank)
    for feed in feeds:
        h = intermediates(rewritten, [encoder.output[0]], feed)[encoder.output[0]].astype(np.float64)
        h = np.moveaxis(h, 1, -1).reshape(-1, k * rank)
        sums += h.T @ h
        totals += h.sum(axis=0)
    for g in range(k):
        e = factors.encoder[g]
        block, hidden = slice(g * m, (g + 1) * m), slice(g * rank, (g + 1) * rank)
        want = e @ stats.gram[block, block] @ e.T
        np.testing.assert_allclose(sums[hidden, hidden], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        np.testing.assert_allclose(totals[hidden], e @ stats.total[block], rtol=1e-4,
                                   atol=1e-4 * np.abs(totals).max())


# ------------------------------------------------------------------------------------------------------- streaming


def test_list_of_feeds_equals_sum_over_each_feed(model, layers):
    feeds = feeds_for(4, samples=3)
    together = collect_statistics(model, layers, feeds, max_rows=None)
    separate = [collect_statistics(model, layers, [feed], max_rows=None) for feed in feeds]
    for layer in layers:
        parts = [s[layer.name] for s in separate]
        assert together[layer.name].count == sum(p.count for p in parts)
        # each pass shifts its rows by its own first mean before the float32 products (of up to 2048 rows):
        # equal to float32 rounding
        scale = np.abs(together[layer.name].gram).max()
        np.testing.assert_allclose(together[layer.name].gram, sum(p.gram for p in parts), rtol=0, atol=4e-6 * scale)
        np.testing.assert_allclose(together[layer.name].total, sum(p.total for p in parts), rtol=0,
                                   atol=1e-6 * np.abs(together[layer.name].total).max())


def test_chunked_equals_one_shot(model, layers):
    """Three feeds of batch 2 give the statistics of one feed of batch 6 (the same rows, in other chunks)."""
    feeds = feeds_for(5, samples=3)
    chunked = collect_statistics(model, layers, feeds, max_rows=None)
    one_shot = collect_statistics(model, layers, [{"x": np.concatenate([f["x"] for f in feeds])}], max_rows=None)
    for layer in layers:
        assert_same(chunked[layer.name], one_shot[layer.name], rtol=RTOL)


def test_generator_of_feeds_is_consumed_once(model, layers):
    feeds = feeds_for(6, samples=3)
    yielded = []

    def generate():
        for index, feed in enumerate(feeds):
            yielded.append(index)
            yield feed

    seen = []
    from_list = collect_statistics(model, layers, feeds, max_rows=None)
    generator = generate()
    from_generator = collect_statistics(model, layers, generator, max_rows=None, progress=seen.append)
    assert yielded == [0, 1, 2]
    assert next(generator, None) is None
    assert seen == [1, 2, 3]
    for layer in layers:
        assert_same(from_generator[layer.name], from_list[layer.name])


def test_layers_reading_the_same_tensor():
    """Several Convs reading x with the same geometry get equal statistics; another geometry gets its own; two
    linear layers reading one tensor get equal statistics too."""
    rng = rng_for(7)
    init = {
        "w1": weights(rng, 4, 3, 3, 3), "w2": weights(rng, 6, 3, 3, 3), "w3": weights(rng, 5, 3, 3, 3),
        "w4": weights(rng, 2, 3, 3, 3), "m1": weights(rng, 5, 4), "m2": weights(rng, 5, 3),
    }
    same = dict(strides=[2, 2], pads=[1, 1, 0, 0])
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["y1"], name="head1", **same),
        helper.make_node("Conv", ["x", "w2"], ["y2"], name="head2", **same),
        helper.make_node("Conv", ["x", "w3"], ["y3"], name="head3", kernel_shape=[3, 3], **same),
        helper.make_node("Conv", ["x", "w4"], ["y4"], name="other", pads=[1, 1, 1, 1]),  # stride 1: other rows
        helper.make_node("Relu", ["y1"], ["r1"], name="relu"),
        helper.make_node("GlobalAveragePool", ["y3"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "m1"], ["z1"], name="lin1"),
        helper.make_node("Gemm", ["f", "m2"], ["z2"], name="lin2"),
    ]
    outputs = [tensor(name, [None] * rank) for name, rank in (("r1", 4), ("y2", 4), ("y4", 4), ("z1", 2), ("z2", 2))]
    m = make_model(nodes, [tensor("x", [2, 3, 7, 8])], outputs, init)
    found = discover(m).layers
    assert [layer.name for layer in found] == ["head1", "head2", "head3", "other", "lin1", "lin2"]
    feeds = [{"x": rng.standard_normal((2, 3, 7, 8)).astype(np.float32)} for _ in range(2)]
    stats = collect_statistics(m, found, feeds, max_rows=None)
    assert_same(stats["head1"], stats["head2"])
    assert_same(stats["head1"], stats["head3"])
    assert stats["other"].count != stats["head1"].count
    assert_same(stats["lin1"], stats["lin2"])
    inits = initializer_arrays(m)
    for name in ("head1", "other", "lin1"):
        assert_statistics(stats[name], np.concatenate([reference_rows(m, name, f, inits) for f in feeds]))
    # a layer alone gets what it gets among the others
    assert_same(collect_statistics(m, [found[1]], feeds, max_rows=None)["head2"], stats["head2"])
    # subsampled, layers sharing a tensor still share rows
    sub = collect_statistics(m, found, feeds, max_rows=5)
    assert_same(sub["head1"], sub["head2"])


# ----------------------------------------------------------------------------------------------------- subsampling


def test_subsampling_counts_and_determinism(model, layers):
    feeds = feeds_for(8, samples=3)
    first = collect_statistics(model, layers, feeds, max_rows=5)
    second = collect_statistics(model, layers, feeds, max_rows=5)
    for name in CONVS:
        assert first[name].count == 3 * 5
    assert first["fc"].count == 3 * 2  # two rows per sample: fewer than max_rows, all kept
    assert first["mm"].count == 3 * 5  # six rows per sample, five kept
    for layer in layers:
        assert_same(first[layer.name], second[layer.name])
        assert np.allclose(first[layer.name].gram, first[layer.name].gram.T)


def test_subsample_is_a_subset_of_the_real_rows(model, layers):
    """With one row per sample, every subsampled gram is a rank-one x x^T of a real patch."""
    feeds = feeds_for(9, samples=2)
    stats = collect_statistics(model, layers, feeds[:1], max_rows=1)
    init = initializer_arrays(model)
    for layer in layers:
        rows = reference_rows(model, layer.name, feeds[0], init)
        s = stats[layer.name]
        assert s.count == 1
        distances = np.abs(rows - s.total).max(axis=1)
        nearest = rows[np.argmin(distances)]
        np.testing.assert_allclose(s.total, nearest, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(s.gram, np.outer(nearest, nearest), rtol=1e-5, atol=1e-6)


def test_large_max_rows_keeps_every_row_and_samples_get_different_positions(model, layers):
    feeds = feeds_for(10, samples=2)
    everything = collect_statistics(model, layers, feeds, max_rows=None)
    big = collect_statistics(model, layers, feeds, max_rows=10**6)
    for layer in layers:
        assert_same(big[layer.name], everything[layer.name])
    # the same sample twice: different positions are drawn the second time
    twice = collect_statistics(model, layers, [feeds[0], feeds[0]], max_rows=5)
    once = collect_statistics(model, layers, [feeds[0]], max_rows=5)
    assert not np.allclose(twice["conv_a"].gram, 2 * once["conv_a"].gram)


# ---------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("feeds", [[], iter(())], ids=["empty list", "empty iterator"])
def test_no_samples(model, layers, feeds):
    with pytest.raises(onnx_lowrank.InputDataError):
        collect_statistics(model, layers, feeds)


def test_model_is_not_modified(model, layers):
    before = model.SerializeToString()
    collect_statistics(model, layers, feeds_for(11, samples=2), max_rows=7)
    collect_statistics(model, layers, feeds_for(11, samples=1), max_rows=None)
    assert model.SerializeToString() == before


@pytest.mark.parametrize("batch", [1, 3])
def test_rows_summed_in_parts_add_up_to_the_whole(model, layers, batch):
    """`part_of` sums each unit (a row of a batch) into its part: every part is the statistics of a pass over its
    own rows, and the parts add up to the statistics of one pass without parts."""
    feeds = feeds_for(7, samples=4, batch=batch)
    split = calibrate(model, layers, feeds, max_rows=None, part_of=lambda unit: unit % 2, by_row=True)
    whole = collect_statistics(model, layers, feeds, max_rows=None)
    units = [(unit, feed["x"][row : row + 1]) for unit, (feed, row) in
             enumerate((feed, row) for feed in feeds for row in range(batch))]
    for part in (0, 1):
        alone = collect_statistics(model, layers, [{"x": x} for unit, x in units if unit % 2 == part], max_rows=None)
        for layer in layers:
            assert split.parts[part][layer.name].count == alone[layer.name].count
            scale = np.abs(alone[layer.name].gram).max()
            np.testing.assert_allclose(split.parts[part][layer.name].gram, alone[layer.name].gram, rtol=0,
                                       atol=1e-5 * scale)
    for layer in layers:
        assert split.layers[layer.name].count == whole[layer.name].count
        scale = np.abs(whole[layer.name].gram).max()
        np.testing.assert_allclose(split.layers[layer.name].gram, whole[layer.name].gram, rtol=0, atol=1e-5 * scale)
