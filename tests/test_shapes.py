"""tensor_shapes: ONNX inference first, an onnxruntime run for what inference cannot resolve."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.graph import runtime

from onnx_lowrank.graph import shapes
from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.graph.inputs import resolve_shapes
from onnx_lowrank.graph.shapes import tensor_shapes


def conv_model(width: int = 8) -> onnx.ModelProto:
    """x [N,3,H,W] -> Conv 3x3 stride 2 pad 1 (width channels) -> Relu -> Conv 1x1 -> pool -> Flatten -> Gemm."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((width, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, width, 1, 1)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2"], ["c2"], kernel_shape=[1, 1]),
            helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Gemm", ["f", "wg"], ["y"], transB=1),
        ],
        "convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [w1, w2, numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "wg")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def computed_reshape_model() -> onnx.ModelProto:
    """The Reshape target is computed in float (Shape -> Cast -> Mul -> Cast), which ONNX data propagation does not
    follow, so the Reshape output and the MatMul after it are unknown to inference: x [N, 8] -> [2N, 4] @ w [4, 3]."""
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["sf", "scale"], ["tf"]),
            helper.make_node("Cast", ["tf"], ["t"], to=TensorProto.INT64),
            helper.make_node("Reshape", ["x", "t"], ["r"]),
            helper.make_node("MatMul", ["r", "w"], ["m"]),
            helper.make_node("Relu", ["m"], ["y"]),
        ],
        "computed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
        [
            helper.make_tensor("scale", TensorProto.FLOAT, [2], [2.0, 0.5]),
            numpy_helper.from_array(np.ones((4, 3), np.float32), "w"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_conv_shapes_come_from_inference_at_the_given_size(monkeypatch):
    model = conv_model()

    def no_fallback(*args, **kwargs):
        raise AssertionError("onnxruntime fallback used although inference knows every shape")

    monkeypatch.setattr(shapes, "_measured", no_fallback)
    result = tensor_shapes(model, {"x": (1, 3, 33, 20)}, ["c1", "x", "w1", "c2", "f", "y"])
    assert result == {
        "c1": (1, 8, 17, 10),
        "x": (1, 3, 33, 20),
        "w1": (8, 3, 3, 3),
        "c2": (1, 4, 17, 10),
        "f": (1, 4),
        "y": (1, 5),
    }
    assert list(result) == ["c1", "x", "w1", "c2", "f", "y"]  # order asked
    assert tensor_shapes(model, {"x": (2, 3, 8, 8)}, ["c1"]) == {"c1": (2, 8, 4, 4)}


def test_stale_value_info_does_not_override_pinned_inputs():
    model = conv_model()
    model.graph.value_info.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, [1, 8, 320, 320]))
    assert tensor_shapes(model, {"x": (1, 3, 8, 8)}, ["c1", "y"]) == {"c1": (1, 8, 4, 4), "y": (1, 5)}


def test_computed_reshape_falls_back_to_onnxruntime():
    model = computed_reshape_model()
    resolved = resolve_shapes(model, {"x": (3, 8)})
    inferred, _ = shapes._inferred(model, resolved)
    assert "r" not in inferred and "m" not in inferred  # the case this test is about: inference gives up
    before = model.SerializeToString()
    result = tensor_shapes(model, {"x": (3, 8)}, ["r", "m", "y", "t", "w", "x"])
    assert result == {"r": (6, 4), "m": (6, 3), "y": (6, 3), "t": (2,), "w": (4, 3), "x": (3, 8)}
    assert model.SerializeToString() == before  # never mutates the caller's model


def test_fallback_works_for_tensors_with_unknown_type():
    model = computed_reshape_model()
    # Drop what inference could tell ORT about the element types: ORT must infer them from the name alone.
    assert shapes._measured(model, {"x": (1, 8)}, ["r", "m"], {}) == {"r": (2, 4), "m": (2, 3)}


def test_default_batch_and_missing_dims():
    model = conv_model()
    with pytest.raises(InvalidOptionError, match="--input-shape x:1x3xHxW"):
        tensor_shapes(model, {}, ["c1"])
    assert tensor_shapes(computed_reshape_model(), {}, ["m"]) == {"m": (2, 3)}  # dynamic batch -> 1


def test_unknown_tensor_name_is_an_error():
    with pytest.raises(InvalidOptionError, match="'nope' are not in the model"):
        tensor_shapes(conv_model(), {"x": (1, 3, 8, 8)}, ["c1", "nope"])


def test_large_model_path_uses_external_data(monkeypatch):
    """Large models go to onnxruntime through files, and shape inference gets them without their weights; force
    that path on a tiny model."""
    monkeypatch.setattr(runtime, "IN_MEMORY_LIMIT", 0)
    model = computed_reshape_model()
    before = model.SerializeToString()
    assert tensor_shapes(model, {"x": (1, 8)}, ["m", "s"]) == {"m": (2, 3), "s": (2,)}
    assert model.SerializeToString() == before
    wide = conv_model(width=64)  # w1 holds 6.9 kB, so it really goes to the external data file
    before = wide.SerializeToString()
    inferred, _ = shapes._inferred(wide, {"x": (1, 3, 8, 8)})
    assert inferred["c2"] == (1, 4, 4, 4) and inferred["y"] == (1, 5)
    assert tensor_shapes(wide, {"x": (1, 3, 8, 8)}, ["c1", "y"]) == {"c1": (1, 64, 4, 4), "y": (1, 5)}
    assert wide.SerializeToString() == before
