"""Discovery: which Conv/Gemm/MatMul nodes become layers, how each is seen as a matrix, and why others are skipped."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers.builders import CNN_LAYERS, build_cnn, build_gemm, build_matmul, make_model, tensor, to_constant_nodes
from onnx import TensorProto, helper

from onnx_lowrank.stages.discover import discover


def _names(discovery):
    return [layer.name for layer in discovery.layers]


def _skipped(discovery):
    return {s.name: s.reason for s in discovery.skipped}


def _only_skip_reason(model) -> str:
    discovery = discover(model)
    assert discovery.layers == ()
    assert len(discovery.skipped) >= 1
    return discovery.skipped[0].reason


def _rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------------------------------------------ what is found


def test_cnn_layers_in_graph_order():
    discovery = discover(build_cnn())
    assert _names(discovery) == list(CNN_LAYERS)
    assert [layer.op for layer in discovery.layers] == ["Conv", "Conv", "Conv", "Gemm", "Gemm"]
    assert discovery.skipped == ()


def test_layers_keep_graph_order_when_names_are_not_sorted():
    rng = _rng()
    init = {"wz": rng.standard_normal((6, 8)).astype(np.float32), "wa": rng.standard_normal((4, 6)).astype(np.float32)}
    nodes = [
        helper.make_node("Gemm", ["x", "wz"], ["h"], name="zzz", transB=1),
        helper.make_node("Gemm", ["h", "wa"], ["y"], name="aaa", transB=1),
    ]
    model = make_model(nodes, [tensor("x", [2, 8])], [tensor("y", [2, 4])], init)
    assert _names(discover(model)) == ["zzz", "aaa"]


def test_conv_matrix_is_the_weight_reshaped_out_by_in_times_taps():
    model = build_cnn(batchnorm=False)
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = {layer.name: layer for layer in discover(model).layers}
    for name in ("conv1", "conv2", "conv3"):
        layer = layers[name]
        w = weights[f"{name}.w"]
        assert layer.matrix_shape == (w.shape[0], w.shape[1] * 9)
        assert layer.read_matrix().dtype == np.float64
        np.testing.assert_array_equal(layer.read_matrix(), w.reshape(w.shape[0], -1).astype(np.float64))
        assert layer.in_channels == w.shape[1]
        assert layer.kernel_shape == (3, 3)
        assert layer.weight_shape == w.shape
        assert layer.batchnorm_output is None
        if f"{name}.b" in weights:  # the conv's own constant bias; conv2 has none
            np.testing.assert_array_equal(layer.bias, weights[f"{name}.b"].astype(np.float64))
            assert layer.bias_size == w.shape[0]
        else:
            assert layer.bias is None and layer.bias_size == 0


def test_constant_node_weights_are_discovered_like_initializers():
    plain = discover(build_cnn())
    constant_model = build_cnn(constant_weights=True)
    assert len(constant_model.graph.initializer) == 0
    assert any(n.op_type == "Constant" for n in constant_model.graph.node)
    constant = discover(constant_model)
    assert _names(constant) == _names(plain) == list(CNN_LAYERS)
    assert constant.skipped == ()
    for a, b in zip(plain.layers, constant.layers):
        np.testing.assert_array_equal(a.read_matrix(), b.read_matrix())
        if a.bias is None:
            assert b.bias is None
        else:
            np.testing.assert_allclose(a.bias, b.bias)
        assert a.batchnorm_output == b.batchnorm_output


def test_a_single_constant_node_weight_is_discovered():
    model = to_constant_nodes(build_gemm(), names=["fc.w"])
    assert [t.name for t in model.graph.initializer] == ["fc.b"]
    discovery = discover(model)
    assert _names(discovery) == ["fc"]
    assert discovery.layers[0].weight_name == "fc.w"


@pytest.mark.parametrize("kernel, attrs", [
    ((5,), {"strides": [2], "pads": [2, 1], "dilations": [2]}),
    ((3,), {"auto_pad": "SAME_UPPER"}),
    ((3, 1), {"strides": [2, 1], "dilations": [1, 1], "pads": [1, 0, 0, 0]}),
    ((1, 1), {}),
    ((3, 3), {"auto_pad": "VALID", "dilations": [2, 2]}),
])
def test_conv_attributes_do_not_prevent_discovery(kernel, attrs):
    rng = _rng()
    w = rng.standard_normal((6, 4, *kernel)).astype(np.float32)
    spatial = [9] * len(kernel)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=list(kernel), **attrs)
    model = make_model([node], [tensor("x", [1, 4, *spatial])], [tensor("y", [None] * (2 + len(kernel)))], {"w": w})
    (layer,) = discover(model).layers
    assert layer.kernel_shape == kernel
    assert layer.matrix_shape == (6, 4 * int(np.prod(kernel)))
    np.testing.assert_array_equal(layer.read_matrix(), w.reshape(6, -1))
    assert layer.taps == int(np.prod(kernel))


# ---------------------------------------------------------------------------------------------------- orientation


def test_gemm_trans_b_0_and_1_give_the_same_out_by_in_matrix():
    a = discover(build_gemm(trans_b=1)).layers[0]
    b = discover(build_gemm(trans_b=0)).layers[0]
    assert a.matrix_shape == b.matrix_shape == (24, 32)
    np.testing.assert_array_equal(a.read_matrix(), b.read_matrix())
    assert a.in_channels == b.in_channels == 32
    assert a.out_channels == b.out_channels == 24
    assert a.weight_shape == (24, 32) and b.weight_shape == (32, 24)


@pytest.mark.parametrize("alpha, beta, bias_shape", [
    (1.0, 1.0, None), (0.5, 2.0, (24,)), (1.0, 1.0, (1, 24)), (1.0, 0.5, (4, 24)), (1.0, 1.0, (1,)),
])
def test_gemm_alpha_beta_and_any_c_are_discovered(alpha, beta, bias_shape):
    model = build_gemm(alpha=alpha, beta=beta, bias_shape=bias_shape)
    assert _names(discover(model)) == ["fc"]


def test_matmul_matrix_is_the_weight_transposed():
    model = build_matmul()
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = {layer.name: layer for layer in discover(model).layers}
    assert list(layers) == ["mm1", "mm2"]
    for name in layers:
        w = weights[f"{name}.w"]  # (in, out)
        np.testing.assert_array_equal(layers[name].read_matrix(), w.T)
        assert layers[name].matrix_shape == (w.shape[1], w.shape[0])
        assert layers[name].in_channels == w.shape[0]
        assert layers[name].op == "MatMul"
    assert layers["mm1"].activation_rank == 3


def test_matmul_with_constant_first_input_and_activation_second_is_not_a_layer():
    rng = _rng()
    w = rng.standard_normal((5, 8)).astype(np.float32)
    node = helper.make_node("MatMul", ["w", "x"], ["y"], name="mm")
    model = make_model([node], [tensor("x", [8, 3])], [tensor("y", [5, 3])], {"w": w})
    discovery = discover(model)
    assert discovery.layers == ()
    assert "not a constant" in _skipped(discovery)["mm"]


def test_matmul_with_a_3d_constant_weight_is_skipped():
    rng = _rng()
    w = rng.standard_normal((2, 8, 4)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="bmm")
    model = make_model([node], [tensor("x", [2, 3, 8])], [tensor("y", [2, 3, 4])], {"w": w})
    assert _names(discover(model)) == []
    assert "bmm" in _skipped(discover(model))


# ----------------------------------------------------------------------------------------------------- BN folding


@pytest.mark.parametrize("conv_bias", [True, False])
def test_conv_batchnorm_is_folded(conv_bias):
    model = build_cnn(conv1_bias=conv_bias)
    arrays = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    layer = discover(model).layers[0]
    assert layer.name == "conv1"
    assert layer.batchnorm_output == "b1"
    assert layer.output == "b1"
    assert layer.node_output == "c1"
    eps = 1e-5
    scale = arrays["bn1.gamma"] / np.sqrt(arrays["bn1.var"] + eps)
    w = arrays["conv1.w"].reshape(16, -1)
    np.testing.assert_allclose(layer.read_matrix(), w * scale[:, None], rtol=1e-9, atol=1e-12)
    b = arrays["conv1.b"] if conv_bias else 0.0
    expected_bias = (b - arrays["bn1.mean"]) * scale + arrays["bn1.beta"]
    assert layer.bias is not None
    np.testing.assert_allclose(layer.bias, expected_bias, rtol=1e-9, atol=1e-12)
    # the stored weight shape is still the Conv's
    assert layer.weight_shape == (16, 3, 3, 3)


def test_batchnorm_epsilon_attribute_is_used():
    model = build_cnn()
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    for a in bn.attribute:
        if a.name == "epsilon":
            a.f = 0.25
    arrays = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    layer = discover(model).layers[0]
    scale = arrays["bn1.gamma"] / np.sqrt(arrays["bn1.var"] + 0.25)
    np.testing.assert_allclose(layer.read_matrix(), arrays["conv1.w"].reshape(16, -1) * scale[:, None], rtol=1e-6)


def test_batchnorm_is_not_folded_when_the_conv_output_has_another_reader():
    model = build_cnn()
    graph = model.graph
    # a second reader of the conv output: y2 = Relu(c1), exposed as a graph output
    graph.node.append(helper.make_node("Relu", ["c1"], ["side"], name="side_relu"))
    graph.output.append(tensor("side", [1, 16, 16, 16]))
    onnx.checker.check_model(model)
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    layer = discover(model).layers[0]
    assert layer.batchnorm_output is None
    np.testing.assert_array_equal(layer.bias, arrays["conv1.b"].astype(np.float64))  # its own bias, not BN's
    np.testing.assert_array_equal(layer.read_matrix(), arrays["conv1.w"].reshape(16, -1))


# ---------------------------------------------------------------------------------------------------------- names


def test_node_name_is_used_when_set_and_unique():
    assert _names(discover(build_cnn())) == list(CNN_LAYERS)


def test_output_name_is_used_when_node_is_unnamed():
    model = build_cnn()
    for node in model.graph.node:
        if node.name == "conv2":
            node.name = ""
    assert _names(discover(model)) == ["conv1", "c2", "conv3", "fc1", "fc2"]


def test_output_name_is_used_when_node_names_are_duplicated():
    model = build_cnn()
    for node in model.graph.node:
        if node.name in ("fc1", "fc2"):
            node.name = "dense"
    assert _names(discover(model)) == ["conv1", "conv2", "conv3", "f1", "logits"]


def test_duplicate_name_shared_with_a_non_layer_node_also_falls_back_to_output():
    model = build_cnn()
    for node in model.graph.node:
        if node.name == "relu4":
            node.name = "fc1"
    assert _names(discover(model)) == ["conv1", "conv2", "conv3", "f1", "fc2"]


def test_a_node_named_like_another_nodes_output_gets_a_distinct_layer_name():
    model = build_cnn()
    for node in model.graph.node:
        if node.name == "conv2":
            node.name = ""  # falls back to its output "c2"
        if node.name == "conv3":
            node.name = "c2"  # ...which this node is now named
    names = _names(discover(model))
    assert len(set(names)) == len(names)
    assert [n for n in names if n.startswith("c2")] == [n for n in names if n.startswith("c2#")]


# -------------------------------------------------------------------------------------------------------- exclude


def test_exclude_regex_skips_matching_layers_with_a_reason():
    discovery = discover(build_cnn(), exclude=r"^conv[23]$")
    assert _names(discovery) == ["conv1", "fc1", "fc2"]
    skipped = _skipped(discovery)
    assert set(skipped) == {"conv2", "conv3"}
    assert all("exclude" in reason for reason in skipped.values())


def test_exclude_uses_search_not_match():
    discovery = discover(build_cnn(), exclude="fc")
    assert _names(discovery) == ["conv1", "conv2", "conv3"]
    assert set(_skipped(discovery)) == {"fc1", "fc2"}


def test_exclude_none_and_nonmatching_pattern_keep_everything():
    assert _names(discover(build_cnn(), exclude=None)) == list(CNN_LAYERS)
    assert _names(discover(build_cnn(), exclude="nothing-matches-this")) == list(CNN_LAYERS)


# ---------------------------------------------------------------------------------------------------- skip reasons


def test_weight_that_is_a_graph_input_is_skipped():
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)
    model = make_model([node], [tensor("x", [2, 8]), tensor("w", [4, 8])], [tensor("y", [2, 4])])
    assert "not a constant" in _only_skip_reason(model)


def test_weight_computed_by_a_node_is_skipped():
    rng = _rng()
    nodes = [
        helper.make_node("Transpose", ["wt"], ["w"], name="transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    model = make_model(nodes, [tensor("x", [2, 8])], [tensor("y", [2, 4])],
                       {"wt": rng.standard_normal((4, 8)).astype(np.float32)})
    reason = _only_skip_reason(model)
    assert "not a constant" in reason and "Transpose" in reason


def test_weight_shared_by_several_nodes_is_one_layer():
    rng = _rng()
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["h"], name="fc_a", transB=1),
        helper.make_node("Gemm", ["h", "w"], ["y"], name="fc_b", transB=1),
    ]
    model = make_model(nodes, [tensor("x", [2, 8])], [tensor("y", [2, 8])],
                       {"w": rng.standard_normal((8, 8)).astype(np.float32)})
    discovery = discover(model)
    assert [layer.name for layer in discovery.layers] == ["fc_a"] and discovery.skipped == ()
    assert [consumer.name for consumer in discovery.layers[0].shared] == ["fc_b"]


def test_weight_shared_with_other_attributes_is_skipped():
    rng = _rng()
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["h"], name="fc_a", transB=1),
        helper.make_node("Gemm", ["h", "w"], ["y"], name="fc_b", transB=1, alpha=2.0),
    ]
    model = make_model(nodes, [tensor("x", [2, 8])], [tensor("y", [2, 8])],
                       {"w": rng.standard_normal((8, 8)).astype(np.float32)})
    skipped = _skipped(discover(model))
    assert set(skipped) == {"fc_a", "fc_b"} and all("different attributes" in r for r in skipped.values())


def test_weight_shared_with_a_non_layer_node_is_skipped():
    rng = _rng()
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1),
        helper.make_node("ReduceSum", ["w"], ["s"], name="sum", keepdims=0),
    ]
    model = make_model(nodes, [tensor("x", [2, 8])], [tensor("y", [2, 8]), tensor("s", [])],
                       {"w": rng.standard_normal((8, 8)).astype(np.float32)})
    assert "shared" in _only_skip_reason(model)


def test_grouped_conv_is_skipped():
    rng = _rng()
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="gconv", kernel_shape=[3, 3], group=2)
    model = make_model([node], [tensor("x", [1, 4, 6, 6])], [tensor("y", [1, 6, 4, 4])],
                       {"w": rng.standard_normal((6, 2, 3, 3)).astype(np.float32)})
    reason = _only_skip_reason(model)
    assert "group" in reason


def test_float16_weight_is_discovered_in_its_dtype():
    rng = _rng()
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)
    model = make_model([node], [tensor("x", [2, 8], TensorProto.FLOAT16)], [tensor("y", [2, 4], TensorProto.FLOAT16)],
                       {"w": rng.standard_normal((4, 8)).astype(np.float16)})
    (layer,) = discover(model).layers
    assert layer.dtype == np.float16 and layer.read_matrix().dtype == np.float64  # factorized in float64, written in float16


def test_int8_weight_is_skipped_with_the_dtype():
    rng = _rng()
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    model = make_model([node], [tensor("x", [2, 8], TensorProto.INT8)], [tensor("y", [2, 4], TensorProto.INT8)],
                       {"w": rng.integers(-5, 5, (8, 4)).astype(np.int8)})
    reason = _only_skip_reason(model)
    assert "dtype int8" in reason and "float16, float32 and float64" in reason


def test_float64_weight_is_supported():
    rng = _rng()
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)
    model = make_model([node], [tensor("x", [2, 8], TensorProto.DOUBLE)], [tensor("y", [2, 4], TensorProto.DOUBLE)],
                       {"w": rng.standard_normal((4, 8))})
    (layer,) = discover(model).layers
    assert layer.dtype == np.float64


def test_quantized_weight_is_skipped():
    rng = _rng()
    nodes = [
        helper.make_node("DequantizeLinear", ["wq", "scale", "zero"], ["w"], name="dq"),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    init = {
        "wq": rng.integers(-100, 100, (8, 4)).astype(np.int8),
        "scale": np.array(0.05, dtype=np.float32),
        "zero": np.array(0, dtype=np.int8),
    }
    model = make_model(nodes, [tensor("x", [2, 8])], [tensor("y", [2, 4])], init)
    assert "quantized" in _only_skip_reason(model)


def test_gemm_trans_a_is_skipped():
    rng = _rng()
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transA=1, transB=1)
    model = make_model([node], [tensor("x", [8, 2])], [tensor("y", [2, 4])],
                       {"w": rng.standard_normal((4, 8)).astype(np.float32)})
    assert "transA" in _only_skip_reason(model)


def test_skipped_layers_carry_op_and_name():
    rng = _rng()
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="", kernel_shape=[3, 3], group=4)
    model = make_model([node], [tensor("x", [1, 4, 6, 6])], [tensor("y", [1, 4, 4, 4])],
                       {"w": rng.standard_normal((4, 1, 3, 3)).astype(np.float32)})
    (skipped,) = discover(model).skipped
    assert skipped.name == "y" and skipped.op == "Conv" and skipped.reason


def test_one_bad_layer_does_not_hide_the_others():
    model = build_cnn()
    for node in model.graph.node:
        if node.name == "fc1":  # an explicit transA=0 is as good as none
            node.attribute.append(helper.make_attribute("transA", 0))
    # share conv2's weight with a side reader: conv2 is skipped, the rest stay
    model.graph.node.append(helper.make_node("ReduceSum", ["conv2.w"], ["s"], name="sum", keepdims=0))
    model.graph.output.append(tensor("s", []))
    onnx.checker.check_model(model)
    discovery = discover(model)
    assert _names(discovery) == ["conv1", "conv3", "fc1", "fc2"]
    assert list(_skipped(discovery)) == ["conv2"]


def test_discover_does_not_modify_the_model():
    model = build_cnn(constant_weights=True)
    before = model.SerializeToString()
    discover(model, exclude="fc")
    assert model.SerializeToString() == before
