"""Models with their weights inside the .onnx file are read without their weights (`inline_weights`), and what is
read is exactly what onnx reads: every array, every other field."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnx_lowrank.graph import runtime
from onnx_lowrank.graph.inline_weights import load_without_weights

DTYPES = [np.float32, np.float16, np.float64, np.int64, np.int8, np.bool_]


@st.composite
def models(draw):
    """A chain of Identity nodes over initializers of random dtypes and sizes (around the 1 KiB line), some stored
    as raw bytes and some in onnx's typed fields, with metadata, doc strings and a Constant node."""
    count = draw(st.integers(1, 6))
    tensors, nodes = [], []
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    for index in range(count):
        dtype = draw(st.sampled_from(DTYPES))
        size = draw(st.sampled_from([1, 200, 255, 256, 257, 300, 2000]))
        values = (rng.standard_normal(size) * 10).astype(dtype)
        if draw(st.booleans()):
            tensor = onnx.numpy_helper.from_array(values, f"w{index}")  # raw_data
        else:
            tensor = helper.make_tensor(f"w{index}", helper.np_dtype_to_tensor_dtype(values.dtype), [size],
                                        values.tolist())  # typed fields
        if draw(st.booleans()):
            tensor.doc_string = f"weight {index}"
        tensors.append(tensor)
        nodes.append(helper.make_node("Identity", [f"w{index}"], [f"y{index}"], name=f"n{index}"))
    constant = onnx.numpy_helper.from_array(rng.standard_normal(300).astype(np.float32), "c")
    nodes.append(helper.make_node("Constant", [], ["c"], value=constant))
    outputs = [helper.make_tensor_value_info(f"y{i}", tensors[i].data_type, None) for i in range(count)]
    outputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [300]))
    graph = helper.make_graph(nodes, "g", [], outputs, tensors, doc_string="a graph")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="test")
    helper.set_model_props(model, {"dictionary": "a b c", "k": draw(st.text(max_size=20))})
    return model


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=models())
def test_what_is_read_is_what_onnx_reads(tmp_path, model):
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    full = onnx.load(str(path))
    lazy = load_without_weights(path)
    assert lazy is not None
    assert [t.name for t in lazy.graph.initializer] == [t.name for t in full.graph.initializer]
    for header, whole in zip(lazy.graph.initializer, full.graph.initializer):
        value = runtime.tensor_array(header)
        expected = onnx.numpy_helper.to_array(whole)
        assert value.dtype == expected.dtype and value.shape == expected.shape
        np.testing.assert_array_equal(value, expected)
        large_raw = whole.HasField("raw_data") and len(whole.raw_data) >= 1024
        assert runtime.is_external(header) == large_raw
        if large_raw:
            assert runtime.external_location(header) == str(path.resolve())
            assert header.doc_string == whole.doc_string and list(header.dims) == list(whole.dims)
    # everything but the initializers is byte for byte what onnx read
    for proto in (lazy, full):
        proto.graph.ClearField("initializer")
    assert lazy.SerializeToString() == full.SerializeToString()


def test_a_weight_left_in_the_file_is_read_from_it_and_not_held(tmp_path):
    """The weight bytes stay in the .onnx file: rewritten there after loading, they are what is read."""
    weight = np.arange(4096, dtype=np.float32).reshape(64, 64)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              [onnx.numpy_helper.from_array(weight, "w")])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    lazy = load_without_weights(path)
    assert lazy.ByteSize() < 1024 < weight.nbytes
    offset = int(dict((e.key, e.value) for e in lazy.graph.initializer[0].external_data)["offset"])
    assert path.read_bytes()[offset:offset + weight.nbytes] == weight.tobytes()
    with open(path, "r+b") as stream:
        stream.seek(offset)
        stream.write(np.full(4096, 2.0, dtype=np.float32).tobytes())
    np.testing.assert_array_equal(runtime.tensor_array(lazy.graph.initializer[0]), np.full((64, 64), 2.0))


def test_a_model_with_weights_in_another_file_too_is_left_to_onnx(tmp_path):
    big = onnx.numpy_helper.from_array(np.ones(1000, dtype=np.float32), "a")
    other = onnx.numpy_helper.from_array(np.ones(1000, dtype=np.float32), "b")
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1000])], [big, other])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.external_data_helper.convert_model_to_external_data(model, location="m.onnx.data", size_threshold=0)
    model.graph.initializer[0].ClearField("external_data")  # 'a' inline again, 'b' external
    model.graph.initializer[0].data_location = TensorProto.DEFAULT
    model.graph.initializer[0].raw_data = np.ones(1000, dtype=np.float32).tobytes()
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=False)
    assert load_without_weights(tmp_path / "m.onnx") is None


@pytest.mark.parametrize("cut", [1, 10, 100, 4000])
def test_a_file_cut_short_raises(tmp_path, cut):
    weight = onnx.numpy_helper.from_array(np.ones(2000, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2000])], [weight])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    path = tmp_path / "m.onnx"
    path.write_bytes(data[:-cut])
    with pytest.raises(Exception):
        load_without_weights(path)
