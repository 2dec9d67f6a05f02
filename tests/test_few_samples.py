"""Issue 19, few samples: rows of a batch count, shrinkage adapts to rows against dimensions, thin layers fall back
to weight-only and are reported, and the auto judge scores plans on rows that did not fit them."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_lowrank
from onnx_lowrank.graph import runtime
from onnx_lowrank.graph.inputs import Samples
from onnx_lowrank.math.projection import oas_intensity, shrunk_covariance
from onnx_lowrank.math.statistics import StatisticsAccumulator
from onnx_lowrank.stages import judge
from onnx_lowrank.stages.calibrate import calibrate
from onnx_lowrank.stages.verify import verify


def _low_rankish(rng, out, d, decay):
    u, _ = np.linalg.qr(rng.standard_normal((out, min(out, d))))
    v, _ = np.linalg.qr(rng.standard_normal((d, min(out, d))))
    s = np.exp(-np.arange(min(out, d)) / decay)
    return ((u * s) @ v.T).astype(np.float32)


def classifier(seed=0) -> onnx.ModelProto:
    """x (N, 64, 8) -> GlobalAveragePool -> Flatten -> Gemm 64->512 -> Relu -> Gemm 512->10 (logits)."""
    rng = np.random.default_rng(seed)
    w1 = _low_rankish(rng, 512, 64, 16.0)
    w2 = _low_rankish(rng, 10, 512, 4.0) * 8
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w1", "b1"], ["h"], transB=1, name="dense1"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], transB=1, name="dense2")]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.full(512, 0.01, np.float32), "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(10, np.float32), "b2")]
    graph = helper.make_graph(nodes, "classifier", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _batch(rng, n):
    mixing = np.random.default_rng(99).standard_normal((64, 64)) / 8
    return (rng.standard_normal((n, 8, 64)) @ mixing).transpose(0, 2, 1).astype(np.float32)


def _statistics(rows):
    accumulator = StatisticsAccumulator(rows.shape[1])
    accumulator.add(rows)
    return accumulator.result()


def test_a_batch_of_six_is_six_samples(tmp_path):
    model = classifier()
    rng = np.random.default_rng(1)
    path = tmp_path / "batch.npz"
    np.savez(path, x=_batch(rng, 6))
    samples = Samples.from_path(path, model)
    assert samples.count == 1 and samples.rows == 6
    check = verify(model, model, samples)
    assert check.describe() == "6 rows in 1 batch"
    assert len(check.leave_one_out()) == 6  # the jackknife leaves one row out
    assert samples.rows_where(lambda i: i % 2 == 0).rows == 3


def test_oas_intensity_is_high_for_few_rows_and_near_zero_for_many():
    rng = np.random.default_rng(2)
    few = _statistics(rng.standard_normal((6, 512)))
    assert oas_intensity(shrunk_covariance(few, 0.0), few.count) > 0.5
    scales = np.exp(-np.arange(8) / 2.0)
    many = _statistics(rng.standard_normal((20000, 8)) * scales)
    assert oas_intensity(shrunk_covariance(many, 0.0), many.count) < 0.01


def test_thin_layers_fall_back_to_weight_only_and_are_reported():
    model = classifier()
    feeds = [{"x": _batch(np.random.default_rng(3), 6)}]
    analysis = onnx_lowrank.analyze(model, calibration=feeds, method="lowrank", allow_slower=True)
    thin = {t.name: t for t in analysis.thin_calibration}
    assert (thin["dense1"].rows, thin["dense1"].dims, thin["dense1"].weight_only) == (6, 64, True)
    assert (thin["dense2"].rows, thin["dense2"].dims, thin["dense2"].weight_only) == (6, 512, True)
    _, report = onnx_lowrank.compress(model, 0.8, calibration=feeds, method="lowrank", allow_slower=True,
                                      verify=False)
    listed = report.to_dict()["summary"]["thin_calibration"]
    assert {entry["name"] for entry in listed} == {"dense1", "dense2"}
    # a number given by the user fixes the shrinkage: no fallback
    fixed = onnx_lowrank.analyze(model, calibration=feeds, method="lowrank", allow_slower=True, shrinkage=0.0)
    assert not any(t.weight_only for t in fixed.thin_calibration)


def _top1(model, compressed, feed):
    a, b = runtime.run(runtime.session(model), feed)["logits"], runtime.run(runtime.session(compressed), feed)["logits"]
    return float(np.mean(np.argmax(a, -1) == np.argmax(b, -1)))


def test_the_issue_scenario_in_small_keeps_top1_as_well_as_weight_only():
    model = classifier()
    rng = np.random.default_rng(4)
    calibration, disjoint = [{"x": _batch(rng, 6)}], {"x": _batch(rng, 6)}
    default, report = onnx_lowrank.compress(model, 0.8, calibration=calibration, allow_slower=True, verify=False)
    weight_only, _ = onnx_lowrank.compress(model, 0.8, weight_only=True, allow_slower=True, verify=False)
    assert report.params_ratio <= 0.8
    assert _top1(model, default, disjoint) >= _top1(model, weight_only, disjoint)


def test_the_judge_scores_on_held_out_rows_and_an_overfitted_plan_loses():
    model = classifier()
    rng = np.random.default_rng(5)
    samples = Samples.given([{"x": _batch(rng, 8)}, {"x": _batch(rng, 8)}])  # 16 rows: 4 held out
    analysis = onnx_lowrank.analyze(model, calibration=samples, method="lowrank", allow_slower=True)
    [(scored, judged, _)], where = judge._folds(model, analysis, samples)
    assert scored.rows == 4 and judged is not analysis and "held-out" in where
    held = [i for i in range(16) if judge.held_out(i)]
    everything = np.concatenate([feed["x"] for feed in samples])
    assert np.array_equal(np.concatenate([feed["x"] for feed in scored]), everything[held])
    plan = onnx_lowrank.plan(analysis, 0.8)
    assert "held-out calibration samples" in plan.notes[0]

    # what held-out scoring protects against: a plan fitted, unshrunk, on 6 rows of the 512-wide layer scores
    # best on those rows and worst on others, against the weight-only plan
    fit_rows, other = [{"x": _batch(rng, 6)}], [{"x": _batch(rng, 6)}]
    overfitted, _ = onnx_lowrank.compress(model, 0.8, calibration=fit_rows, shrinkage=0.0, method="lowrank",
                                          allocator="alds", allow_slower=True, verify=False)
    plain, _ = onnx_lowrank.compress(model, 0.8, weight_only=True, allow_slower=True, verify=False)
    assert verify(model, overfitted, fit_rows).worst_relative_l2 < verify(model, plain, fit_rows).worst_relative_l2
    assert verify(model, overfitted, other).worst_relative_l2 > verify(model, plain, other).worst_relative_l2


@pytest.mark.parametrize("rows", [6, 16])  # four folds, one split
def test_the_judge_takes_its_fit_statistics_from_the_analysis_pass(monkeypatch, rows):
    """One calibration pass: the fit rows of every fold were summed apart in the analysis' own pass (issue 20), so
    building the folds runs no pass, and their statistics are those of a pass over the fit rows alone."""
    model = classifier()
    samples = Samples.given([{"x": _batch(np.random.default_rng(8), rows)}])
    analysis = onnx_lowrank.analyze(model, calibration=samples, method="lowrank", allow_slower=True)
    chosen = [judge.FOLDS - 1] if rows >= judge.SINGLE_SPLIT_UNITS else list(range(judge.FOLDS))
    assert len(analysis.fold_statistics) == len(chosen)
    layers = [entry.layer for entry in analysis.layers]
    for collected, fold in zip(analysis.fold_statistics, chosen):
        fit = samples.rows_where(lambda i, fold=fold: i % judge.FOLDS != fold, by_row=True)
        alone = calibrate(model, layers, fit).layers
        for layer in layers:
            got, expected = collected[layer.name], alone[layer.name]
            assert got.count == expected.count
            np.testing.assert_allclose(got.gram, expected.gram, rtol=0, atol=1e-5 * np.abs(expected.gram).max())
            np.testing.assert_allclose(got.total, expected.total, rtol=0, atol=1e-5 * np.abs(expected.total).max())

    def no_pass(*args, **kwargs):
        raise AssertionError("the judge ran a calibration pass of its own")

    monkeypatch.setattr(judge, "calibrate", no_pass)
    folds, _ = judge._folds(model, analysis, samples)
    assert len(folds) == len(chosen)


# ----------------------------------------------- the fold rule, and weight-only plans among the judge's candidates


def _same_bytes(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    return a.SerializeToString() == b.SerializeToString()


@pytest.mark.parametrize("count, batch", [(1, 1), (3, 1), (1, 3)])
def test_fewer_than_four_samples_compress_from_the_weights_alone_and_say_so(count, batch):
    model = classifier()
    rng = np.random.default_rng(6)
    calibration = [{"x": _batch(rng, batch)} for _ in range(count)]
    compressed, report = onnx_lowrank.compress(model, 0.8, calibration=calibration, allow_slower=True, verify=False)
    assert report.plan.settings.weight_only and report.plan.method == "lowrank" and report.calibrated_on is None
    assert report.plan.to_dict()["settings"]["weight_only"] is True
    units = count * batch
    assert any(note.startswith(f"calibration had {units} sample") and "compressed from the weights alone; give at "
               "least 4" in note for note in report.to_dict()["summary"]["notes"])
    plain, _ = onnx_lowrank.compress(model, 0.8, weight_only=True, allow_slower=True, verify=False)
    assert _same_bytes(compressed, plain)
    again, _ = onnx_lowrank.apply(model, report.plan, calibration=calibration, verify=False)
    assert _same_bytes(again, compressed)
    assert onnx_lowrank.analyze(model, calibration=calibration, allow_slower=True).measure == "spectral"


@pytest.mark.parametrize("rows", [4, 6, 15])
def test_four_to_fifteen_samples_are_judged_in_four_folds(rows):
    model = classifier()
    samples = Samples.given([{"x": _batch(np.random.default_rng(7), rows)}])
    analysis = onnx_lowrank.analyze(model, calibration=samples, method="lowrank", allow_slower=True)
    folds, where = judge._folds(model, analysis, samples)
    assert len(folds) == judge.FOLDS and "in 4 folds" in where
    everything = np.concatenate([feed["x"] for feed in samples])
    for fold, (scored, judged, fit) in enumerate(folds):
        assert judged is not analysis
        held = [i for i in range(rows) if i % judge.FOLDS == fold]
        assert np.array_equal(np.concatenate([feed["x"] for feed in scored]), everything[held])
        # the rows that fitted the fold (and calibrate its int8 candidates with --quantize): all the others
        others = [i for i in range(rows) if i % judge.FOLDS != fold]
        assert np.array_equal(np.concatenate([feed["x"] for feed in fit]), everything[others])
    plan = onnx_lowrank.plan(analysis, 0.8)
    assert f"{rows} calibration samples in 4 folds" in plan.notes[0]


def test_a_weight_only_plan_wins_where_the_data_aware_one_overfits_and_is_written_weight_only():
    model = classifier()
    rng = np.random.default_rng(5)
    fit_rows, other = [{"x": _batch(rng, 6)}], {"x": _batch(rng, 6)}
    # unshrunk on 6 rows of a 512-wide layer: the data-aware plans overfit (test above); the judge sees it in folds
    compressed, report = onnx_lowrank.compress(model, 0.8, calibration=fit_rows, shrinkage=0.0, method="lowrank",
                                               allow_slower=True, verify=False)
    plan = report.plan
    assert plan.allocator.endswith("(weight only)") and plan.notes[0].startswith("auto: alds (weight only)")
    assert "in 4 folds" in plan.notes[0]
    assert plan.settings.weight_only and plan.method == "lowrank" and plan.to_dict()["settings"]["weight_only"]
    assert report.calibrated_on is None and report.measure == "spectral"  # the report tells what was written
    plain, _ = onnx_lowrank.compress(model, 0.8, weight_only=True, allow_slower=True, verify=False)
    assert _same_bytes(compressed, plain)
    assert _top1(model, compressed, other) >= _top1(model, plain, other)
    # apply reproduces it: from the JSON with the same samples, and with the calibrated analysis given
    reloaded = onnx_lowrank.Plan.from_dict(plan.to_dict())
    again, _ = onnx_lowrank.apply(model, reloaded, calibration=fit_rows, verify=False)
    assert _same_bytes(again, compressed)
    analysis = onnx_lowrank.analyze(model, calibration=fit_rows, shrinkage=0.0, method="lowrank", allow_slower=True)
    chosen = onnx_lowrank.plan(analysis, 0.8)
    assert chosen.settings.weight_only and dict(chosen.layers) == dict(plan.layers)
    from_analysis, _ = onnx_lowrank.apply(model, chosen, analysis=analysis, verify=False)
    assert _same_bytes(from_analysis, compressed)


def test_auto_asked_for_with_too_few_samples_says_how_many_it_needs():
    from helpers.builders import build_cnn

    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(2)]
    with pytest.raises(onnx_lowrank.InvalidOptionError, match=r"at least 4 calibration samples \(2 given"):
        onnx_lowrank.compress(build_cnn(), 0.7, calibration=feeds, allocator="auto", allow_slower=True)


def test_the_judge_fits_narrowing_on_each_folds_fit_rows_too():
    """Narrowed plans are scored on rows that did not fit them: in every fold each chain is fitted again on the
    channel statistics of the fold's fit rows (from the analysis' own pass, in parts), with the same widths offered,
    so a width's error there is what a pass over the fit rows alone gives, not the all-rows fit."""
    from helpers.builders import build_cnn

    model = build_cnn()
    rng = np.random.default_rng(9)
    samples = Samples.given([{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(8)])
    analysis = onnx_lowrank.analyze(model, calibration=samples, method="eliminate", allow_slower=True)
    assert analysis.chains and len(analysis.fold_channels) == judge.FOLDS
    folds, _ = judge._folds(model, analysis, samples)
    chains = [entry.chain for entry in analysis.chains]
    tensors = {name: chain.window for chain in chains for name in chain.fits}
    for fold, (_, judged, fit) in enumerate(folds):
        alone = calibrate(model, [c.layer for c in analysis.layers] + [r for c in chains for r in c.readers], fit,
                          tensors=tensors)
        for full, refit in zip(analysis.chains, judged.chains):
            assert [c.width for c in refit.candidates] == [c.width for c in full.candidates]
            assert refit.elimination.readers[0].statistics.count == alone.layers[full.chain.readers[0].name].count
            errors = [c.error for c in refit.candidates]
            redone = _elimination_on(full.chain, alone.layers, alone.tensors).errors([c.width for c in refit.candidates])
            np.testing.assert_allclose(errors, redone, rtol=1e-6, atol=1e-9)
        assert any(not np.allclose([c.error for c in f.candidates], [c.error for c in r.candidates])
                   for f, r in zip(analysis.chains, judged.chains) if f.candidates)


def _elimination_on(chain, statistics, channels):
    from onnx_lowrank.stages.analyze import _elimination

    return _elimination(chain, statistics, channels, False)
