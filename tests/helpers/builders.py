"""Small, deterministic ONNX models shared by the tests, and the model edits the tests make on them.

Every builder takes a `seed` and returns a fresh ModelProto; the same seed gives byte-identical models.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import TensorProto, helper

OPSET = 17


# ------------------------------------------------------------------------------------------------------ parts


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Mapping[str, np.ndarray] | Iterable[onnx.TensorProto] | None = None,
    opset: int = OPSET,
    name: str = "test",
    *,
    value_info: Sequence[onnx.ValueInfoProto] = (),
    ir_version: int = 8,
    doc_string: str = "",
    props: Mapping[str, str] | None = None,
    check: bool = True,
) -> onnx.ModelProto:
    """A model from nodes, value infos and initializers ({name: array}, or TensorProtos), checked unless `check` is
    False; `doc_string` and metadata `props` are set when given."""
    if isinstance(initializers, Mapping):
        inits = [onnx.numpy_helper.from_array(np.asarray(a), n) for n, a in initializers.items()]
    else:
        inits = list(initializers or ())
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), initializer=inits,
                              value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = ir_version
    if doc_string:
        model.doc_string = doc_string
    if props:
        helper.set_model_props(model, dict(props))
    if check:
        onnx.checker.check_model(model)
    return model


def tensor(name: str, shape: Sequence[int | str | None] | int | None,
           dtype: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    """A typed tensor; an int `shape` is a rank with unknown (symbolic) dimensions."""
    if isinstance(shape, int):
        shape = [f"{name}_{i}" for i in range(shape)]
    return helper.make_tensor_value_info(name, dtype, shape)


def rng_for(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def weights(rng: np.random.Generator, *shape: int, dtype=np.float32) -> np.ndarray:
    """He-like scaled normal weights, so activations stay O(1) through a few layers."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    return (rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))).astype(dtype)


def to_constant_nodes(model: onnx.ModelProto, names: Sequence[str] | None = None) -> onnx.ModelProto:
    """A copy of `model` whose initializers (all, or those in `names`) are Constant nodes placed first."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    moved = [t for t in graph.initializer if names is None or t.name in names]
    kept = [t for t in graph.initializer if not (names is None or t.name in names)]
    constants = [
        helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in moved
    ]
    nodes = constants + list(graph.node)
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    graph.ClearField("node")
    graph.node.extend(nodes)
    onnx.checker.check_model(result)
    return result


def with_outputs(model: onnx.ModelProto, names) -> onnx.ModelProto:
    """A copy of `model` that also outputs the tensors `names` (as plain graph outputs, after its own)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for name in names:
        if name not in {o.name for o in copy.graph.output}:
            copy.graph.output.add().name = name
    return copy


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node tensors by name."""
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    arrays[node.output[0]] = onnx.numpy_helper.to_array(a.t)
    return arrays


# ----------------------------------------------------------------------------------------------------- models


def build_cnn(
    seed: int = 0,
    *,
    batchnorm: bool = True,
    constant_weights: bool = False,
    input_shape: Sequence[int | str] = (1, 3, 16, 16),
    conv1_bias: bool = True,
) -> onnx.ModelProto:
    """Conv(+BN)+Relu, Conv(stride 2)+Relu, Conv+Relu, GlobalAveragePool, Flatten, Gemm(transB=1)+Relu, Gemm.

    Layer names: conv1, conv2, conv3, fc1 (transB=1), fc2 (transB=0). Input "x", output "logits" (N, 10).
    """
    rng = rng_for(seed)
    init: dict[str, np.ndarray] = {
        "conv1.w": weights(rng, 16, 3, 3, 3),
        "conv2.w": weights(rng, 32, 16, 3, 3),
        "conv3.w": weights(rng, 32, 32, 3, 3),
        "conv3.b": (0.1 * rng.standard_normal(32)).astype(np.float32),
        "fc1.w": weights(rng, 64, 32),  # (out, in), transB=1
        "fc1.b": (0.1 * rng.standard_normal(64)).astype(np.float32),
        "fc2.w": weights(rng, 10, 64).T.copy(),  # (in, out), transB=0
        "fc2.b": (0.1 * rng.standard_normal(10)).astype(np.float32),
    }
    conv1_inputs = ["x", "conv1.w"]
    if conv1_bias:
        init["conv1.b"] = (0.1 * rng.standard_normal(16)).astype(np.float32)
        conv1_inputs.append("conv1.b")
    nodes = [helper.make_node("Conv", conv1_inputs, ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    if batchnorm:
        init.update({
            "bn1.gamma": rng.uniform(0.5, 1.5, 16).astype(np.float32),
            "bn1.beta": (0.1 * rng.standard_normal(16)).astype(np.float32),
            "bn1.mean": (0.1 * rng.standard_normal(16)).astype(np.float32),
            "bn1.var": rng.uniform(0.5, 1.5, 16).astype(np.float32),
        })
        nodes.append(helper.make_node("BatchNormalization", ["c1", "bn1.gamma", "bn1.beta", "bn1.mean", "bn1.var"],
                                      ["b1"], name="bn1", epsilon=1e-5))
        nodes.append(helper.make_node("Relu", ["b1"], ["r1"], name="relu1"))
    else:
        nodes.append(helper.make_node("Relu", ["c1"], ["r1"], name="relu1"))
    nodes += [
        helper.make_node("Conv", ["r1", "conv2.w"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "conv3.w", "conv3.b"], ["c3"], name="conv3", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc1.w", "fc1.b"], ["f1"], name="fc1", transB=1),
        helper.make_node("Relu", ["f1"], ["r4"], name="relu4"),
        helper.make_node("Gemm", ["r4", "fc2.w", "fc2.b"], ["logits"], name="fc2", transB=0),
    ]
    batch = input_shape[0]
    model = make_model(nodes, [tensor("x", list(input_shape))], [tensor("logits", [batch, 10])], init)
    if constant_weights:
        model = to_constant_nodes(model)
    return model


CNN_LAYERS = ("conv1", "conv2", "conv3", "fc1", "fc2")


def build_matmul(seed: int = 0, *, shape: Sequence[int | str] = (2, 6, 24)) -> onnx.ModelProto:
    """Transformer-like MLP on 3-D activations: MatMul(24->48) + Add + Relu + MatMul(48->16). Names mm1, mm2."""
    rng = rng_for(seed)
    init = {
        "mm1.w": weights(rng, 48, 24).T.copy(),  # (in, out)
        "mm1.b": (0.1 * rng.standard_normal(48)).astype(np.float32),
        "mm2.w": weights(rng, 16, 48).T.copy(),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "mm1.w"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "mm1.b"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["hr"], name="relu1"),
        helper.make_node("MatMul", ["hr", "mm2.w"], ["y"], name="mm2"),
    ]
    out_shape = list(shape[:-1]) + [16]
    return make_model(nodes, [tensor("x", list(shape))], [tensor("y", out_shape)], init)


def build_relu_only() -> onnx.ModelProto:
    """Nothing to compress: one Relu."""
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    return make_model(nodes, [tensor("x", [1, 8])], [tensor("y", [1, 8])])


def build_depthwise_only(seed: int = 0) -> onnx.ModelProto:
    """Nothing to compress either: a single depthwise Conv (group == channels), which is always skipped."""
    rng = rng_for(seed)
    init = {"dw.w": weights(rng, 8, 1, 3, 3)}
    nodes = [helper.make_node("Conv", ["x", "dw.w"], ["y"], name="dw", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              group=8)]
    return make_model(nodes, [tensor("x", [1, 8, 6, 6])], [tensor("y", [1, 8, 6, 6])], init)


def build_gemm(seed: int = 0, *, out: int = 24, inp: int = 32, trans_b: int = 1, batch: int | str = 4,
               alpha: float = 1.0, beta: float = 1.0, bias_shape: Sequence[int] | None = (24,)) -> onnx.ModelProto:
    """One Gemm named "fc": x (batch, inp) -> y (batch, out); weight "fc.w" stored per transB."""
    rng = rng_for(seed)
    w = rng.standard_normal((out, inp)).astype(np.float32)
    init = {"fc.w": w if trans_b else w.T.copy()}
    inputs = ["x", "fc.w"]
    if bias_shape is not None:
        init["fc.b"] = rng.standard_normal(tuple(bias_shape)).astype(np.float32)
        inputs.append("fc.b")
    node = helper.make_node("Gemm", inputs, ["y"], name="fc", transB=trans_b, alpha=alpha, beta=beta)
    return make_model([node], [tensor("x", [batch, inp])], [tensor("y", [batch, out])], init)
