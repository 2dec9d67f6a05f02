"""Odd but valid graphs: float16 and bfloat16 weights, quantized layers, ConvTranspose, 1-D and 3-D convolutions,
opsets 7 to the newest, empty and duplicated node names, local functions and custom-domain nodes.

Each is either compressed into a model that passes the checker and runs in onnxruntime, or its layers are listed as
skipped with the reason; nothing ends in a traceback.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers.builders import build_cnn, build_matmul, make_model, tensor, weights
from helpers.files import save
from helpers.rewrites import full_rank
from helpers.running import run
from onnx import TensorProto, helper, numpy_helper
from onnx_lowrank.passes import factorize_layers

import onnx_lowrank
from onnx_lowrank.cli.main import main
from onnx_lowrank.stages.discover import discover
from onnx_lowrank.math.svd import factorize

NEWEST_OPSET = onnx.defs.onnx_opset_version()


# ---------------------------------------------------------------------------------------------------------- helpers


def _in_dtype(model: onnx.ModelProto, elem: int, full_check: bool = True) -> onnx.ModelProto:
    """A copy of a float32 model with every initializer, input and output in `elem` (float16 or bfloat16)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for index, tensor_proto in enumerate(result.graph.initializer):
        values = numpy_helper.to_array(tensor_proto)
        if values.dtype == np.float32:
            cast = helper.make_tensor(tensor_proto.name, elem, values.shape, values.ravel().tolist())
            result.graph.initializer[index].CopyFrom(cast)
    for value in list(result.graph.input) + list(result.graph.output):
        value.type.tensor_type.elem_type = elem
    onnx.checker.check_model(result, full_check=full_check)
    return result


def _new_initializers(new: onnx.ModelProto, old: onnx.ModelProto) -> list[onnx.TensorProto]:
    before = {t.name for t in old.graph.initializer}
    return [t for t in new.graph.initializer if t.name not in before]


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["compress", *map(str, args), "--quiet"])
    return code, capsys.readouterr().err


def _one_line_or_nothing(err: str) -> None:
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 1, err


# ----------------------------------------------------------------------------------------------------------- float16


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("build, shape", [(build_cnn, (1, 3, 16, 16)), (build_matmul, (2, 6, 24))])
def test_float16_layers_rewritten_at_full_rank_keep_their_outputs(build, shape, k):
    model = _in_dtype(build(), TensorProto.FLOAT16)
    assert {layer.dtype for layer in discover(model).layers} == {np.dtype(np.float16)}
    # shift: the Add after a MatMul, the folded biases, all in float16
    new = full_rank(model, k=k, shift=True, k_where_it_divides=True)
    assert {t.data_type for t in _new_initializers(new, model) if t.data_type != TensorProto.INT64} == {
        TensorProto.FLOAT16}
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float16)
    (expected,), (actual,) = run(model, {"x": x}), run(new, {"x": x})
    assert actual.dtype == np.float16
    scale = np.abs(expected.astype(np.float32)).max()
    assert np.abs(actual.astype(np.float32) - expected.astype(np.float32)).max() <= 0.02 * scale


@pytest.mark.parametrize("build, shape", [(build_cnn, (1, 3, 16, 16)), (build_matmul, (2, 6, 24))])
def test_float16_model_is_compressed_calibrated_and_verified_like_its_float32_twin(build, shape):
    rng = np.random.default_rng(1)
    samples = [rng.standard_normal(shape) for _ in range(4)]
    results = {}
    for elem, dtype in ((TensorProto.FLOAT, np.float32), (TensorProto.FLOAT16, np.float16)):
        model = build() if elem == TensorProto.FLOAT else _in_dtype(build(), elem)
        feeds = [{"x": sample.astype(dtype)} for sample in samples]
        compressed, report = onnx_lowrank.compress(model, 0.7, calibration=feeds, inputs=feeds, allow_slower=True,
                                                   latency_cache=False)
        onnx.checker.check_model(compressed, full_check=True)
        assert report.layers and report.verification is not None
        if elem == TensorProto.FLOAT16:
            written = {t.data_type for t in _new_initializers(compressed, model) if t.data_type != TensorProto.INT64}
            assert written == {TensorProto.FLOAT16}
        results[elem] = report.verification.worst_relative_l2
    # the float16 model lost about what its float32 twin lost: statistics, factors and verification all saw
    # float16 data as numbers, not as garbage
    assert np.isfinite(results[TensorProto.FLOAT16])
    assert abs(results[TensorProto.FLOAT16] - results[TensorProto.FLOAT]) < 0.05


def test_float16_model_through_the_cli(tmp_path, capsys):
    source = save(_in_dtype(build_cnn(), TensorProto.FLOAT16), tmp_path / "half.onnx")
    code, err = _cli(capsys, source, tmp_path / "out.onnx", "--budget", "0.7", "--allow-slower")
    assert code == 0, err
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"), full_check=True)


# ---------------------------------------------------------------------------------------------------------- bfloat16


def test_bfloat16_layers_are_skipped_with_the_reason_and_nothing_crashes(tmp_path, capsys):
    """bfloat16 MatMul is valid ONNX from opset 13, but onnxruntime's CPU provider has no kernel for it."""
    model = _in_dtype(build_matmul(), TensorProto.BFLOAT16, full_check=False)
    discovery = discover(model)
    assert discovery.layers == ()
    assert {(s.name, s.reason) for s in discovery.skipped} == {
        (name, "bfloat16 weights: onnxruntime's CPU provider cannot run them, so the result could not be verified")
        for name in ("mm1", "mm2")}
    source = save(model, tmp_path / "bf16.onnx")
    # verification on random inputs: onnxruntime could not run even the original, so it is refused in one line
    code, err = _cli(capsys, source, tmp_path / "verified.onnx", "--budget", "0.7", "--allow-slower")
    _one_line_or_nothing(err)
    assert code == 0 or (code == 2 and err.startswith("onnx-lowrank: error: "))
    assert code == 2 or onnx.load(tmp_path / "verified.onnx").graph == model.graph
    code, err = _cli(capsys, source, tmp_path / "out.onnx", "--budget", "0.7", "--no-verify")
    assert code == 0, err
    assert onnx.load(tmp_path / "out.onnx").graph == model.graph  # nothing to compress: the model is unchanged


# ------------------------------------------------------------------------------------------ quantized, ConvTranspose


def _quantized_model() -> onnx.ModelProto:
    """One of each quantized layer, a QDQ Conv (weight from DequantizeLinear) and a ConvTranspose, side by side."""
    rng = np.random.default_rng(0)

    def u8(*shape: int) -> np.ndarray:
        return rng.integers(0, 255, shape).astype(np.uint8)

    init = {
        "s": np.array(0.1, np.float32), "zp": np.array(128, np.uint8),
        "qconv.w": u8(4, 3, 3, 3), "qmm.w": u8(12, 4),
        "iconv.w": u8(4, 3, 3, 3), "imm.w": u8(12, 4),
        "dq.w": u8(4, 3, 3, 3), "tconv.w": weights(rng, 3, 4, 2, 2),
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="quant"),
        helper.make_node("QLinearConv", ["xq", "s", "zp", "qconv.w", "s", "zp", "s", "zp"], ["a"], name="qconv",
                         kernel_shape=[3, 3]),
        helper.make_node("Flatten", ["xq"], ["xqf"], name="flatten", axis=1),
        helper.make_node("Slice", ["xqf", "starts", "ends", "axes"], ["xqs"], name="slice"),
        helper.make_node("QLinearMatMul", ["xqs", "s", "zp", "qmm.w", "s", "zp", "s", "zp"], ["b"], name="qmm"),
        helper.make_node("ConvInteger", ["xq", "iconv.w", "zp", "zp"], ["c"], name="iconv", kernel_shape=[3, 3]),
        helper.make_node("MatMulInteger", ["xqs", "imm.w", "zp", "zp"], ["d"], name="imm"),
        helper.make_node("DequantizeLinear", ["dq.w", "s", "zp"], ["dq.wf"], name="dequant"),
        helper.make_node("Conv", ["x", "dq.wf"], ["e"], name="qdq_conv", kernel_shape=[3, 3]),
        helper.make_node("ConvTranspose", ["x", "tconv.w"], ["f"], name="tconv", kernel_shape=[2, 2]),
    ]
    init.update({"starts": np.array([0], np.int64), "ends": np.array([12], np.int64), "axes": np.array([1], np.int64)})
    outputs = [tensor("a", [1, 4, 4, 4], TensorProto.UINT8), tensor("b", [1, 4], TensorProto.UINT8),
               tensor("c", [1, 4, 4, 4], TensorProto.INT32), tensor("d", [1, 4], TensorProto.INT32),
               tensor("e", [1, 4, 4, 4]), tensor("f", [1, 4, 7, 7])]
    return make_model(nodes, [tensor("x", [1, 3, 6, 6])], outputs, init)


def test_quantized_layers_and_conv_transpose_are_listed_as_skipped_one_by_one(tmp_path, capsys):
    model = _quantized_model()
    run(model, {"x": np.zeros((1, 3, 6, 6), np.float32)})  # a valid model onnxruntime runs
    discovery = discover(model)
    assert discovery.layers == ()
    reasons = {s.name: (s.op, s.reason) for s in discovery.skipped}
    assert set(reasons) == {"qconv", "qmm", "iconv", "imm", "qdq_conv", "tconv"}
    for name, op in (("qconv", "QLinearConv"), ("qmm", "QLinearMatMul"), ("iconv", "ConvInteger"),
                     ("imm", "MatMulInteger")):
        assert reasons[name][0] == op and reasons[name][1].startswith(f"quantized layer ({op}): ")
    assert reasons["qdq_conv"] == ("Conv", "weight is quantized (produced by DequantizeLinear)")
    assert reasons["tconv"] == ("ConvTranspose", "transposed convolution (ConvTranspose) is not supported")

    source = save(model, tmp_path / "quantized.onnx")
    report = tmp_path / "report.json"
    code, err = _cli(capsys, source, tmp_path / "out.onnx", "--budget", "0.7", "--report", report)
    assert code == 0 and "Traceback" not in err, err
    assert "QLinearConv" in report.read_text()


# -------------------------------------------------------------------------------------------------- 1-D, 3-D Conv


@pytest.mark.parametrize("spatial", [(9,), (5, 6, 7)])
@pytest.mark.parametrize("k", [1, 2])
def test_conv_1d_and_3d_are_factorized(spatial, k):
    """1-D and 3-D convolutions (with strides, pads, dilations and a bias) are factorized like 2-D ones: exact at
    full rank, and a lower rank gives a smaller model that still runs."""
    rng = np.random.default_rng(len(spatial))
    dims = len(spatial)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3] * dims,
                            pads=[1] * 2 * dims, strides=[2] * dims, dilations=[1] * (dims - 1) + [2])
    init = {"w": weights(rng, 8, 4, *[3] * dims), "b": rng.standard_normal(8).astype(np.float32)}
    output = tensor("y", [f"y{axis}" for axis in range(dims + 2)])
    model = make_model([node], [tensor("x", [1, 4, *spatial])], [output], init)
    (layer,) = discover(model).layers
    assert layer.kernel_shape == (3,) * dims
    x = rng.standard_normal((1, 4, *spatial)).astype(np.float32)
    (expected,) = run(model, {"x": x})
    (actual,) = run(full_rank(model, k=k, k_where_it_divides=True), {"x": x})
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    low, _ = factorize_layers(model, [(layer, factorize(layer.read_matrix(), k, 2))])
    onnx.checker.check_model(low, full_check=True)
    assert run(low, {"x": x})[0].shape == expected.shape


# ------------------------------------------------------------------------------------------------------------ opsets


def _three_layers(opset: int) -> onnx.ModelProto:
    """Conv + Relu + GlobalAveragePool + Flatten + Gemm (with C, required before opset 11) + Relu + MatMul, using only
    ops whose signature is the same from opset 7 to the newest."""
    rng = np.random.default_rng(opset)
    init = {"conv.w": weights(rng, 16, 4, 3, 3), "conv.b": np.zeros(16, np.float32),
            "fc.w": weights(rng, 24, 16), "fc.b": rng.standard_normal(24).astype(np.float32),
            "mm.w": weights(rng, 8, 24).T.copy()}
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c"], ["cr"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["cr"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten", axis=1),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["g"], name="fc", transB=1),
        helper.make_node("Relu", ["g"], ["gr"], name="relu2"),
        helper.make_node("MatMul", ["gr", "mm.w"], ["y"], name="mm"),
    ]
    return make_model(nodes, [tensor("x", [2, 4, 8, 8])], [tensor("y", [2, 8])], init, opset=opset)


@pytest.mark.parametrize("opset", sorted({7, 9, 11, 13, 17, NEWEST_OPSET}))
def test_every_opset_from_7_to_the_newest(tmp_path, capsys, opset):
    """The passes emit ops valid at the model's opset (Reshape's shape as an input from opset 5, Gemm keeps its C):
    full-rank rewrites with k = 2 (the grouped MatMul's Reshapes) are exact, and the CLI compresses and verifies.
    onnxruntime 1.32 runs all of these opsets, so no case is skipped."""
    model = _three_layers(opset)
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    new = full_rank(model, k=2, shift=True, k_where_it_divides=True)
    assert [entry.version for entry in new.opset_import] == [opset]
    np.testing.assert_allclose(run(new, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)
    source = save(model, tmp_path / "model.onnx")
    code, err = _cli(capsys, source, tmp_path / "out.onnx", "--budget", "0.6", "--allow-slower")
    assert code == 0, err
    written = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(written, full_check=True)
    assert written.opset_import == model.opset_import
    assert run(written, {"x": x})[0].shape == (2, 8)


# ------------------------------------------------------------------------------------------------------------- names


def _renamed(names) -> onnx.ModelProto:
    model = build_cnn()
    for node, name in zip(model.graph.node, names):
        node.name = name
    return model


def _check_names(written: onnx.ModelProto, model: onnx.ModelProto) -> None:
    onnx.checker.check_model(written, full_check=True)
    before = {n.output[0]: n.name for n in model.graph.node}
    new = [n.name for n in written.graph.node if n.output[0] not in before or n.op_type in ("Conv", "Gemm")]
    assert new and all(new) and len(set(new)) == len(new)  # new nodes get unique names, derived from the outputs
    for node in written.graph.node:  # untouched nodes keep their (empty or duplicated) names
        if node.output[0] in before and node.op_type not in ("Conv", "Gemm"):
            assert node.name == before[node.output[0]]


def test_empty_node_names(tmp_path, capsys):
    model = _renamed([""] * 20)
    source = save(model, tmp_path / "names.onnx")
    code, err = _cli(capsys, source, tmp_path / "out.onnx", "--budget", "0.6", "--allow-slower")
    assert code == 0, err
    _check_names(onnx.load(tmp_path / "out.onnx"), model)


def test_duplicated_node_names(tmp_path, capsys):
    """Valid ONNX, but onnxruntime refuses to load it: compressed with --no-verify; verification (which needs
    onnxruntime) is refused in one line and nothing is written."""
    model = _renamed(["same", ""] * 10)
    source = save(model, tmp_path / "names.onnx")
    code, err = _cli(capsys, source, tmp_path / "out.onnx", "--budget", "0.6", "--allow-slower", "--no-verify")
    assert code == 0, err
    _check_names(onnx.load(tmp_path / "out.onnx"), model)
    code, err = _cli(capsys, source, tmp_path / "verified.onnx", "--budget", "0.6", "--allow-slower")
    assert code == 2 and err.startswith("onnx-lowrank: error: ") and "same node name" in err
    _one_line_or_nothing(err)
    assert not (tmp_path / "verified.onnx").exists()


# ------------------------------------------------------------------------------- local functions, custom domains


def _with_function_and_custom_node(defined: bool) -> onnx.ModelProto:
    """build_cnn with a 'com.example' node after its last Relu: `Double` (x + x) defined as a local function, or,
    when not `defined`, an op nothing defines (only its own runtime would run it)."""
    model = build_cnn(batchnorm=False)
    graph = model.graph
    index = next(i for i, n in enumerate(graph.node) if n.output[0] == "r3")
    op = "Double" if defined else "Mystery"
    graph.node.insert(index + 1, helper.make_node(op, ["r3"], ["r3d"], name="custom", domain="com.example",
                                                  doc_string="a custom node"))
    for node in graph.node:
        if node.op_type == "GlobalAveragePool":
            node.input[0] = "r3d"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    if defined:
        body = [helper.make_node("Add", ["X", "X"], ["Y"])]
        model.functions.append(helper.make_function("com.example", "Double", ["X"], ["Y"], body,
                                                    [helper.make_opsetid("", 17)]))
    onnx.checker.check_model(model)
    return model


def _assert_custom_parts_kept(written: onnx.ModelProto, model: onnx.ModelProto) -> None:
    assert list(written.functions) == list(model.functions)
    assert list(written.opset_import) == list(model.opset_import)
    (custom,) = [n for n in written.graph.node if n.domain == "com.example"]
    (original,) = [n for n in model.graph.node if n.domain == "com.example"]
    assert custom == original


def test_local_function_and_custom_domain_node_are_kept_and_verified(tmp_path, capsys):
    """onnxruntime runs model-local functions, so this model is verified as any other."""
    model = _with_function_and_custom_node(defined=True)
    compressed, report = onnx_lowrank.compress(model, 0.6, allow_slower=True, latency_cache=False)
    assert report.layers and report.verification is not None
    _assert_custom_parts_kept(compressed, model)


def test_custom_domain_node_onnxruntime_cannot_run(tmp_path, capsys):
    """An op only its own runtime knows: verification needs onnxruntime, so it is refused in one line naming the op,
    nothing written. With --no-verify the model is compressed and the node kept, or (today: tensor shapes are
    still measured in onnxruntime during analysis) refused the same way."""
    model = _with_function_and_custom_node(defined=False)
    source = save(model, tmp_path / "custom.onnx")
    code, err = _cli(capsys, source, tmp_path / "verified.onnx", "--budget", "0.6", "--allow-slower")
    assert code == 2 and err.startswith("onnx-lowrank: error: ") and "com.example:Mystery" in err
    _one_line_or_nothing(err)
    assert not (tmp_path / "verified.onnx").exists()
    code, err = _cli(capsys, source, tmp_path / "out.onnx", "--budget", "0.6", "--allow-slower", "--no-verify")
    _one_line_or_nothing(err)
    if code == 0:
        written = onnx.load(tmp_path / "out.onnx")
        onnx.checker.check_model(written)
        _assert_custom_parts_kept(written, model)
    else:
        assert code == 2 and "com.example:Mystery" in err and not (tmp_path / "out.onnx").exists()
