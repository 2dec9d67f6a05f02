"""Data-aware compression on the real exported models: rewrites stay exact at full rank, and calibration keeps the
outputs far closer than weight-only truncation at the same size (the claim the benchmark measures in full)."""

from __future__ import annotations

import pytest

import onnx_lowrank
from benchmarks.workloads import model_path, workloads
from onnx_lowrank import Plan

MODELS = ("yolov8n-320", "ppocrv4-det", "ppocrv4-rec", "ppocr-cls")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_every_layer_at_full_rank_reproduces_the_real_model(name):
    """The cheapest guard against rewrite bugs on real graphs: data-aware factors (with bias correction) of every
    layer at full rank leave the outputs as they were."""
    workload = workloads()[name]
    path = model_path(workload.model)
    calibration = workload.calibration_feeds()[:2]
    analysis = onnx_lowrank.analyze(str(path), calibration=calibration, max_groups=1, allow_slower=True)
    full = Plan(layers={a.layer.name: (1, a.decompositions[1].max_rank) for a in analysis.layers})
    _, report = onnx_lowrank.apply(str(path), full, analysis=analysis, inputs=workload.evaluation_feeds()[:2])
    assert len(report.factorized) == len(analysis.layers) > 0
    assert report.verification.worst_relative_l2 < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolov8n-320", "ppocrv4-rec"])
def test_calibration_at_least_halves_the_output_error_of_weight_only(name):
    workload = workloads()[name]
    path = str(model_path(workload.model))
    held_out = workload.evaluation_feeds()[:8]
    _, weight = onnx_lowrank.compress(path, 0.8, weight_only=True, inputs=held_out, allow_slower=True)
    _, data = onnx_lowrank.compress(path, 0.8, calibration=workload.calibration_feeds(), inputs=held_out,
                                    allow_slower=True)
    assert data.measure == "output" and not data.in_sample
    assert abs(data.params_ratio - weight.params_ratio) < 0.01
    assert data.verification.worst_relative_l2 <= 0.5 * weight.verification.worst_relative_l2
