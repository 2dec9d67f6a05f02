"""What is not ours to change survives a compression unchanged: metadata_props, doc strings (model, graph and
node), producer fields, model domain and version, opset imports (custom ones too), local functions, and the
value_info of tensors the rewrite did not touch. Checked on a generated model that has all of them and on the real
PP-OCRv4 recogniser, whose character dictionary lives in metadata_props.
"""

from __future__ import annotations


import numpy as np
import onnx
import pytest
from helpers.builders import build_cnn
from helpers.files import save
from onnx import helper

from benchmarks.workloads.base import model_path
from onnx_lowrank.cli.main import main

REWRITTEN_OPS = ("Conv", "Gemm", "MatMul", "BatchNormalization")


def _decorated() -> onnx.ModelProto:
    """build_cnn with every field a user may rely on filled in, a 'com.example' node defined as a local function
    (onnxruntime runs those, so the model is verified as usual) and value_info for every intermediate tensor."""
    model = build_cnn()
    graph = model.graph
    index = next(i for i, n in enumerate(graph.node) if n.output[0] == "r3")
    graph.node.insert(index + 1, helper.make_node("Double", ["r3"], ["r3d"], name="double", domain="com.example"))
    for node in graph.node:
        if node.op_type == "GlobalAveragePool":
            node.input[0] = "r3d"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    body = [helper.make_node("Add", ["X", "X"], ["Y"])]
    model.functions.append(helper.make_function("com.example", "Double", ["X"], ["Y"], body,
                                                [helper.make_opsetid("", 17)], doc_string="x + x"))
    helper.set_model_props(model, {"character": "a\nb\nc\n\u00e9\u4e2d", "author": "tests", "empty": ""})
    model.doc_string = "a decorated model"
    model.producer_name, model.producer_version = "exporter", "9.9.9"
    model.domain, model.model_version = "com.example.models", 42
    graph.doc_string = "the graph's own doc"
    for node in graph.node:
        node.doc_string = f"doc of {node.name}"
    inferred = onnx.shape_inference.infer_shapes(model)
    graph.value_info.extend(inferred.graph.value_info)
    onnx.checker.check_model(model, full_check=True)
    return model


def _assert_kept(written: onnx.ModelProto, model: onnx.ModelProto) -> None:
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        assert getattr(written, field) == getattr(model, field), field
    assert list(written.metadata_props) == list(model.metadata_props)
    assert list(written.opset_import) == list(model.opset_import)
    assert list(written.functions) == list(model.functions)
    assert written.graph.name == model.graph.name and written.graph.doc_string == model.graph.doc_string
    assert list(written.graph.input) == list(model.graph.input)
    assert list(written.graph.output) == list(model.graph.output)
    touched = {out for node in model.graph.node if node.op_type in REWRITTEN_OPS for out in node.output}
    kept_nodes = {n.output[0]: n for n in written.graph.node}
    for node in model.graph.node:  # every node the rewrite does not replace is byte-identical, doc string included
        if node.op_type == "Constant" and node.output[0] not in kept_nodes:
            continue  # a replaced weight stored as a Constant node (PaddlePaddle's way) goes with its layer
        if node.op_type not in REWRITTEN_OPS:
            assert kept_nodes[node.output[0]] == node
    written_info = {v.name: v for v in written.graph.value_info}
    for info in model.graph.value_info:
        if info.name not in touched:
            assert written_info.get(info.name) == info, info.name


def test_compression_keeps_everything_it_does_not_rewrite(tmp_path):
    model = _decorated()
    source = save(model, tmp_path / "decorated.onnx")
    output = tmp_path / "out.onnx"
    code = main(["compress", str(source), str(output), "--budget", "0.6", "--allow-slower", "--quiet"])
    assert code == 0
    written = onnx.load(output)
    onnx.checker.check_model(written, full_check=True)
    assert len(written.graph.node) > len(model.graph.node)  # something was rewritten
    _assert_kept(written, model)


@pytest.mark.slow
def test_real_recogniser_keeps_its_character_dictionary(tmp_path):
    source = model_path("ppocrv4-rec")
    model = onnx.load(source)
    (dictionary,) = [p.value for p in model.metadata_props if p.key == "character"]
    assert len(dictionary.splitlines()) > 1000  # the recogniser's characters, one per line
    output = tmp_path / "rec.onnx"
    code = main(["compress", str(source), str(output), "--budget", "0.7", "--allow-slower",
                 "--input-shape", "x:1x3x48x320", "--quiet"])
    assert code == 0
    written = onnx.load(output)
    assert sum(n.op_type == "Conv" for n in written.graph.node) > sum(n.op_type == "Conv" for n in model.graph.node)
    _assert_kept(written, model)
    assert np.array_equal(np.frombuffer(written.metadata_props[0].value.encode(), np.uint8),
                          np.frombuffer(model.metadata_props[0].value.encode(), np.uint8))
