"""Loading keeps external weights, saving is atomic, and broken files are one clear error."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from helpers.files import save_external
from onnx import TensorProto, helper

from onnx_lowrank.graph import load
from onnx_lowrank.cli.main import main
from onnx_lowrank.errors import InvalidModelError, InvalidOptionError


def _gemm_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(rng.standard_normal((64, 48)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1, name="fc")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 48])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        initializer=[weight],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_external_data_next_to_the_model_is_loaded(tmp_path):
    source = tmp_path / "model.onnx"
    save_external(_gemm_model(), source)
    assert (tmp_path / "model.onnx.data").exists()
    output = tmp_path / "out.onnx"
    assert main(["compress", str(source), str(output), "--budget", "0.8", "--quiet", "--allow-slower"]) == 0
    compressed = onnx.load(str(output))
    assert [n.op_type for n in compressed.graph.node] == ["MatMul", "Gemm"]


def test_missing_external_data_is_a_clear_error(tmp_path, capsys):
    source = tmp_path / "model.onnx"
    save_external(_gemm_model(), source)
    (tmp_path / "model.onnx.data").unlink()
    output = tmp_path / "out.onnx"
    assert main(["compress", str(source), str(output), "--budget", "0.8", "--quiet"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("onnx-lowrank: error:") and "\n" not in error
    assert not output.exists()


def test_large_models_are_saved_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(load.runtime, "PROTOBUF_LIMIT", 0)  # the one limit, shared with runtime
    target = load.save_model(_gemm_model(), tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    reloaded = load.load_model(target)
    assert np.array_equal(load.runtime.tensor_array(reloaded.graph.initializer[0]),
                          onnx.numpy_helper.to_array(_gemm_model().graph.initializer[0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]


def test_save_leaves_no_temporary_files(tmp_path):
    load.save_model(_gemm_model(), tmp_path / "m.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_load_rejects_a_model_without_graph(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(onnx.ModelProto(ir_version=8).SerializeToString())
    with pytest.raises(InvalidModelError, match="not an ONNX model"):
        load.load_model(path)


def test_output_may_not_be_the_input(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save_model(_gemm_model(), str(path))
    with pytest.raises(InvalidOptionError, match="is the input model"):
        load.check_output_path(path, (path,))
