"""Input shapes, random feeds and .npz loading, on tiny inline models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnx_lowrank.errors import InputDataError, InvalidModelError, InvalidOptionError
from onnx_lowrank.graph.inputs import (
    InputSpec,
    load_feeds,
    model_inputs,
    parse_input_shapes,
    random_feeds,
    resolve_shapes,
)


def image_model(shape=("batch", 3, "height", "width"), elem_type=TensorProto.FLOAT) -> onnx.ModelProto:
    """x -> Identity -> y, plus a graph input that is really an initializer (an old-IR default)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["bias"], ["b_out"])],
        "image",
        [helper.make_tensor_value_info("x", elem_type, list(shape)),
         helper.make_tensor_value_info("bias", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", elem_type, list(shape)),
         helper.make_tensor_value_info("b_out", TensorProto.FLOAT, [3])],
        [helper.make_tensor("bias", TensorProto.FLOAT, [3], [0.0, 1.0, 2.0])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def two_input_model() -> onnx.ModelProto:
    """A float image, an int64 token tensor and a bool mask, all with a dynamic batch only."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [n], [n + "_out"]) for n in ("img", "ids", "mask")],
        "multi",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 3, 4, 4]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5]),
         helper.make_tensor_value_info("mask", TensorProto.BOOL, [-1, 5])],
        [helper.make_tensor_value_info(n + "_out", t, None) for n, t in
         (("img", TensorProto.FLOAT), ("ids", TensorProto.INT64), ("mask", TensorProto.BOOL))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


# --- parse_input_shapes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "spec, expected",
    [
        ("images:1x3x320x320", {"images": (1, 3, 320, 320)}),
        ("x:1,3,48,320", {"x": (1, 3, 48, 320)}),
        ("x:1X3X48X320", {"x": (1, 3, 48, 320)}),
        (" x : 2 x 3 ", {"x": (2, 3)}),
        ("input:0:1x224", {"input:0": (1, 224)}),
        ("p2o.x/y:7", {"p2o.x/y": (7,)}),
    ],
)
def test_parse_input_shapes_accepts_x_and_commas(spec, expected):
    assert parse_input_shapes([spec]) == expected


def test_parse_input_shapes_several_and_empty():
    assert parse_input_shapes(["a:1x2", "b:3,4"]) == {"a": (1, 2), "b": (3, 4)}
    assert parse_input_shapes([]) == {}


@pytest.mark.parametrize(
    "spec", ["images", "images:", ":1x3", "images:1x3xa", "images:1x-3", "images:1x3.5", "images:1xx3", "x:1;3"]
)
def test_parse_input_shapes_rejects_malformed_with_an_example(spec):
    with pytest.raises(InvalidOptionError) as info:
        parse_input_shapes([spec])
    message = str(info.value)
    assert "1x3x640x640" in message and "\n" not in message


def test_parse_input_shapes_rejects_zero_and_duplicates():
    with pytest.raises(InvalidOptionError, match="<= 0"):
        parse_input_shapes(["x:1x0x3"])
    with pytest.raises(InvalidOptionError, match="two shapes"):
        parse_input_shapes(["x:1x3", "x:1,3"])


@given(
    name=st.from_regex(r"[A-Za-z_][A-Za-z0-9_./:]{0,12}", fullmatch=True),
    dims=st.lists(st.integers(1, 4096), min_size=1, max_size=6),
    sep=st.sampled_from(["x", ","]),
)
def test_parse_input_shapes_round_trips(name, dims, sep):
    assert parse_input_shapes([f"{name}:{sep.join(map(str, dims))}"]) == {name: tuple(dims)}


# --- model_inputs / resolve_shapes --------------------------------------------------------------------------------

def test_model_inputs_skips_initializers_and_marks_dynamic_dims():
    specs = model_inputs(image_model())
    assert specs == [InputSpec("x", np.dtype(np.float32), (None, 3, None, None))]
    assert specs[0].dynamic_positions == (0, 2, 3)
    multi = model_inputs(two_input_model())
    assert [(s.name, s.dtype, s.shape) for s in multi] == [
        ("img", np.dtype(np.float32), (None, 3, 4, 4)),
        ("ids", np.dtype(np.int64), (None, 5)),
        ("mask", np.dtype(np.bool_), (None, 5)),  # -1 written by some exporters means dynamic
    ]


def test_model_inputs_rejects_non_tensor_input():
    graph = helper.make_graph(
        [helper.make_node("SequenceLength", ["s"], ["n"])],
        "seq",
        [helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("n", TensorProto.INT64, [])],
    )
    with pytest.raises(InvalidModelError, match="'s' is not a tensor"):
        model_inputs(helper.make_model(graph))


def test_resolve_shapes_defaults_dynamic_batch_to_one():
    assert resolve_shapes(two_input_model(), {}) == {"img": (1, 3, 4, 4), "ids": (1, 5), "mask": (1, 5)}
    assert resolve_shapes(two_input_model(), {"ids": (4, 5)})["ids"] == (4, 5)


def test_resolve_shapes_static_model_needs_nothing():
    assert resolve_shapes(image_model((2, 3, 8, 8)), {}) == {"x": (2, 3, 8, 8)}


def test_resolve_shapes_uses_override_for_dynamic_dims():
    model = image_model()
    assert resolve_shapes(model, {"x": (1, 3, 320, 256)}) == {"x": (1, 3, 320, 256)}
    assert resolve_shapes(model, parse_input_shapes(["x:4,3,48,320"])) == {"x": (4, 3, 48, 320)}


def test_resolve_shapes_requires_spatial_dims_and_suggests_a_shape():
    with pytest.raises(InvalidOptionError) as info:
        resolve_shapes(image_model(), {})
    message = str(info.value)
    assert "'x'" in message and "2, 3" in message and "--input-shape x:1x3xHxW" in message
    assert "?x3x?x?" in message and "\n" not in message


def test_resolve_shapes_names_other_dynamic_positions():
    with pytest.raises(InvalidOptionError, match=r"position\(s\) 1 .*--input-shape x:1xD1x8"):
        resolve_shapes(image_model(("b", "c", 8)), {})


def test_resolve_shapes_rejects_unknown_name_listing_real_inputs():
    with pytest.raises(InvalidOptionError, match=r"'images'.*inputs are: img, ids, mask"):
        resolve_shapes(two_input_model(), {"images": (1, 3, 4, 4)})


def test_resolve_shapes_rejects_rank_mismatch():
    with pytest.raises(InvalidOptionError, match=r"rank 3 but the input has rank 4.*x:1x3xHxW"):
        resolve_shapes(image_model(), {"x": (1, 3, 320)})


def test_resolve_shapes_rejects_static_dim_mismatch():
    with pytest.raises(InvalidOptionError, match="dimension 1 to 4 but the model fixes it to 3"):
        resolve_shapes(image_model(), {"x": (1, 4, 320, 320)})


def test_resolve_shapes_rejects_nonpositive_override():
    with pytest.raises(InvalidOptionError, match="<= 0"):
        resolve_shapes(image_model(), {"x": (1, 3, 0, 320)})


def test_resolve_shapes_input_without_declared_shape_needs_override():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "noshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph)
    assert model_inputs(model)[0].shape is None
    with pytest.raises(InvalidOptionError, match="no declared shape"):
        resolve_shapes(model, {})
    assert resolve_shapes(model, {"x": (2, 5)}) == {"x": (2, 5)}


# --- random_feeds ------------------------------------------------------------------------------------------------

def test_random_feeds_are_deterministic_image_like_and_typed():
    model = two_input_model()
    first = random_feeds(model, {"img": (2, 3, 4, 4)}, count=3, seed=7)
    again = random_feeds(model, {"img": (2, 3, 4, 4)}, count=3, seed=7)
    other = random_feeds(model, {"img": (2, 3, 4, 4)}, count=1, seed=8)
    assert len(first) == 3
    for a, b in zip(first, again):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(first[0]["img"], other[0]["img"])
    assert not np.array_equal(first[0]["img"], first[1]["img"])  # samples differ from each other
    img = first[0]["img"]
    assert img.dtype == np.float32 and img.shape == (2, 3, 4, 4)
    assert img.min() >= 0.0 and img.max() < 1.0
    # integers that index no constant table: 0 or 1 (valid for masks, segment ids and any embedding)
    ids = np.concatenate([feed["ids"] for feed in first])
    assert ids.dtype == np.int64 and first[0]["ids"].shape == (1, 5) and set(np.unique(ids)) == {0, 1}
    masks = np.concatenate([feed["mask"] for feed in first])
    assert masks.dtype == np.bool_ and masks.any() and not masks.all()


def test_random_feeds_float16_and_validation():
    feeds = random_feeds(image_model((1, 3, 2, 2), TensorProto.FLOAT16), {})
    assert feeds[0]["x"].dtype == np.float16
    with pytest.raises(InvalidOptionError, match="at least 1"):
        random_feeds(image_model((1, 3, 2, 2)), {}, count=0)
    with pytest.raises(InvalidOptionError, match="--input-shape"):
        random_feeds(image_model(), {})


# --- load_feeds --------------------------------------------------------------------------------------------------

def test_load_feeds_single_npz_is_one_batch(tmp_path):
    model = image_model()
    x = np.random.default_rng(0).random((4, 3, 8, 6)).astype(np.float32)
    np.savez(tmp_path / "batch.npz", x=x)
    feeds = load_feeds(tmp_path / "batch.npz", model)
    assert len(feeds) == 1
    np.testing.assert_array_equal(feeds[0]["x"], x)


def test_load_feeds_directory_sorted_with_varying_widths(tmp_path):
    model = image_model()
    widths = {"b.npz": 320, "a.npz": 160, "c.npz": 96}
    for name, width in widths.items():
        np.savez(tmp_path / name, x=np.full((1, 3, 48, width), width, dtype=np.float32))
    (tmp_path / "notes.txt").write_text("ignored")
    feeds = load_feeds(str(tmp_path), model)
    assert [f["x"].shape[-1] for f in feeds] == [160, 320, 96]  # file-name order, not width order
    assert all(f["x"].dtype == np.float32 for f in feeds)


def test_load_feeds_casts_float64_to_model_float(tmp_path):
    np.savez(tmp_path / "s.npz", x=np.full((1, 3, 2, 2), 0.25, dtype=np.float64))
    feed = load_feeds(tmp_path / "s.npz", image_model())[0]
    assert feed["x"].dtype == np.float32 and float(feed["x"][0, 0, 0, 0]) == 0.25


def test_load_feeds_casts_integers_only_when_values_fit(tmp_path):
    model = image_model(("N", 5), TensorProto.INT32)
    np.savez(tmp_path / "ok.npz", x=np.arange(5, dtype=np.int64)[None])
    assert load_feeds(tmp_path / "ok.npz", model)[0]["x"].dtype == np.int32
    np.savez(tmp_path / "big.npz", x=np.full((1, 5), 2**40, dtype=np.int64))
    with pytest.raises(InputDataError, match=r"big\.npz.*do not fit"):
        load_feeds(tmp_path / "big.npz", model)


def test_load_feeds_rejects_int_for_float(tmp_path):
    np.savez(tmp_path / "s.npz", x=np.zeros((1, 3, 2, 2), dtype=np.int64))
    with pytest.raises(InputDataError, match=r"s\.npz: input 'x' holds int64 but the model expects float32"):
        load_feeds(tmp_path / "s.npz", image_model())


def test_load_feeds_rejects_missing_and_extra_keys(tmp_path):
    model = two_input_model()
    np.savez(tmp_path / "miss.npz", img=np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(InputDataError, match=r"miss\.npz lacks input\(s\) 'ids', 'mask'; .*img, ids, mask"):
        load_feeds(tmp_path / "miss.npz", model)
    np.savez(
        tmp_path / "extra.npz",
        img=np.zeros((1, 3, 4, 4), np.float32), ids=np.zeros((1, 5), np.int64), mask=np.zeros((1, 5), bool),
        label=np.zeros(1),
    )
    with pytest.raises(InputDataError, match=r"extra\.npz has key\(s\) 'label'.*img, ids, mask"):
        load_feeds(tmp_path / "extra.npz", model)


def test_load_feeds_rejects_rank_and_static_dim_mismatch(tmp_path):
    np.savez(tmp_path / "rank.npz", x=np.zeros((3, 8, 8), np.float32))
    with pytest.raises(InputDataError, match=r"rank\.npz.*rank 3.*rank 4 \(\?x3x\?x\?\)"):
        load_feeds(tmp_path / "rank.npz", image_model())
    np.savez(tmp_path / "chan.npz", x=np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(InputDataError, match=r"chan\.npz.*fixes dimension 1 to 3"):
        load_feeds(tmp_path / "chan.npz", image_model())


def test_load_feeds_rejects_empty_directory_and_missing_path(tmp_path):
    with pytest.raises(InputDataError, match=r"holds no \.npz files.*\(x\)"):
        load_feeds(tmp_path, image_model())
    with pytest.raises(InputDataError, match="does not exist"):
        load_feeds(tmp_path / "nope.npz", image_model())
    (tmp_path / "x.npy").write_bytes(b"")
    with pytest.raises(InputDataError, match=r"not an \.npz file"):
        load_feeds(tmp_path / "x.npy", image_model())


def test_load_feeds_rejects_unreadable_files_naming_them(tmp_path):
    (tmp_path / "0_good.npz").write_bytes(b"")
    np.savez(tmp_path / "0_good.npz", x=np.zeros((1, 3, 2, 2), np.float32))
    (tmp_path / "1_broken.npz").write_bytes(b"this is not a zip archive")
    with pytest.raises(InputDataError, match=r"Cannot read .*1_broken\.npz") as info:
        load_feeds(tmp_path, image_model())
    assert "\n" not in str(info.value)
    single = tmp_path / "single"
    single.mkdir()
    np.save(single / "arr.npy", np.zeros(3))
    (single / "arr.npy").rename(single / "arr.npz")
    with pytest.raises(InputDataError, match=r"arr\.npz.*single array"):
        load_feeds(single, image_model())
    objects = tmp_path / "objects"
    objects.mkdir()
    np.savez(objects / "o.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputDataError, match=r"Cannot read .*o\.npz"):
        load_feeds(objects, image_model())
