"""The pipeline's order is the import order: a stage imports only stages before it, and nothing below the top level
(`api`, `pipeline`, `sweep`, `cli`) imports the top level. Checked by reading every module's imports (ast)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "onnx_lowrank"

STAGES = ("parallel", "discover", "channel_sets", "calibrate", "costs", "cost_models", "latency_cache", "quantize",
          "timing", "layer_timing", "analyze", "allocate", "refit", "apply", "verify", "judge", "deployment",
          "report", "search")
"""stages/ in pipeline order: discovery, calibration, timing and costs feed the analysis; the int8 recipe is settled
before anything is timed (quantize: with --quantize every model is timed in its int8 form); the allocation plans
it; apply writes a plan, verify checks it, the judge writes and verifies several; deployment compares ours + int8
with int8 alone; the report describes one; the search writes, verifies and reports one budget after another."""

TOP = {"onnx_lowrank.api", "onnx_lowrank.pipeline", "onnx_lowrank.sweep", "onnx_lowrank.cli"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("onnx_lowrank")}


def test_every_stage_module_is_in_the_pipeline_order():
    modules = {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__"}
    assert modules == set(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_imports_only_earlier_stages(stage):
    position = STAGES.index(stage)
    for name in _imports(PACKAGE / "stages" / f"{stage}.py"):
        parts = name.split(".")
        if parts[1:2] == ["stages"] and len(parts) > 2 and parts[2] in STAGES:
            assert STAGES.index(parts[2]) < position, f"stages/{stage}.py imports the later stage {parts[2]}"


def test_nothing_below_the_top_level_imports_it():
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE and path.stem in ("api", "pipeline", "sweep", "__init__", "__main__"):
            continue
        if path.parent.name == "cli":
            continue
        for name in _imports(path):
            assert not any(name == top or name.startswith(top + ".") for top in TOP), f"{path} imports {name}"
