"""Static int8's activation ranges: calibrated by each of onnxruntime's methods in `RANGES`, the one whose int8 alone
moved the outputs least on the calibration samples kept (`deployment.choose_ranges`).

The quantization is onnxruntime's, run for real; timings come from a scripted timer.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank
from onnx_lowrank.graph.inputs import Samples
from onnx_lowrank.stages.deployment import choose_ranges
from onnx_lowrank.stages.quantize import RANGES, Quantization, QuantizedTimer, plan_quantization, quantize
from onnx_lowrank.stages.verify import verify_many

from helpers.builders import build_cnn
from helpers.timers import ScriptedTimer

ROWS, FEATURES, OUTPUTS = 64, 16, 8


def _outlier_channel_model() -> onnx.ModelProto:
    """y = x W: feature 0 of x reaches y through tiny weights, so its rare spikes barely matter to y, yet a
    per-tensor range of x set by its largest value (min-max) coarsens the steps of every other feature."""
    weight = np.random.default_rng(1).standard_normal((FEATURES, OUTPUTS)).astype(np.float32)
    weight[0] *= 1e-3
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")], "outlier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, OUTPUTS])],
        [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(count: int, seed: int, spike: float | None) -> list[dict[str, np.ndarray]]:
    """`count` feeds of standard normal rows; with `spike`, one value of feature 0 in the first feed is that large
    (one value in count * ROWS * FEATURES: rarer than the 0.01% the 99.99th percentile clips)."""
    rng = np.random.default_rng(seed)
    feeds = [{"x": rng.standard_normal((ROWS, FEATURES)).astype(np.float32)} for _ in range(count)]
    if spike is not None:
        feeds[0]["x"][0, 0] = spike
    return feeds


def test_a_rare_outlier_makes_a_percentile_range_win_and_it_is_better_on_other_rows():
    model = _outlier_channel_model()
    calibration = _feeds(16, 0, spike=100.0)
    recipe, _ = plan_quantization(model, "int8", calibrated=True, upgrade=False)
    minmax = quantize(model, recipe, calibration)
    chosen, alone, errors = choose_ranges(model, recipe, calibration, minmax)
    assert set(errors) == set(RANGES) and chosen.ranges != "minmax"
    assert errors[chosen.ranges] < errors["minmax"] / 3
    assert alone.SerializeToString() == quantize(model, chosen, calibration).SerializeToString()
    held_out = _feeds(4, 1, spike=None)
    on_minmax, on_chosen = verify_many(model, [minmax, alone], held_out)
    assert on_chosen.worst_relative_l2 < on_minmax.worst_relative_l2 / 3


def test_without_outliers_min_max_is_kept_when_no_percentile_is_better():
    model = _outlier_channel_model()
    # bounded inputs: the percentiles clip nothing worth clipping; ties and near-ties go to min-max, listed first
    rng = np.random.default_rng(2)
    calibration = [{"x": rng.uniform(-1, 1, (ROWS, FEATURES)).astype(np.float32)} for _ in range(4)]
    recipe, _ = plan_quantization(model, "int8", calibrated=True, upgrade=False)
    chosen, _, errors = choose_ranges(model, recipe, calibration, quantize(model, recipe, calibration))
    assert chosen.ranges == min(RANGES, key=lambda ranges: errors[ranges])
    assert errors[chosen.ranges] <= errors["minmax"]


def test_dynamic_int8_has_no_ranges_to_choose():
    model = _outlier_channel_model()
    recipe, _ = plan_quantization(model, "int8-dynamic", calibrated=True, upgrade=False)
    alone = quantize(model, recipe)
    assert choose_ranges(model, recipe, _feeds(2, 0, None), alone) == (recipe, alone, {})


def test_the_ranges_are_in_the_description_and_the_json_but_not_in_the_timing_key():
    recipe = Quantization("static", True, "uint8", 17)
    clipped = Quantization("static", True, "uint8", 17, ranges="percentile-99.99")
    assert "min-max ranges" in recipe.describe() and "99.99th percentile" in clipped.describe()
    assert clipped.to_dict()["ranges"] == "percentile-99.99"
    assert recipe.key == clipped.key  # the scales differ, not the kernels: times are shared
    assert QuantizedTimer(None, clipped).quantization.ranges == "minmax"  # timed with the cheapest calibration


def test_percentile_ranges_are_collected_a_sample_at_a_time_and_deterministic():
    from onnx_lowrank.stages.quantize import _reader

    feeds = _feeds(3, 0, None)
    read = []
    samples = Samples("files", 3, lambda: (read.append(i) or feeds[i] for i in range(3)))
    reader = _reader(samples)  # onnxruntime's strided collection asks its length, then one range at a time
    assert len(reader) == 3
    reader.set_range(0, 1)
    assert np.array_equal(reader.get_next()["x"], feeds[0]["x"]) and reader.get_next() is None
    assert read == [0]  # streamed: nothing read ahead of what was asked
    reader.set_range(1, 2)
    assert np.array_equal(reader.get_next()["x"], feeds[1]["x"]) and reader.get_next() is None
    with pytest.raises(ValueError, match="in order"):
        reader.set_range(0, 1)
    model = build_cnn()
    recipe, _ = plan_quantization(model, "int8", calibrated=True, upgrade=False)
    clipped = replace(recipe, ranges="percentile-99.999")
    calibration = [{"x": np.random.default_rng(i).standard_normal((1, 3, 16, 16)).astype(np.float32)}
                   for i in range(6)]
    first, second = quantize(model, clipped, calibration), quantize(model, clipped, calibration)
    assert first.SerializeToString() == second.SerializeToString()
    assert first.SerializeToString() != quantize(model, recipe, calibration).SerializeToString()


def test_compress_with_quantize_reports_the_ranges_it_chose():
    rng = np.random.default_rng(0)
    calibration = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(8)]
    _, report = onnx_lowrank.compress(build_cnn(), 0.6, calibration=calibration, quantize="int8",
                                      timer=ScriptedTimer())
    summary = json.loads(json.dumps(report.to_dict()))["deployment"]
    errors = summary["range_errors"]
    assert set(errors) == set(RANGES)
    assert summary["quantization"]["ranges"] == min(RANGES, key=lambda ranges: errors[ranges])


def test_min_max_collected_a_sample_at_a_time_gives_the_bytes_of_one_pass(monkeypatch):
    from onnx_lowrank.stages import quantize as quantize_module

    model = build_cnn()
    recipe, _ = plan_quantization(model, "int8", calibrated=True, upgrade=False)
    calibration = [{"x": np.random.default_rng(i).standard_normal((1, 3, 16, 16)).astype(np.float32)}
                   for i in range(5)]
    strided = quantize(model, recipe, calibration)
    real = quantize_module._calibration_method
    monkeypatch.setattr(quantize_module, "_calibration_method", lambda ranges: (real(ranges)[0], {}))
    assert quantize(model, recipe, calibration).SerializeToString() == strided.SerializeToString()
