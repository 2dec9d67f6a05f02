"""verify() against numpy-computed errors, top-1 detection, and the onnxruntime helpers it stands on."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.graph import runtime
from onnx_lowrank.errors import InputDataError, InvalidModelError
from onnx_lowrank.stages.verify import OutputComparison, Verification, class_score_outputs, is_score_output, verify

RNG = np.random.default_rng(0)
W = RNG.standard_normal((6, 5)).astype(np.float32)
B = RNG.standard_normal(5).astype(np.float32)


def classifier(weight: np.ndarray = W, bias: np.ndarray = B) -> onnx.ModelProto:
    """x [N, 6] -> logits = x @ W + b [N, 5]; probs = Softmax(Reshape(logits, [N, 1, 5])) [N, 1, 5]."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            helper.make_node("Reshape", ["logits", "shape"], ["l3"]),
            helper.make_node("Softmax", ["l3"], ["probs"], axis=-1),
        ],
        "clf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 1, 5]),
        ],
        [
            numpy_helper.from_array(weight.astype(np.float32), "w"),
            numpy_helper.from_array(bias.astype(np.float32), "b"),
            numpy_helper.from_array(np.array([-1, 1, 5], np.int64), "shape"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def feeds(count: int = 3, rows: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((rows, 6)).astype(np.float32)} for _ in range(count)]


def test_identical_models_have_zero_error():
    result = verify(classifier(), classifier(), feeds())
    assert result.samples == 3
    assert [o.name for o in result.outputs] == ["logits", "probs"]  # model output order
    for out in result.outputs:
        assert out.relative_l2 == 0.0 and out.max_abs == 0.0
        assert out.cosine == pytest.approx(1.0, abs=1e-12)
        assert out.top1_agreement == 1.0  # (N, 5) logits and a per-row softmax are both score vectors
    assert result.worst_relative_l2 == 0.0 and result.passed(0.0)


def test_perturbed_model_errors_match_numpy():
    delta = np.zeros_like(W)
    delta[0, :] = 0.3
    delta[2, 1] = -0.7
    samples = feeds(count=4, rows=3)
    result = verify(classifier(), classifier(W + delta), samples)

    x = np.concatenate([s["x"] for s in samples]).astype(np.float64)
    a = x @ W.astype(np.float64) + B
    b = x @ (W + delta).astype(np.float64) + B
    logits = result.outputs[0]
    assert logits.relative_l2 == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(a), rel=1e-4)
    assert logits.max_abs == pytest.approx(np.abs(a - b).max(), rel=1e-4)
    cosine = float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert logits.cosine == pytest.approx(cosine, abs=1e-6)
    assert logits.top1_agreement == pytest.approx(np.mean(a.argmax(1) == b.argmax(1)))
    assert 0 < logits.relative_l2 and logits.cosine < 1

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    pa, pb = softmax(a), softmax(b)
    probs = result.outputs[1]
    assert probs.relative_l2 == pytest.approx(np.linalg.norm(pa - pb) / np.linalg.norm(pa), rel=1e-4)
    assert probs.top1_agreement == pytest.approx(np.mean(pa.argmax(1) == pb.argmax(1)))
    assert result.worst_relative_l2 == max(logits.relative_l2, probs.relative_l2)
    assert result.passed(result.worst_relative_l2) and not result.passed(result.worst_relative_l2 * 0.99)


def test_top1_agreement_counts_flipped_rows():
    """Boosting class 0 by a lot makes every row pick it: agreement = share of rows that already did."""
    bias = B.copy()
    bias[0] += 1000.0
    samples = feeds(count=2, rows=5)
    result = verify(classifier(), classifier(bias=bias), samples)
    x = np.concatenate([s["x"] for s in samples])
    expected = np.mean((x @ W + B).argmax(1) == 0)
    assert result.outputs[0].top1_agreement == pytest.approx(expected)
    assert 0.0 <= expected < 1.0


def test_varying_sample_shapes_are_pooled():
    samples = [{"x": np.ones((1, 6), np.float32)}, {"x": np.full((3, 6), 2.0, np.float32)}]
    bias = B + np.float32(1.0)
    result = verify(classifier(), classifier(bias=bias), samples)
    a = np.concatenate([np.ones((1, 6)), np.full((3, 6), 2.0)]) @ W + B
    assert result.outputs[0].relative_l2 == pytest.approx(np.linalg.norm(np.ones_like(a)) / np.linalg.norm(a), rel=1e-4)
    assert result.outputs[0].max_abs == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize(
    "array, class_scores, expected",
    [
        (np.array([[0.1, 2.0, -3.0]]), True, True),  # (N, C) logits the graph marks as class scores
        (np.array([[0.1, 2.0, -3.0]]), False, False),  # (N, 3) and nothing says scores: a regression head
        (np.array([[1.0]]), True, False),  # one class: nothing to agree on
        (np.array([1.0, 2.0, 3.0]), True, False),  # rank 1
        (np.full((1, 40, 10), 0.1), False, True),  # per-step probabilities (OCR)
        (np.full((2, 3, 4, 5), 0.2), False, True),  # rank 4, distribution on the last axis
        (np.full((1, 84, 2100), 0.5), False, False),  # detector map: not a distribution
        (np.array([[[1.5, -0.5]]]), False, False),  # sums to 1 but negative
        (np.array([[[0.5, 0.5]], [[0.9, 0.3]]]), False, False),  # one row off
        (np.zeros((1, 0, 5)), True, False),  # empty
        (np.array([[[math.nan, 1.0]]]), False, False),
    ],
)
def test_is_score_output(array, class_scores, expected):
    assert is_score_output(array, class_scores) is expected


def _head(nodes, outputs, width=3):
    """x [N, 4] through `nodes` to `outputs`, each [N, width]."""
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", width]) for name in outputs],
        [numpy_helper.from_array(np.ones((4, width), np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_class_score_outputs_by_producer_and_by_name():
    model = _head(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Softmax", ["y"], ["s"]),
         helper.make_node("Identity", ["s"], ["probabilities_out"]), helper.make_node("LogSoftmax", ["y"], ["t"]),
         helper.make_node("Cast", ["t"], ["out2"], to=TensorProto.FLOAT), helper.make_node("Relu", ["y"], ["box"]),
         helper.make_node("Relu", ["y"], ["Class_Logits"])],
        ["probabilities_out", "out2", "box", "Class_Logits", "y"],
    )
    assert class_score_outputs(model) == {"probabilities_out", "out2", "Class_Logits"}


def test_regression_scores_get_no_top1():
    """Finding 8 of issue 8: three regression scores showed 'top-1 agreement 0.0000'."""
    model = _head([helper.make_node("MatMul", ["x", "w"], ["y"])], ["y"])
    changed = _head([helper.make_node("MatMul", ["x", "w"], ["y"])], ["y"])
    changed.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.eye(4, 3, dtype=np.float32), "w"))
    feeds = [{"x": np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)}]
    result = verify(model, changed, feeds)
    assert result.outputs[0].relative_l2 > 0.1
    assert result.outputs[0].top1_agreement is None


def test_non_score_output_has_no_top1():
    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["y"])], "det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = verify(model, model, [{"x": np.zeros((1, 1, 4, 4), np.float32)}])
    assert result.outputs[0].top1_agreement is None and result.outputs[0].relative_l2 == 0.0


def test_zero_reference_output_and_json():
    zero = classifier(weight=np.zeros_like(W), bias=np.zeros_like(B))
    result = verify(zero, classifier(), feeds(count=1))
    logits = result.outputs[0]
    assert logits.relative_l2 == math.inf and logits.cosine == 0.0
    assert not result.passed(1e9)
    data = result.to_dict()
    json.dumps(data, allow_nan=False)  # JSON-safe
    assert data["samples"] == 1 and data["worst_relative_l2"] is None
    assert data["outputs"][0]["name"] == "logits" and data["outputs"][0]["relative_l2"] is None
    both_zero = verify(zero, zero, feeds(count=1)).outputs[0]
    assert both_zero.relative_l2 == 0.0 and both_zero.cosine == 1.0


def test_nan_output_never_passes():
    outputs = (OutputComparison("a", 0.01, 0.1, 0.99, None), OutputComparison("b", math.nan, math.nan, math.nan, 0.5))
    result = Verification(outputs, samples=2)
    assert math.isnan(result.worst_relative_l2) and not result.passed(10.0)
    json.dumps(result.to_dict(), allow_nan=False)
    assert Verification((), samples=1).passed(0.0)


def test_broken_rewrites_are_reported():
    with pytest.raises(InputDataError, match="No samples"):
        verify(classifier(), classifier(), [])
    renamed = classifier()
    renamed.graph.output[0].name = "xw"
    with pytest.raises(InvalidModelError, match="lacks output\\(s\\) 'logits'"):
        verify(classifier(), renamed, feeds(count=1))
    wider = classifier()
    wider.graph.node[2].input[1] = "shape5"
    wider.graph.initializer.append(numpy_helper.from_array(np.array([-1, 5, 1], np.int64), "shape5"))
    wider.graph.node[3].attribute[0].i = 1
    with pytest.raises(InvalidModelError, match="'probs' has shape"):
        verify(classifier(), wider, feeds(count=1))


# --- runtime ---------------------------------------------------------------------------------------------------

def test_session_and_run_return_outputs_in_order():
    sess = runtime.session(classifier(), threads=1)
    out = runtime.run(sess, feeds(count=1)[0])
    assert list(out) == ["logits", "probs"] and out["logits"].shape == (4, 5)


def test_session_error_is_one_line_invalid_model():
    broken = classifier()
    broken.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(InvalidModelError, match="onnxruntime cannot load the model") as info:
        runtime.session(broken)
    assert "\n" not in str(info.value)


def test_run_rejects_bad_feeds_as_input_data_error():
    sess = runtime.session(classifier())
    with pytest.raises(InputDataError, match="onnxruntime rejected the inputs"):
        runtime.run(sess, {"x": np.zeros((2, 7), np.float32)})
    with pytest.raises(InputDataError, match="Expected: 6") as info:
        runtime.run(sess, {"x": np.zeros((2, 7), np.float32)})
    assert "\n" not in str(info.value)  # ORT's multi-line detail joined onto one line
    with pytest.raises(InputDataError):
        runtime.run(sess, {"x": np.zeros((2, 6), np.float64)})
    with pytest.raises(InputDataError, match="missing"):
        runtime.run(sess, {"y": np.zeros((2, 6), np.float32)})


def test_large_model_session_goes_through_a_file(monkeypatch):
    monkeypatch.setattr(runtime, "IN_MEMORY_LIMIT", 0)
    big = classifier(weight=np.ones((6, 5), np.float32))
    big.graph.initializer.append(numpy_helper.from_array(np.zeros(4096, np.float32), "unused"))
    before = big.SerializeToString()
    out = runtime.run(runtime.session(big), {"x": np.ones((1, 6), np.float32)})
    np.testing.assert_allclose(out["logits"], 6.0 + B[None], rtol=1e-6)
    assert big.SerializeToString() == before  # external-data saving works on a copy
