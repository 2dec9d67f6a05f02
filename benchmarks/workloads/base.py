"""The `Workload` interface shared by every task, and the helpers to open and run models.

A workload owns two disjoint splits of ready-to-run inputs (calibration and evaluation) built deterministically
from material that ships with installed packages, and one `score` that compares a candidate (compressed) model with
the original model and/or the ground truth. Feeds are built on first use and cached on the instance; their arrays are
read-only, so one cached split can be handed to any number of consumers.
"""

from __future__ import annotations

import importlib.util
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np

__all__ = ["Feed", "Session", "Sample", "Workload", "open_session", "run_first_output", "model_path", "models_script"]

Feed = dict[str, np.ndarray]

_MODELS = Path(__file__).resolve().parents[2] / "models"


class Session(Protocol):
    """What `score` needs from a model: onnxruntime.InferenceSession.run."""

    def run(self, output_names: Sequence[str] | None, input_feed: Feed) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class Sample:
    """One model input and what is known about it (ground-truth text, boxes, orientation; None if nothing)."""

    feed: Feed
    truth: Any = None


def _freeze(feed: Feed) -> Feed:
    for array in feed.values():
        array.setflags(write=False)
    return feed


@dataclass(frozen=True)
class Workload(ABC):
    """A task on one model of models/manifest.json with a calibration split, an evaluation split and a metric.

    Subclasses implement `_build(split)` (deterministic: the split name picks the seeds) and `compare`.
    """

    name: str
    model: str
    metric: str

    @abstractmethod
    def _build(self, split: str) -> list[Sample]:
        """Build the samples of split "calibration" or "evaluation"."""

    @abstractmethod
    def compare(self, candidate: Sequence[np.ndarray], original: Sequence[np.ndarray]) -> dict[str, float]:
        """Score the candidate's first outputs on the evaluation feeds against the original's.

        Returns {"metric": main value, ...extras}; every value is a plain float.
        """

    @cached_property
    def _calibration(self) -> list[Sample]:
        return [Sample(_freeze(s.feed), s.truth) for s in self._build("calibration")]

    @cached_property
    def _evaluation(self) -> list[Sample]:
        return [Sample(_freeze(s.feed), s.truth) for s in self._build("evaluation")]

    def calibration_feeds(self) -> list[Feed]:
        """Inputs for calibration (activation statistics, data-aware rank choice); disjoint from evaluation."""
        return [dict(s.feed) for s in self._calibration]

    def evaluation_feeds(self) -> list[Feed]:
        """Inputs on which `score` runs both models."""
        return [dict(s.feed) for s in self._evaluation]

    def with_calibration(self, count: int) -> "Workload":
        """The same workload with at least `count` calibration samples, whose first ones are this workload's (the
        evaluation split unchanged): what a study of the number of calibration samples takes prefixes of."""
        return replace(self, n_calibration=max(self.n_calibration, count))

    def with_evaluation(self, count: int) -> "Workload":
        """The same workload with at least `count` evaluation samples, holding this workload's (calibration
        unchanged): a metric decided within 0.01 needs more than the sweep's default split (PP-OCRv4 rec's int8 goal
        row on 48 lines was 0.033 short on 192)."""
        return replace(self, n_evaluation=max(self.n_evaluation, count))

    def outputs(self, session: Session) -> list[np.ndarray]:
        """The first output of `session` on every evaluation feed (compute it once for the original in a sweep)."""
        return run_first_output(session, self.evaluation_feeds())

    def score(self, candidate: Session, original: Session | Sequence[np.ndarray]) -> dict[str, float]:
        """Run the candidate (and the original, unless its `outputs` are given) on the evaluation split and compare.

        >>> wl = workloads()["ppocr-cls"]                                           # doctest: +SKIP
        >>> wl.score(open_session(compressed), open_session(fetch("ppocr-cls")))    # doctest: +SKIP
        {'metric': 1.0, 'accuracy': 0.984375, 'accuracy_original': 0.984375, ...}
        """
        reference = list(original) if isinstance(original, Sequence) else self.outputs(original)
        return self.compare(self.outputs(candidate), reference)


def run_first_output(session: Session, feeds: Sequence[Feed]) -> list[np.ndarray]:
    """`session.run(None, feed)[0]` for each feed."""
    return [session.run(None, feed)[0] for feed in feeds]


def open_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU InferenceSession for `path` (warnings silenced; `threads` caps intra-op threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def models_script(stem: str):
    """models/<stem>.py, loaded by file path as module onnx_lowrank_models_<stem>: `models` is not a package, and
    a same-named one elsewhere on sys.path must not win. The build scripts need only numpy at import, so their
    data generators and splits serve the workloads without torch."""
    name = f"onnx_lowrank_models_{stem}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, _MODELS / f"{stem}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


def _fetch_module():
    """models/fetch.py (see `models_script`)."""
    return models_script("fetch")


def model_path(name: str, dest: str | Path | None = None) -> Path:
    """The verified .onnx file of manifest model `name`, fetched by models/fetch.py if it is not cached yet."""
    return _fetch_module().fetch(name, dest)
