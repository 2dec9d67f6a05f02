"""patches: im2col rows of Conv inputs and rows of Gemm/MatMul inputs, checked against onnxruntime.

The contract: W.reshape(out, -1) @ conv_rows(x).T is the Conv output (without bias), for any number of spatial
dims, strides, dilations, explicit pads and auto_pad; a subsample is an exact, ordered, seeded subset of all rows.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.reference
import pytest
from helpers.builders import make_model, tensor
from helpers.running import run
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from onnx_lowrank.math.patches import ConvGeometry, conv_rows, linear_rows
from onnx_lowrank.math.statistics import StatisticsAccumulator

RTOL, ATOL = 1e-4, 1e-5


# ----------------------------------------------------------------------------------------------------------- helpers


def conv_node(kernel: tuple[int, ...], **attributes) -> onnx.NodeProto:
    """A Conv node y = Conv(x, w); attributes left out (None) take their ONNX default."""
    given_attrs = {name: value for name, value in attributes.items() if value is not None}
    return helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=list(kernel), **given_attrs)


def geometry_of(node: onnx.NodeProto, kernel: tuple[int, ...]) -> ConvGeometry:
    """The geometry as the tool reads it from a node: attributes through get_attribute_value (auto_pad is bytes)."""
    return ConvGeometry.from_attributes({a.name: helper.get_attribute_value(a) for a in node.attribute}, kernel)


def ort_conv(node: onnx.NodeProto, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    model = make_model([node], [tensor("x", list(x.shape))], [tensor("y", [None] * x.ndim)], {"w": w})
    return run(model, {"x": x})[0]


def conv_from_rows(x: np.ndarray, w: np.ndarray, geometry: ConvGeometry) -> np.ndarray:
    """The Conv output (N, out, *output_shape) computed as W.reshape(out, -1) @ rows.T."""
    out_shape = geometry.output_shape(x.shape[2:])
    product = w.reshape(w.shape[0], -1).astype(np.float64) @ conv_rows(x, geometry).T.astype(np.float64)
    return np.moveaxis(product.reshape(w.shape[0], x.shape[0], *out_shape), 0, 1)


def random_conv(seed: int, batch: int, channels: int, out: int, spatial, kernel):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, channels, *spatial)).astype(np.float32)
    w = rng.standard_normal((out, channels, *kernel)).astype(np.float32)
    return x, w


def row_positions(full: np.ndarray, subset: np.ndarray) -> list[int]:
    """Index in `full` of every row of `subset` (rows of random data are unique)."""
    index = {row.tobytes(): i for i, row in enumerate(full)}
    assert len(index) == len(full), "test data should give distinct rows"
    return [index[row.tobytes()] for row in subset]


# ---------------------------------------------------------------------------------------- 1. Conv rows against ORT

# (spatial, kernel, strides, dilations, pads, auto_pad); None = attribute left out (ONNX default)
CONV_CASES = [
    # 1-D
    ((11,), (3,), (2,), (2,), (1, 2), None),
    ((10,), (4,), (3,), None, None, "SAME_UPPER"),
    ((10,), (4,), (3,), None, None, "SAME_LOWER"),
    ((9,), (2,), None, None, None, "SAME_LOWER"),
    ((2,), (5,), (1,), None, None, "SAME_UPPER"),  # kernel larger than the input: padding on both sides
    ((13,), (3,), (2,), (3,), None, "VALID"),
    # 2-D
    ((9, 8), (3, 2), (2, 1), (1, 2), (0, 1, 2, 0), None),
    ((9, 8), (3, 3), (2, 2), None, None, "SAME_UPPER"),
    ((7, 10), (2, 4), (1, 3), None, None, "SAME_LOWER"),
    ((8, 6), (1, 1), (2, 2), None, None, "SAME_UPPER"),  # 1x1 stride 2: negative pad need, clamped to 0
    ((10, 9), (3, 3), (2, 3), (2, 1), None, "VALID"),
    ((6, 7), (3, 3), None, None, None, None),  # every attribute at its default
    # 3-D
    ((5, 7, 6), (2, 3, 2), (1, 2, 2), (2, 1, 1), (1, 0, 1, 0, 2, 1), None),
    ((5, 6, 7), (3, 2, 3), (2, 1, 2), None, None, "SAME_UPPER"),
    ((6, 5, 4), (2, 3, 3), (2, 2, 1), None, None, "SAME_LOWER"),
    ((6, 7, 5), (2, 2, 3), (1, 2, 1), (2, 1, 1), None, "VALID"),
]


@pytest.mark.parametrize("spatial, kernel, strides, dilations, pads, auto_pad", CONV_CASES)
def test_conv_rows_match_onnxruntime(spatial, kernel, strides, dilations, pads, auto_pad):
    x, w = random_conv(len(spatial) * 100 + sum(spatial), 2, 3, 5, spatial, kernel)
    node = conv_node(kernel, strides=strides, dilations=dilations, pads=pads, auto_pad=auto_pad)
    geometry = geometry_of(node, kernel)
    expected = ort_conv(node, x, w)

    assert geometry.output_shape(spatial) == expected.shape[2:]
    rows = conv_rows(x, geometry)
    assert rows.shape == (2 * math.prod(expected.shape[2:]), 3 * math.prod(kernel))
    assert rows.dtype == np.float32
    np.testing.assert_allclose(conv_from_rows(x, w, geometry), expected, rtol=RTOL, atol=ATOL)


@st.composite
def conv_setups(draw):
    """A random Conv (1-D or 2-D) that onnxruntime runs as the ONNX spec says: SAME_* only with dilation 1 and
    stride <= kernel + 2 (beyond that ORT shifts the windows, see `test_same_padding_follows_the_onnx_reference`)."""
    dims = draw(st.integers(1, 2))
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(dims))
    if auto_pad.startswith("SAME"):
        dilations = (1,) * dims
        strides = tuple(draw(st.integers(1, k + 2)) for k in kernel)
    else:
        dilations = tuple(draw(st.integers(1, 3)) for _ in range(dims))
        strides = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(2 * dims)) if auto_pad == "NOTSET" else None
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    spatial = tuple(draw(st.integers(s if auto_pad == "VALID" else max(1, s - 2), s + 7)) for s in span)
    if auto_pad == "NOTSET":  # the padded input must hold one dilated kernel
        spatial = tuple(max(n, s - p - q) for n, s, p, q in zip(spatial, span, pads[:dims], pads[dims:]))
    return spatial, kernel, strides, dilations, pads, auto_pad, draw(st.integers(1, 2)), draw(st.integers(0, 99))


@settings(max_examples=100, deadline=None)
@given(conv_setups())
def test_conv_rows_match_onnxruntime_random(setup):
    spatial, kernel, strides, dilations, pads, auto_pad, batch, seed = setup
    x, w = random_conv(seed, batch, 2, 3, spatial, kernel)
    node = conv_node(kernel, strides=list(strides), dilations=list(dilations),
                     pads=list(pads) if pads else None, auto_pad=auto_pad)
    geometry = geometry_of(node, kernel)
    expected = ort_conv(node, x, w)
    assert geometry.output_shape(spatial) == expected.shape[2:]
    np.testing.assert_allclose(conv_from_rows(x, w, geometry), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("spatial, kernel, strides, dilations, auto_pad", [
    ((9, 10), (3, 2), (2, 1), (2, 3), "SAME_UPPER"),  # dilation with SAME: ORT refuses it
    ((9, 10), (3, 2), (2, 1), (2, 3), "SAME_LOWER"),
    ((11,), (1,), (5,), (1,), "SAME_UPPER"),  # stride >= kernel + 3: ORT does not clamp the negative pad
    ((13,), (2,), (7,), (1,), "SAME_LOWER"),
])
def test_same_padding_follows_the_onnx_reference(spatial, kernel, strides, dilations, auto_pad):
    x, w = random_conv(7, 1, 2, 3, spatial, kernel)
    node = conv_node(kernel, strides=list(strides), dilations=list(dilations), auto_pad=auto_pad)
    model = make_model([node], [tensor("x", list(x.shape))], [tensor("y", [None] * x.ndim)], {"w": w})
    expected = onnx.reference.ReferenceEvaluator(model).run(None, {"x": x})[0]
    geometry = geometry_of(node, kernel)
    assert geometry.output_shape(spatial) == expected.shape[2:]
    np.testing.assert_allclose(conv_from_rows(x, w, geometry), expected, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------------- ConvGeometry


def test_geometry_defaults_and_attribute_forms():
    geometry = ConvGeometry.from_attributes({}, [3, 3])
    assert geometry == ConvGeometry((3, 3), (1, 1), (1, 1), (0, 0, 0, 0), "NOTSET")
    node = conv_node((3, 1), strides=[2, 1], auto_pad="SAME_LOWER", group=1)
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attributes["auto_pad"] == b"SAME_LOWER"
    geometry = ConvGeometry.from_attributes(attributes, (3, 1))
    assert geometry.auto_pad == "SAME_LOWER" and geometry.strides == (2, 1) and geometry.pads == (0, 0, 0, 0)
    assert ConvGeometry([2], [1], [1], [0, 0]).kernel_shape == (2,)  # lists become tuples (hashable)


def test_resolved_pads():
    same = dict(kernel_shape=(4,), strides=(1,), dilations=(1,), pads=(9, 9))
    assert ConvGeometry(**same, auto_pad="SAME_UPPER").resolved_pads([5]) == (1, 2)  # odd extra pad at the end
    assert ConvGeometry(**same, auto_pad="SAME_LOWER").resolved_pads([5]) == (2, 1)  # ... at the beginning
    assert ConvGeometry(**same, auto_pad="VALID").resolved_pads([5]) == (0, 0)
    assert ConvGeometry(**same).resolved_pads([5]) == (9, 9)
    dilated = ConvGeometry((3, 3), (2, 1), (2, 1), (0, 0, 0, 0), "SAME_UPPER")  # effective kernel 5 x 3
    assert dilated.resolved_pads([8, 6]) == (1, 1, 2, 1)  # totals 3 and 2
    assert dilated.output_shape([8, 6]) == (4, 6)  # ceil(in / stride)
    assert ConvGeometry((1,), (3,), (1,), (0, 0), "SAME_UPPER").resolved_pads([8]) == (0, 0)  # clamped at 0


def test_invalid_geometry_is_refused():
    with pytest.raises(ValueError, match="kernel_shape"):
        ConvGeometry.from_attributes({"kernel_shape": [3, 3]}, (3, 1))
    with pytest.raises(ValueError, match="auto_pad"):
        ConvGeometry.from_attributes({"auto_pad": b"SAME"}, (3,))
    with pytest.raises(ValueError, match="pads"):
        ConvGeometry((3, 3), (1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="smaller"):
        ConvGeometry((5,), (1,), (1,), (0, 0)).output_shape([4])
    with pytest.raises(ValueError, match="rank"):
        conv_rows(np.zeros((1, 2, 5), np.float32), ConvGeometry.from_attributes({}, (3, 3)))


def test_dtypes():
    geometry = ConvGeometry.from_attributes({"pads": [1, 1]}, (3,))
    assert conv_rows(np.ones((1, 2, 4), np.float64), geometry).dtype == np.float64
    assert conv_rows(np.ones((1, 2, 4), np.int64), geometry).dtype == np.float32
    assert linear_rows(np.ones((3, 4), np.int32)).dtype == np.float32


# --------------------------------------------------------------------------------------------------- 2. grouped


@pytest.mark.parametrize("groups", [2, 3, 6])
def test_column_groups_are_the_grouped_conv_inputs(groups):
    channels, rank, kernel = 6, 4, (3, 2)
    x, _ = random_conv(groups, 2, channels, 1, (9, 8), kernel)
    blocks = np.random.default_rng(10 + groups).standard_normal((groups, rank, channels // groups, *kernel))
    blocks = blocks.astype(np.float32)
    attributes = dict(strides=[2, 1], dilations=[1, 2], pads=[1, 0, 0, 2])
    grouped = conv_node(kernel, group=groups, **attributes)
    expected = ort_conv(grouped, x, blocks.reshape(groups * rank, channels // groups, *kernel))

    geometry = geometry_of(conv_node(kernel, **attributes), kernel)
    rows = conv_rows(x, geometry).astype(np.float64)
    width = channels // groups * math.prod(kernel)
    out_shape = geometry.output_shape(x.shape[2:])
    for g in range(groups):
        block_rows = rows[:, g * width:(g + 1) * width]
        y = (blocks[g].reshape(rank, -1) @ block_rows.T).reshape(rank, x.shape[0], *out_shape)
        np.testing.assert_allclose(np.moveaxis(y, 0, 1), expected[:, g * rank:(g + 1) * rank], rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------------ 3. subsampling


SUBSAMPLE_GEOMETRIES = [
    ((3, 2, 20), ConvGeometry((3,), (2,), (1,), (1, 1))),
    ((2, 3, 11, 9), ConvGeometry((3, 3), (2, 1), (1, 2), (1, 0, 2, 1))),
    ((2, 2, 5, 6, 4), ConvGeometry((2, 3, 2), (1, 2, 1), (1, 1, 1), (0,) * 6, "SAME_UPPER")),
]


@pytest.mark.parametrize("shape, geometry", SUBSAMPLE_GEOMETRIES)
def test_subsample_is_an_ordered_seeded_subset(shape, geometry):
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    full = conv_rows(x, geometry)
    assert full.shape[0] == shape[0] * math.prod(geometry.output_shape(shape[2:]))
    for max_rows, seed in [(1, 0), (7, 0), (7, 1), (full.shape[0] - 1, 5)]:
        subset = conv_rows(x, geometry, max_rows=max_rows, seed=seed)
        assert subset.shape == (max_rows, full.shape[1]) and subset.dtype == full.dtype
        positions = row_positions(full, subset)
        assert positions == sorted(set(positions))  # distinct rows of `full`, in its order
        np.testing.assert_array_equal(subset, full[positions])
        np.testing.assert_array_equal(conv_rows(x, geometry, max_rows=max_rows, seed=seed), subset)
    assert not np.array_equal(conv_rows(x, geometry, 7, seed=0), conv_rows(x, geometry, 7, seed=1))
    for max_rows in (full.shape[0], full.shape[0] + 10):  # enough room: every row, no sampling
        np.testing.assert_array_equal(conv_rows(x, geometry, max_rows=max_rows, seed=4), full)


def test_subsample_is_uniform_over_positions():
    """Over many seeds every position is drawn about equally often (no bias toward any batch item or edge)."""
    x = np.random.default_rng(0).standard_normal((2, 1, 12)).astype(np.float32)
    geometry = ConvGeometry((1,), (1,), (1,), (0, 0))
    counts = np.zeros(24)
    for seed in range(400):
        counts[row_positions(conv_rows(x, geometry), conv_rows(x, geometry, max_rows=6, seed=seed))] += 1
    assert counts.sum() == 2400 and counts.min() > 60 and counts.max() < 140  # mean 100


def test_linear_subsample_and_bad_max_rows():
    x = np.random.default_rng(1).standard_normal((4, 5, 6)).astype(np.float32)
    full = linear_rows(x)
    subset = linear_rows(x, max_rows=9, seed=2)
    positions = row_positions(full, subset)
    assert len(positions) == 9 and positions == sorted(set(positions))
    np.testing.assert_array_equal(linear_rows(x, max_rows=9, seed=2), subset)
    np.testing.assert_array_equal(linear_rows(x, max_rows=20), full)
    with pytest.raises(ValueError, match="max_rows"):
        linear_rows(x, max_rows=0)
    with pytest.raises(ValueError, match="max_rows"):
        conv_rows(x[:, :, None, :], ConvGeometry((1, 1), (1, 1), (1, 1), (0,) * 4), max_rows=0)


# -------------------------------------------------------------------------------------------------- 4. statistics


@pytest.mark.parametrize("max_rows", [None, 50])
def test_chunked_statistics_equal_one_shot(max_rows):
    geometry = ConvGeometry((3, 3), (2, 2), (1, 1), (1, 1, 1, 1))
    rng = np.random.default_rng(5)
    samples = [(rng.standard_normal((2, 4, 10, 9)) + 0.5).astype(np.float32) for _ in range(3)]
    per_sample = [conv_rows(x, geometry, max_rows=max_rows, seed=i) for i, x in enumerate(samples)]
    everything = np.concatenate(per_sample).astype(np.float64)

    accumulator = StatisticsAccumulator(everything.shape[1])
    for rows in per_sample:  # each sample in uneven chunks
        for chunk in np.array_split(rows, [7, 8, 30]):
            accumulator.add(chunk)
    stats = accumulator.result()

    gram = everything.T @ everything
    assert stats.count == everything.shape[0] == (3 * 2 * 25 if max_rows is None else 150)
    np.testing.assert_allclose(stats.gram, gram, rtol=1e-5, atol=1e-5 * np.abs(gram).max())
    np.testing.assert_allclose(stats.total, everything.sum(axis=0), rtol=1e-5, atol=1e-5 * everything.shape[0])


# ------------------------------------------------------------------------------------------------ 5. linear rows


@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 8), (2, 3, 4, 8)])
def test_linear_rows_match_onnxruntime_matmul(shape):
    rng = np.random.default_rng(len(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((6, 8)).astype(np.float32)  # (out, in): the layer's matrix
    node = helper.make_node("MatMul", ["x", "b"], ["y"], name="mm")
    model = make_model([node], [tensor("x", list(shape))], [tensor("y", [None] * len(shape))], {"b": w.T.copy()})
    expected = run(model, {"x": x})[0]

    rows = linear_rows(x)
    assert rows.shape == (math.prod(shape[:-1]), 8)
    np.testing.assert_array_equal(rows, x.reshape(-1, 8))
    np.testing.assert_allclose((w @ rows.T).T.reshape(expected.shape), expected, rtol=RTOL, atol=ATOL)
