"""The op family registry (`ops.base`): a fourth family registered from here is discovered, factorized and counted
like the built-in ones, and gone once unregistered; and the package's layers import only downwards."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers.builders import make_model, tensor
from helpers.running import run
from onnx_lowrank.graph.editor import GraphEditor
from onnx_lowrank.math.svd import Factors, factorize, max_rank
from onnx_lowrank.ops.base import (FAMILIES, LayerContext, OpFamily, Skip, StoredWeight, family_for, group_counts,
                                   layer_ops, register, unregister)
from onnx_lowrank.ops.layer import Layer
from onnx_lowrank.passes import factorize_layers
from onnx_lowrank.stages.costs import model_flops
from onnx_lowrank.stages.discover import discover

PACKAGE = Path(__file__).resolve().parents[1] / "onnx_lowrank"


class EinsumFamily(OpFamily):
    """Einsum "...i,io->...o" with a constant (in, out) weight: a MatMul written as an Einsum, factorized into two
    Einsums (no groups)."""

    op_type = "Einsum"
    bias_input = False

    def layer(self, node: onnx.NodeProto, name: str, context: LayerContext) -> Layer:
        equation = next((a.s.decode() for a in node.attribute if a.name == "equation"), "")
        if equation.replace(" ", "") != "...i,io->...o":
            raise Skip(f"equation {equation!r} is not a product with the weight")
        constants = context.constants
        weight = node.input[1]
        inp, out = constants.shape(weight)
        return Layer(name=name, op=self.op_type, node_output=node.output[0], input_name=node.input[0],
                     weight_name=weight, weight_shape=(inp, out), matrix_shape=(out, inp),
                     source=StoredWeight(constants.tensor(weight), transposed=True), in_channels=inp,
                     kernel_shape=(), dtype=constants.dtype(weight),
                     output_positions=self.positions(context.shapes, node.output[0]),
                     activation_rank=context.ranks.get(node.input[0]))

    def weight_axes(self, node: onnx.NodeProto) -> tuple[int, int]:
        return 1, 0

    def node_macs(self, node, out_shape, in_shape, weight_shape) -> int:
        return int(np.prod(out_shape, dtype=np.int64)) * int(weight_shape[0])

    def plan_problem(self, layer: Layer, k: int) -> str | None:
        return None if k == 1 else "can only take k=1: an Einsum is factorized without groups"

    def factorize(self, editor: GraphEditor, layer: Layer, factors: Factors) -> None:
        node = editor.node(layer.node_output)
        encoder = editor.add_initializer(f"{layer.weight_name}_lowrank_encoder", factors.encoder[0].T, layer.dtype)
        decoder = editor.add_initializer(f"{layer.weight_name}_lowrank_decoder", factors.decoder.T, layer.dtype)
        hidden = editor.fresh(f"{layer.node_output}_lowrank_hidden")
        output = layer.node_output if factors.shift is None else editor.fresh(f"{layer.node_output}_unshifted")
        nodes = [editor.make_node("Einsum", [node.input[0], encoder], [hidden], f"{layer.name}/lowrank_encoder",
                                  equation="...i,ir->...r"),
                 editor.make_node("Einsum", [hidden, decoder], [output], f"{layer.name}/lowrank_decoder",
                                  equation="...r,ro->...o")]
        if factors.shift is not None:
            nodes.append(editor.output_shift(output, layer.node_output, factors.shift, layer))
        editor.replace([node], nodes)
        editor.remove_orphans([layer.weight_name])


@pytest.fixture
def einsum():
    family = register(EinsumFamily())
    try:
        yield family
    finally:
        unregister("Einsum")


def einsum_model(seed: int = 0) -> onnx.ModelProto:
    """x (2, 5, 8) -> Einsum with W (8, 6) -> Relu -> Einsum with V (6, 4) -> y (2, 5, 4)."""
    rng = np.random.default_rng(seed)
    weights = {"W": rng.standard_normal((8, 6)).astype(np.float32),
               "V": rng.standard_normal((6, 4)).astype(np.float32)}
    nodes = [helper.make_node("Einsum", ["x", "W"], ["h"], name="e1", equation="...i,io->...o"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Einsum", ["r", "V"], ["y"], name="e2", equation="...i,io->...o")]
    return make_model(nodes, [tensor("x", [2, 5, 8])], [tensor("y", [2, 5, 4])], weights)


def test_a_registered_fourth_family_is_discovered_factorized_and_counted(einsum):
    model = einsum_model()
    shapes = {"x": (2, 5, 8), "h": (2, 5, 6), "r": (2, 5, 6), "y": (2, 5, 4)}
    discovery = discover(model, shapes=shapes)
    assert [(layer.name, layer.op, layer.matrix_shape) for layer in discovery.layers] == [
        ("e1", "Einsum", (6, 8)), ("e2", "Einsum", (4, 6))]
    assert family_for("Einsum") is einsum and "Einsum" in layer_ops()
    first = discovery.layers[0]
    np.testing.assert_array_equal(first.read_matrix(), onnx.numpy_helper.to_array(model.graph.initializer[0]).T)
    assert first.output_positions == 10 and group_counts(first, 8) == [1]
    assert model_flops(model, shapes) == 2 * (10 * 6 * 8 + 10 * 4 * 6)

    rewrites = [(layer, factorize(layer.read_matrix(), 1, max_rank(*layer.matrix_shape, 1)))
                for layer in discovery.layers]
    compressed, count = factorize_layers(model, rewrites)
    assert count == 2
    onnx.checker.check_model(compressed, full_check=True)
    assert [n.op_type for n in compressed.graph.node] == ["Einsum", "Einsum", "Relu", "Einsum", "Einsum"]
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    (want,), (got,) = run(model, {"x": x}), run(compressed, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_an_unregistered_family_is_no_layer_any_more():
    family = register(EinsumFamily())
    try:
        with pytest.raises(ValueError, match="taken"):
            register(EinsumFamily())
    finally:
        unregister(family.op_type)
    assert "Einsum" not in FAMILIES and "Einsum" not in layer_ops()
    assert discover(einsum_model()).layers == ()
    with pytest.raises(KeyError, match="no op family for 'Einsum'"):
        family_for("Einsum")


def test_the_built_in_families_are_registered():
    assert {"Conv", "Gemm", "MatMul"} <= set(FAMILIES)
    assert all(op == family.op_type for op, family in FAMILIES.items())


# ------------------------------------------------------------------------------------------------------- layering

LAYERS = {"graph": 0, "math": 0, "ops": 1, "passes": 2, "stages": 3}
"""The package's layers: a module may import from its own layer and the ones below, never from one above."""


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every onnx_lowrank module `path` imports, at the top or inside a function."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "onnx_lowrank":  # from onnx_lowrank import stages
                found += [(node.lineno, f"onnx_lowrank.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def _modules(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


def test_math_does_not_import_onnx():
    offending = [f"{path.relative_to(PACKAGE)}:{line} imports {module}"
                 for path in _modules("math") for line, module in _imports(path)
                 if module.split(".")[0] in ("onnx", "onnxruntime")
                 or (module.startswith("onnx_lowrank.") and module.split(".")[1] not in ("math", "errors"))]
    assert offending == []


def test_layers_import_only_downwards():
    offending = []
    for layer, rank in LAYERS.items():
        for path in _modules(layer):
            for line, module in _imports(path):
                parts = module.split(".")
                if parts[0] != "onnx_lowrank" or len(parts) < 2 or parts[1] == "errors":
                    continue
                target = LAYERS.get(parts[1])
                if target is None and rank < LAYERS["stages"]:  # the top level (test_layout checks the stages')
                    offending.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}, above every layer")
                elif target is not None and target > rank:
                    offending.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}, a layer above {layer}")
    assert offending == []
