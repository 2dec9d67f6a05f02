"""Whole models are timed at the shapes the layers are timed at. Calibrated on one batch of 16 PP-OCRv4 det pages
with --input-shape x:1x3x736x736, the layers were timed on one page and the whole models (the probes that scale every
saving, the never-slower check) on all 16; without --input-shape everything was timed on 16, 19 minutes, unsaid."""

from __future__ import annotations

import numpy as np
from helpers.builders import build_cnn
from helpers.timers import ScriptedTimer

from onnx_lowrank import api
from onnx_lowrank.stages.timing import Timings

BATCH = 8


class FeedShapes(ScriptedTimer):
    """A ScriptedTimer that also records the batch (first dimension) of every 4-D tensor fed to what it times: the
    model's input, or a layer's alone."""

    def __init__(self):
        super().__init__()
        self.batches: set[int] = set()

    def time(self, models, feeds, rounds, warmup=1, block_s=0.0) -> Timings:
        for own in feeds:
            for feed in own:
                self.batches.update(np.shape(a)[0] for a in feed.values() if np.ndim(a) == 4)
        return super().time(models, feeds, rounds, warmup, block_s)


def _batch(seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((BATCH, 3, 16, 16)).astype(np.float32)}


def test_every_model_is_timed_at_the_input_shape_asked_for(tmp_path):
    model = build_cnn(input_shape=("N", 3, 16, 16))
    timer = FeedShapes()
    _, report = api.compress(model, 0.7, calibration=[_batch(0), _batch(1)], inputs=[_batch(2)],
                             input_shapes={"x": (1, 3, 16, 16)}, timer=timer, latency_cache=tmp_path / "c.json")
    assert report.latency is not None  # whole models were timed
    assert timer.batches == {1}  # layers alone, probes, checks: one row, as asked
    assert not any("a batch of" in note for note in report.notes)


def test_a_sample_batch_that_sets_the_shapes_is_said_with_the_flag_that_changes_it(tmp_path):
    model = build_cnn(input_shape=("N", 3, 16, 16))
    timer = FeedShapes()
    _, report = api.compress(model, 0.7, calibration=[_batch(0), _batch(1)], inputs=[_batch(2)], timer=timer,
                             latency_cache=tmp_path / "c.json")
    assert timer.batches == {BATCH}  # the first sample's shapes, for layers and whole models alike
    note = [n for n in report.notes if "a batch of" in n]
    assert note == [f"Sizes and times are those of the first sample, a batch of {BATCH}; to plan and time for one at "
                    "a time, give --input-shape x:1x3x16x16."]


def test_calibration_batches_time_one_row_when_the_model_fixes_the_rest(tmp_path):
    # only the batch is free: the shapes are the model's with batch 1, and so is the timing feed (its first row)
    model = build_cnn(input_shape=("N", 3, 16, 16))
    timer = FeedShapes()
    api.compress(model, 0.7, calibration=[_batch(0), _batch(1)], timer=timer, latency_cache=tmp_path / "c.json")
    assert timer.batches == {1}
