"""Unit tests of the rewrite passes: structure of the new nodes, numerics in onnxruntime, and graph hygiene."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers.builders import make_model, tensor
from helpers.running import run
from onnx import TensorProto, helper, numpy_helper

from onnx_lowrank.ops.layer import Layer
from onnx_lowrank.stages.discover import discover
from onnx_lowrank.passes import factorize_layers
from onnx_lowrank.math.svd import factorize, max_rank, reconstruct

RNG_SEED = 0
# every model here has a doc string and metadata props, which the rewrites must keep; not checked when built (some
# get their graph inputs and outputs added afterwards)
DECORATED = dict(ir_version=9, doc_string="a tiny model", props={"character_dict": "a\nb\nc", "author": "me"},
                 check=False)


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def constant_node(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array)))


def layer_of(model: onnx.ModelProto, node_output: str) -> Layer:
    (layer,) = [layer for layer in discover(model).layers if layer.node_output == node_output]
    return layer


def rewrite(model, layer, k, rank=None):
    factors = factorize(layer.read_matrix(), k, rank or max_rank(*layer.matrix_shape, k))
    new, count = factorize_layers(model, [(layer, factors)])
    assert count == 1
    onnx.checker.check_model(new, full_check=True)
    return new, factors


def new_nodes(model: onnx.ModelProto, old: onnx.ModelProto) -> list[onnx.NodeProto]:
    before = {n.SerializeToString() for n in old.graph.node}
    return [n for n in model.graph.node if n.SerializeToString() not in before]


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def attributes(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def assert_close(got: np.ndarray, want: np.ndarray, rtol: float = 1e-5) -> None:
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(1.0, float(np.abs(want).max(initial=0))))


def conv2d_reference(x, w, b, strides, pads, dilations):
    """Plain numpy Conv (NCHW, explicit pads [top, left, bottom, right])."""
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    out, _, kh, kw = w.shape
    oh = (xp.shape[2] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    ow = (xp.shape[3] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    y = np.zeros((x.shape[0], out, oh, ow))
    for i in range(kh):
        for j in range(kw):
            top, left = i * dilations[0], j * dilations[1]
            patch = xp[:, :, top : top + strides[0] * (oh - 1) + 1 : strides[0],
                       left : left + strides[1] * (ow - 1) + 1 : strides[1]]
            y += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return y + b[None, :, None, None]


# ---------------------------------------------------------------------------------------------------------------------
# Conv

CONV_ATTRS = dict(kernel_shape=[3, 2], strides=[2, 1], pads=[0, 1, 1, 2], dilations=[1, 2])


def conv_model(out=6, c=4, kernel=(3, 2), attrs=CONV_ATTRS, bias=True, batchnorm=False, weight_constant=False,
               extra_nodes=(), extra_inits=(), value_info=()) -> onnx.ModelProto:
    rng = np.random.default_rng(RNG_SEED)
    weight = rng.standard_normal((out, c, *kernel)).astype(np.float32)
    x_shape = [2, c] + [9] * len(kernel)
    conv_inputs = ["x", "W"] + (["B"] if bias else [])
    inits = [init("B", rng.standard_normal(out).astype(np.float32))] if bias else []
    nodes = []
    if weight_constant:
        nodes.append(constant_node("W", weight))
    else:
        inits.append(init("W", weight))
    conv_out = "conv_out" if batchnorm else "y"
    nodes.append(helper.make_node("Conv", conv_inputs, [conv_out], name="conv", **attrs))
    if batchnorm:
        for name, low, high in (("gamma", 0.5, 1.5), ("beta", -1, 1), ("mean", -1, 1), ("var", 0.5, 2.0)):
            inits.append(init(name, rng.uniform(low, high, out).astype(np.float32)))
        nodes.append(helper.make_node("BatchNormalization", ["conv_out", "gamma", "beta", "mean", "var"], ["y"],
                                      name="bn", epsilon=1e-3))
    nodes += list(extra_nodes)
    outputs = [tensor("y", 2 + len(kernel))]
    return make_model(nodes, [tensor("x", x_shape)], outputs, inits + list(extra_inits), value_info=value_info,
                      **DECORATED)


def conv_feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(1).standard_normal(dims).astype(np.float32)}


def test_conv_structure_copies_attributes_and_sets_group():
    model = conv_model()
    layer = layer_of(model, "y")
    new, factors = rewrite(model, layer, k=2, rank=3)
    nodes = new_nodes(new, model)
    assert [n.op_type for n in nodes] == ["Conv", "Conv"]
    encoder, decoder = nodes
    assert attributes(encoder) == {**CONV_ATTRS, "group": 2}
    assert attributes(decoder) == {}
    assert encoder.input[0] == "x" and encoder.output[0] == decoder.input[0]
    assert list(decoder.input[2:]) == ["B"] and list(decoder.output) == ["y"]
    weights = initializers(new)
    assert weights[encoder.input[1]].shape == (2 * 3, 2, 3, 2)
    assert weights[decoder.input[1]].shape == (6, 2 * 3, 1, 1)
    assert weights[encoder.input[1]].dtype == np.float32
    assert "W" not in weights
    assert [n.name for n in new.graph.node] == ["conv/lowrank_encoder", "conv/lowrank_decoder"]


@pytest.mark.parametrize("kernel, attrs", [
    ((3,), dict(strides=[2], pads=[1, 0], dilations=[2])),
    ((3, 2), CONV_ATTRS),
    ((1, 1), {}),
    ((2, 3), dict(auto_pad="SAME_LOWER", strides=[2, 1])),
    ((2, 2, 2), dict(strides=[1, 2, 1], pads=[0, 1, 0, 1, 0, 1])),
])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_conv_full_rank_reproduces_original(kernel, attrs, k):
    model = conv_model(kernel=kernel, attrs=attrs)
    new, _ = rewrite(model, layer_of(model, "y"), k)
    assert_close(run(new, conv_feeds(model), threads=1)[0], run(model, conv_feeds(model), threads=1)[0])


@pytest.mark.parametrize("k, rank", [(1, 2), (2, 1), (4, 2)])
def test_conv_reduced_rank_matches_numpy_reference(k, rank):
    model = conv_model()
    layer = layer_of(model, "y")
    new, factors = rewrite(model, layer, k, rank)
    x = conv_feeds(model)["x"]
    w_hat = reconstruct(factors).reshape(layer.weight_shape)
    bias = initializers(model)["B"].astype(np.float64)
    want = conv2d_reference(x.astype(np.float64), w_hat, bias, [2, 1], [0, 1, 1, 2], [1, 2])
    assert_close(run(new, {"x": x}, threads=1)[0], want)


def test_conv_batchnorm_is_folded_and_its_parameters_removed():
    model = conv_model(batchnorm=True, value_info=[tensor("conv_out", [2, 6, 4, 7])])
    layer = layer_of(model, "conv_out")
    assert layer.batchnorm_output == "y"
    new, _ = rewrite(model, layer, k=2)
    assert [n.op_type for n in new.graph.node] == ["Conv", "Conv"]
    decoder = new.graph.node[1]
    assert list(decoder.output) == ["y"]
    np.testing.assert_allclose(initializers(new)[decoder.input[2]], layer.bias.astype(np.float32))
    assert set(initializers(new)) == {new.graph.node[0].input[1], decoder.input[1], decoder.input[2]}
    assert len(new.graph.value_info) == 0  # the tensor between Conv and BN is gone
    assert_close(run(new, conv_feeds(model), threads=1)[0], run(model, conv_feeds(model), threads=1)[0])


def test_conv_weight_from_constant_node_is_removed():
    model = conv_model(weight_constant=True)
    new, _ = rewrite(model, layer_of(model, "y"), k=2)
    assert [n.op_type for n in new.graph.node] == ["Conv", "Conv"]
    assert_close(run(new, conv_feeds(model), threads=1)[0], run(model, conv_feeds(model), threads=1)[0])


def test_orphaned_weight_removed_but_unused_tensors_kept():
    unused_constant = constant_node("was_unused", np.ones(3, np.float32))
    model = conv_model(extra_inits=[init("unused", np.zeros(5, np.float32))], extra_nodes=[unused_constant])
    new, _ = rewrite(model, layer_of(model, "y"), k=1)
    weights = initializers(new)
    assert "W" not in weights
    assert "unused" in weights and "B" in weights
    assert any(list(n.output) == ["was_unused"] for n in new.graph.node)


def test_weight_that_is_a_graph_output_is_kept():
    model = conv_model()
    model.graph.output.append(tensor("W", [6, 4, 3, 2]))
    layer = layer_of(conv_model(), "y")  # discover would skip it: build the layer on the plain model
    new, _ = rewrite(model, layer, k=2)
    assert "W" in initializers(new)


def test_input_model_not_mutated_and_everything_else_kept():
    model = conv_model(value_info=[tensor("unrelated", [1])])
    model.graph.doc_string = "graph doc"
    before = model.SerializeToString()
    new, _ = rewrite(model, layer_of(model, "y"), k=2)
    assert model.SerializeToString() == before
    assert new.metadata_props == model.metadata_props
    assert new.opset_import == model.opset_import
    assert (new.ir_version, new.producer_name, new.doc_string) == (model.ir_version, "tests", "a tiny model")
    assert new.graph.doc_string == "graph doc" and new.graph.name == model.graph.name
    assert new.graph.input == model.graph.input and new.graph.output == model.graph.output
    assert new.graph.value_info == model.graph.value_info


def test_same_input_gives_byte_identical_output():
    model = conv_model(batchnorm=True)
    layer = layer_of(model, "conv_out")
    factors = factorize(layer.read_matrix(), 2, 2)
    first, _ = factorize_layers(model, [(layer, factors)])
    second, _ = factorize_layers(model, [(layer, factors)])
    assert first.SerializeToString() == second.SerializeToString()


def test_new_names_avoid_every_existing_name():
    taken = helper.make_node("Identity", ["x"], ["W_lowrank_encoder"], name="conv/lowrank_decoder")
    also_taken = helper.make_node("Identity", ["x"], ["W_lowrank_encoder_1"], name="y_lowrank_hidden")
    model = conv_model(extra_nodes=[taken, also_taken], extra_inits=[init("W_lowrank_decoder", np.zeros(1))],
                       value_info=[tensor("conv/lowrank_encoder", 1)])
    new, _ = rewrite(model, layer_of(model, "y"), k=2)
    encoder, decoder = new.graph.node[:2]
    assert encoder.name == "conv/lowrank_encoder_1" and decoder.name == "conv/lowrank_decoder_1"
    assert encoder.input[1] == "W_lowrank_encoder_2" and decoder.input[1] == "W_lowrank_decoder_1"
    assert encoder.output[0] == "y_lowrank_hidden_1"
    assert_close(run(new, conv_feeds(model), threads=1)[0], run(model, conv_feeds(model), threads=1)[0])


def test_new_names_avoid_names_inside_subgraphs():
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["y_lowrank_hidden"])], "branch", [],
                               [tensor("y_lowrank_hidden", 4)])
    if_node = helper.make_node("If", ["flag"], ["z"], then_branch=branch, else_branch=branch)
    model = conv_model(extra_nodes=[if_node])
    model.graph.input.append(tensor("flag", [], TensorProto.BOOL))
    model.graph.output.append(tensor("z", 4))
    new, _ = rewrite(model, layer_of(model, "y"), k=2)
    assert new.graph.node[0].output[0] == "y_lowrank_hidden_1"


def test_mismatched_factors_are_rejected():
    model = conv_model()
    layer = layer_of(model, "y")
    with pytest.raises(ValueError, match="do not fit"):
        factorize_layers(model, [(layer, factorize(np.ones((6, 12)), 2, 2))])


# ---------------------------------------------------------------------------------------------------------------------
# Gemm


def gemm_model(n=3, inp=8, out=5, trans_b=1, alpha=0.7, beta=1.3, c_shape=(5,)) -> onnx.ModelProto:
    rng = np.random.default_rng(RNG_SEED)
    weight = rng.standard_normal((out, inp) if trans_b else (inp, out)).astype(np.float32)
    inits = [init("W", weight)]
    inputs = ["a", "W"]
    if c_shape is not None:
        inits.append(init("C", rng.standard_normal(c_shape).astype(np.float32)))
        inputs.append("C")
    node = helper.make_node("Gemm", inputs, ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta)
    return make_model([node], [tensor("a", [n, inp])], [tensor("y", [n, out])], inits, **DECORATED)


def gemm_feeds(n=3, inp=8):
    return {"a": np.random.default_rng(2).standard_normal((n, inp)).astype(np.float32)}


@pytest.mark.parametrize("k, ops", [(1, ["MatMul", "Gemm"]), (2, ["Reshape", "MatMul", "Reshape", "Gemm"])])
def test_gemm_structure(k, ops):
    model = gemm_model()
    new, _ = rewrite(model, layer_of(model, "y"), k, rank=2)
    nodes = list(new.graph.node)
    assert [n.op_type for n in nodes] == ops
    decoder = nodes[-1]
    assert attributes(decoder) == {"alpha": pytest.approx(0.7), "beta": pytest.approx(1.3)}
    assert list(decoder.input[2:]) == ["C"] and list(decoder.output) == ["y"]
    weights = initializers(new)
    assert weights[decoder.input[1]].shape == (k * 2, 5)
    assert "W" not in weights


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (), (5,), (1, 5), (3, 5)])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_gemm_full_rank_reproduces_original(trans_b, c_shape, k):
    model = gemm_model(trans_b=trans_b, c_shape=c_shape)
    new, _ = rewrite(model, layer_of(model, "y"), k)
    assert_close(run(new, gemm_feeds(), threads=1)[0], run(model, gemm_feeds(), threads=1)[0])


@pytest.mark.parametrize("k, rank", [(1, 1), (2, 2), (4, 1)])
def test_gemm_reduced_rank_matches_numpy_reference(k, rank):
    model = gemm_model()
    new, factors = rewrite(model, layer_of(model, "y"), k, rank)
    a = gemm_feeds()["a"]
    want = 0.7 * a.astype(np.float64) @ reconstruct(factors).T + 1.3 * initializers(model)["C"]
    assert_close(run(new, {"a": a}, threads=1)[0], want)


# ---------------------------------------------------------------------------------------------------------------------
# MatMul


def matmul_model(x_shape=(2, 3, 8), out=6, weight_constant=False, dtype=np.float32) -> onnx.ModelProto:
    weight = np.random.default_rng(RNG_SEED).standard_normal((x_shape[-1], out)).astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")]
    inits = []
    if weight_constant:
        nodes.insert(0, constant_node("W", weight))
    else:
        inits.append(init("W", weight))
    return make_model(nodes, [tensor("x", list(x_shape), elem)], [tensor("y", [*x_shape[:-1], out], elem)], inits,
                      **DECORATED)


def matmul_feeds(x_shape=(2, 3, 8), dtype=np.float32):
    return {"x": np.random.default_rng(3).standard_normal(x_shape).astype(dtype)}


def test_matmul_grouped_structure_and_no_block_diagonal_weight():
    model = matmul_model()
    new, _ = rewrite(model, layer_of(model, "y"), k=4, rank=2)
    nodes = list(new.graph.node)
    assert [n.op_type for n in nodes] == ["Reshape", "MatMul", "Reshape", "MatMul"]
    weights = initializers(new)
    assert weights[nodes[0].input[1]].tolist() == [0, 0, 4, 1, 2]
    assert weights[nodes[2].input[1]].tolist() == [0, 0, 8]
    assert weights[nodes[1].input[1]].shape == (4, 2, 2)  # (k, in/k, r): in*r values, not a dense (in, k*r)
    assert weights[nodes[3].input[1]].shape == (8, 6)
    float_sizes = sorted(w.size for w in weights.values() if w.dtype == np.float32)
    assert float_sizes == [8 * 2, 4 * 2 * 6]
    assert all(attributes(n) == {} for n in nodes)  # Reshape allowzero stays 0
    assert list(nodes[-1].output) == ["y"] and nodes[0].input[0] == "x"


@pytest.mark.parametrize("x_shape", [(5, 8), (2, 3, 8), (2, 1, 3, 8)])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_matmul_full_rank_reproduces_original(x_shape, k):
    model = matmul_model(x_shape)
    new, _ = rewrite(model, layer_of(model, "y"), k)
    assert_close(run(new, matmul_feeds(x_shape), threads=1)[0], run(model, matmul_feeds(x_shape), threads=1)[0])


@pytest.mark.parametrize("k, rank", [(1, 3), (2, 1), (4, 2)])
def test_matmul_reduced_rank_matches_numpy_reference(k, rank):
    model = matmul_model()
    new, factors = rewrite(model, layer_of(model, "y"), k, rank)
    x = matmul_feeds()["x"]
    assert_close(run(new, {"x": x}, threads=1)[0], x.astype(np.float64) @ reconstruct(factors).T)


def test_matmul_weight_from_constant_node_is_removed():
    model = matmul_model(weight_constant=True)
    new, _ = rewrite(model, layer_of(model, "y"), k=2)
    assert "Constant" not in [n.op_type for n in new.graph.node]
    assert_close(run(new, matmul_feeds(), threads=1)[0], run(model, matmul_feeds(), threads=1)[0])


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_new_weights_are_written_in_the_layer_dtype(dtype):
    model = matmul_model(dtype=dtype)
    base = layer_of(matmul_model(), "y")  # discover supports float32/float64 only: build the layer by hand
    weight = numpy_helper.to_array(model.graph.initializer[0])
    layer = Layer(name="proj", op="MatMul", node_output="y", input_name="x", weight_name="W", weight_shape=weight.shape,
                  matrix_shape=(6, 8), source=lambda: weight.T.astype(np.float64), in_channels=8, kernel_shape=(), dtype=np.dtype(dtype),
                  activation_rank=base.activation_rank)
    new, _ = rewrite(model, layer, k=2)
    assert {w.dtype for w in initializers(new).values()} == {np.dtype(dtype), np.dtype(np.int64)}
    x = matmul_feeds(dtype=dtype)
    rtol = 1e-2 if dtype == np.float16 else 1e-10
    assert_close(run(new, x, threads=1)[0].astype(np.float64), run(model, x, threads=1)[0].astype(np.float64), rtol)


def test_shared_weight_removed_only_when_its_last_user_is_rewritten():
    weight = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y1"], name="a"),
             helper.make_node("MatMul", ["x", "W"], ["y2"], name="b")]
    model = make_model(nodes, [tensor("x", [2, 8])], [tensor("y1", [2, 6]), tensor("y2", [2, 6])], [init("W", weight)],
                       **DECORATED)
    layers = [Layer(name=name, op="MatMul", node_output=out, input_name="x", weight_name="W", weight_shape=(8, 6),
                    matrix_shape=(6, 8), source=lambda: weight.T.astype(np.float64), in_channels=8, kernel_shape=(), dtype=np.dtype(np.float32),
                    activation_rank=2) for name, out in (("a", "y1"), ("b", "y2"))]
    rewrites = [(layer, factorize(layer.read_matrix(), 2, 4)) for layer in layers]  # full rank
    one, _ = factorize_layers(model, rewrites[:1])
    assert "W" in initializers(one)
    both, count = factorize_layers(model, rewrites)
    assert count == 2 and "W" not in initializers(both)
    assert len({n.name for n in both.graph.node}) == len(both.graph.node) == 8
    onnx.checker.check_model(both, full_check=True)
    x = matmul_feeds((2, 8))
    for got, want in zip(run(both, x, threads=1), run(model, x, threads=1)):
        assert_close(got, want)


def test_matmul_grouped_needs_the_activation_rank():
    model = matmul_model()
    layer = layer_of(model, "y")
    unknown = Layer(**{**layer.__dict__, "activation_rank": None})
    with pytest.raises(ValueError, match="activation rank"):
        factorize_layers(model, [(unknown, factorize(layer.read_matrix(), 2, 2))])
    factorize_layers(model, [(unknown, factorize(layer.read_matrix(), 1, 2))])  # k=1 needs no Reshape


def test_old_opset_reshape_takes_its_shape_as_an_attribute():
    model = matmul_model(x_shape=(2, 8))
    model.opset_import[0].version = 4
    layer = layer_of(matmul_model(x_shape=(2, 8)), "y")
    new, _ = factorize_layers(model, [(layer, factorize(layer.read_matrix(), 2, 2))])
    reshapes = [n for n in new.graph.node if n.op_type == "Reshape"]
    assert [attributes(n) for n in reshapes] == [{"shape": [0, 2, 1, 4]}, {"shape": [0, 4]}]
    assert all(len(n.input) == 1 for n in reshapes)
    onnx.checker.check_model(new, full_check=True)


def test_unknown_layer_output_is_an_error():
    model = matmul_model()
    layer = layer_of(model, "y")
    missing = Layer(**{**layer.__dict__, "node_output": "nope"})
    with pytest.raises(ValueError, match="no node produces"):
        factorize_layers(model, [(missing, factorize(layer.read_matrix(), 1, 2))])


def test_subnormal_values_of_new_weights_are_written_as_zeros():
    """A factor entry below float32's smallest normal number is zero in effect but takes the slow path of x86 CPUs
    in every product (a recogniser's decoder with 1,437 of them ran the whole model 2.7x slower): none is written."""
    model = conv_model()
    layer = layer_of(model, "y")
    factors = factorize(layer.read_matrix(), 1, 3)
    factors.decoder[0, :] = 1e-40  # subnormal in float32
    factors.encoder[0, 0, :2] = -3e-39
    new, _ = factorize_layers(model, [(layer, factors)])
    tiny = np.finfo(np.float32).tiny
    for array in initializers(new).values():
        assert not np.any((array != 0) & (np.abs(array) < tiny))
    assert np.count_nonzero(initializers(new)["W_lowrank_decoder"][0]) == 0
