"""Dynamic shapes: sizes are demanded only when something needs them, assumed batch sizes are said, and the dynamic
dimensions of the model's inputs and outputs survive in the written model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers.builders import build_cnn, make_model, tensor
from helpers.files import save
from onnx import helper

from onnx_lowrank.cli.main import main


def _dims(values) -> list[list[object]]:
    return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values]


def _layers_only_in_an_if():
    """Like Silero VAD: the only Conv lives in a branch of an If; the input is (batch, samples), both dynamic."""
    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", onnx.TensorProto.FLOAT, [4, 1, 3], rng.standard_normal(12).tolist())
    then = helper.make_graph(
        [helper.make_node("Unsqueeze", ["x", "axes"], ["x3"]),
         helper.make_node("Conv", ["x3", "w"], ["c"], name="inner_conv", pads=[1, 1]),
         helper.make_node("ReduceMean", ["c"], ["y_then"], keepdims=0)],
        "then", [], [tensor("y_then", [])],
        [weight, helper.make_tensor("axes", onnx.TensorProto.INT64, [1], [1])])
    other = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["y_else"], keepdims=0)], "else", [],
                              [tensor("y_else", [])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["flag"]),
             helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other)]
    return make_model(nodes, [tensor("x", ["batch", "samples"])], [tensor("y", [])],
                      {"zero": np.zeros((), np.float32)})


def test_nothing_to_compress_needs_no_sizes(tmp_path, capsys):
    path = save(_layers_only_in_an_if(), tmp_path / "vad.onnx")
    for metric in ("params", "flops"):
        out = tmp_path / f"{metric}.onnx"
        assert main(["compress", str(path), str(out), "--budget", "0.7", "--metric", metric]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "Nothing to compress in this model: all 1 of its layers with a weight were skipped" in text
        assert "1 Conv: in an If body" in text and out.exists()
    assert main(["sweep", str(path), "--budgets", "0.9,0.5"]) == 0
    assert "Nothing to compress" in capsys.readouterr().out


def test_a_params_budget_without_verification_needs_no_sizes(tmp_path, capsys):
    path = save(build_cnn(input_shape=("batch", 3, "height", "width")), tmp_path / "m.onnx")
    out = tmp_path / "c.onnx"
    assert main(["compress", str(path), str(out), "--budget", "0.6", "--allow-slower", "--no-verify"]) == 0
    assert out.exists()
    assert main(["compress", str(path), str(tmp_path / "d.onnx"), "--budget", "0.6", "--allow-slower"]) == 2
    err = capsys.readouterr().err  # verification on random inputs does need them: named, ready to paste
    assert "--input-shape x:1x3xHxW" in err and not (tmp_path / "d.onnx").exists()


def test_an_assumed_batch_size_is_said_and_dynamic_dims_survive(tmp_path, capsys):
    model = build_cnn(input_shape=("batch", 3, 16, 16))
    path = save(model, tmp_path / "m.onnx")
    out, report = tmp_path / "c.onnx", tmp_path / "r.json"
    assert main(["compress", str(path), str(out), "--budget", "0.6", "--allow-slower", "--report", str(report)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Assumed batch size 1 for the dynamic first dimension of 'x'" in text
    assert "--input-shapes x:Nx3x16x16" in text
    assert any(note.startswith("Assumed batch size 1") for note in json.loads(report.read_text())["summary"]["notes"])
    written = onnx.load(str(out))
    assert _dims(written.graph.input) == _dims(model.graph.input) == [["batch", 3, 16, 16]]
    assert _dims(written.graph.output) == _dims(model.graph.output) == [["batch", 10]]

    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.zeros((5, 3, 16, 16), np.float32)})[0].shape == (5, 10)  # any batch still runs


@pytest.mark.parametrize("given", [["--input-shape", "x:4x3x16x16"], ["--inputs", "SAMPLES"]])
def test_nothing_is_assumed_when_sizes_are_given(tmp_path, capsys, given):
    path = save(build_cnn(input_shape=("batch", 3, 16, 16)), tmp_path / "m.onnx")
    if given[0] == "--inputs":
        np.savez(tmp_path / "s.npz", x=np.random.default_rng(0).random((2, 3, 16, 16)).astype(np.float32))
        given = ["--inputs", str(tmp_path / "s.npz"), "--weight-only"]
    assert main(["compress", str(path), str(tmp_path / "c.onnx"), "--budget", "0.6", "--allow-slower", *given]) == 0
    assert "Assumed batch size" not in capsys.readouterr().out
