"""Prove in onnxruntime that the compressed model computes (almost) what the original did.

Both models run on the same samples; each output is compared over all samples at once: relative L2 error
||a - b|| / ||a|| (the headline number, the same measure the budget is planned in), the largest absolute
difference, the cosine similarity, and — for outputs that are class scores — how often the top-1 class agrees,
which is what a classifier's user notices first. Errors from all samples are pooled rather than averaged per sample,
so a sample with a large output weighs in proportion to its size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from onnx_lowrank.graph import runtime
from onnx_lowrank.graph.inputs import feed_rows
from onnx_lowrank.errors import InputDataError, InvalidModelError

__all__ = ["OutputComparison", "Verification", "verify", "verify_many", "is_score_output", "class_score_outputs"]

_PROBABILITY_ATOL = 1e-3


@dataclass(frozen=True)
class OutputComparison:
    """How far one output moved, pooled over every sample."""

    name: str
    relative_l2: float  # ||a - b|| / ||a||; 0 when both are zero, inf when only the reference is zero
    max_abs: float
    cosine: float  # 1 when both are zero, 0 when exactly one is
    top1_agreement: float | None  # None when the output is not a score vector

    def to_dict(self) -> dict[str, object]:
        return {key: _json_number(value) for key, value in asdict(self).items()}


@dataclass(frozen=True)
class Verification:
    """Per-output comparison of the original and compressed model, in the model's output order."""

    outputs: tuple[OutputComparison, ...]
    samples: int  # feeds run
    rows: int | None = None  # items in them (the first input's batch dimension summed over feeds)
    squares: tuple[tuple[tuple[float, float], ...], ...] = ()  # per output, per row: (||a - b||^2, ||a||^2)

    @property
    def lowest_top1_agreement(self) -> float | None:
        """The lowest top-1 agreement over the outputs that are score vectors (None when none is)."""
        return min((o.top1_agreement for o in self.outputs if o.top1_agreement is not None), default=None)

    def leave_one_out(self) -> list[float]:
        """The worst relative L2 error with each row left out in turn (what a jackknife of it is made of): every row
        of a batch is a sample (a feed whose outputs are not per row counts as one)."""
        units = len(self.squares[0]) if self.squares else 0
        if units < 2:
            return []
        totals = [(sum(d for d, _ in output), sum(r for _, r in output)) for output in self.squares]
        return [max((_relative(diff - output[i][0], ref - output[i][1])
                     for (diff, ref), output in zip(totals, self.squares)), default=0.0)
                for i in range(units)]

    def describe(self) -> str:
        """'16 samples', or '12 rows in 1 batch' when a feed holds a batch."""
        if self.rows is None or self.rows == self.samples:
            return f"{self.samples} sample{'s' if self.samples != 1 else ''}"
        return f"{self.rows} rows in {self.samples} batch{'es' if self.samples != 1 else ''}"

    @property
    def worst_relative_l2(self) -> float:
        """The largest relative L2 error over outputs (NaN if any output produced NaN; 0 with no outputs)."""
        values = [o.relative_l2 for o in self.outputs]
        if any(math.isnan(v) for v in values):
            return math.nan
        return max(values, default=0.0)

    def passed(self, max_error: float) -> bool:
        """True when every output's relative L2 error is at most `max_error` (a NaN never passes)."""
        worst = self.worst_relative_l2
        return not math.isnan(worst) and worst <= max_error

    def to_dict(self) -> dict[str, object]:
        """JSON-safe: non-finite numbers (an infinite or NaN error) become None."""
        return {
            "samples": self.samples,
            "rows": self.rows,
            "worst_relative_l2": _json_number(self.worst_relative_l2),
            "outputs": [o.to_dict() for o in self.outputs],
        }


def _relative(diff_sq: float, ref_sq: float) -> float:
    diff, ref = math.sqrt(max(diff_sq, 0.0)), math.sqrt(max(ref_sq, 0.0))
    if ref > 0:
        return diff / ref
    return 0.0 if diff == 0 else (math.nan if math.isnan(diff) else math.inf)


def _json_number(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


_SCORE_PRODUCERS = frozenset({"Softmax", "LogSoftmax"})
_PASS_THROUGH = frozenset({"Identity", "Cast"})
_SCORE_WORDS = ("logit", "prob", "score", "class", "cls")


def class_score_outputs(model: onnx.ModelProto) -> frozenset[str]:
    """Graph outputs that are class scores by the way they are computed or named: the output of a Softmax or
    LogSoftmax (through Identity or Cast), or an output whose name says logits, probabilities, scores or classes.
    A regression head's (N, 3) output is neither, so top-1 agreement is not shown for it."""
    producers = {output: node for node in model.graph.node for output in node.output}
    found = set()
    for value in model.graph.output:
        node = producers.get(value.name)
        while node is not None and node.op_type in _PASS_THROUGH and node.input:
            node = producers.get(node.input[0])
        if node is not None and node.op_type in _SCORE_PRODUCERS:
            found.add(value.name)
        elif any(word in value.name.lower() for word in _SCORE_WORDS):
            found.add(value.name)
    return frozenset(found)


def is_score_output(value: np.ndarray, class_scores: bool = False) -> bool:
    """Whether top-1 agreement means something for this output.

    An output the graph marks as class scores (`class_score_outputs`) counts when it has a class axis (last axis of
    length > 1, rank >= 2). Any other output counts only when its last axis is a probability distribution
    (non-negative, sums to 1 within 1e-3), e.g. a softmax the exporter fused away. A detector's (N, 84, anchors)
    map, a segmentation mask or three regression scores are not class scores.
    """
    if value.ndim < 2 or value.shape[-1] < 2 or value.size == 0:
        return False
    if class_scores:
        return True
    if value.dtype.kind != "f":
        return False
    if not np.all(value >= 0):  # also False on NaN
        return False
    sums = value.sum(axis=-1, dtype=np.float64)
    return bool(np.allclose(sums, 1.0, rtol=0.0, atol=_PROBABILITY_ATOL))


class _Accumulator:
    """Running sums for one output, so samples never have to be held together in memory."""

    def __init__(self, class_scores: bool = False) -> None:
        self.class_scores = class_scores  # the graph computes or names this output as class scores
        self.diff_sq = 0.0
        self.ref_sq = 0.0
        self.cmp_sq = 0.0
        self.dot = 0.0
        self.max_abs = 0.0
        self.scores = True
        self.agree = 0
        self.positions = 0
        self.squares: list[tuple[float, float]] = []  # per feed

    def add(self, reference: np.ndarray, compressed: np.ndarray, rows: int = 1) -> None:
        """One feed's outputs; `rows` > 1: its first axis holds that many samples, each squared apart."""
        a = np.asarray(reference, dtype=np.float64).reshape(max(rows, 1), -1)
        b = np.asarray(compressed, dtype=np.float64).reshape(max(rows, 1), -1)
        diff = a - b
        per_row = [(float(d @ d), float(r @ r)) for d, r in zip(diff, a)]
        self.squares.extend(per_row)
        self.diff_sq += sum(d for d, _ in per_row)
        self.ref_sq += sum(r for _, r in per_row)
        a, b, diff = a.ravel(), b.ravel(), diff.ravel()
        self.cmp_sq += float(b @ b)
        self.dot += float(a @ b)
        if diff.size:
            self.max_abs = float(np.max([self.max_abs, np.max(np.abs(diff))]))  # np.max keeps a NaN
        self.scores = self.scores and is_score_output(np.asarray(reference), self.class_scores)
        if self.scores:
            self.agree += int(np.sum(np.argmax(reference, axis=-1) == np.argmax(compressed, axis=-1)))
            self.positions += int(np.prod(reference.shape[:-1]))

    def result(self, name: str) -> OutputComparison:
        ref, cmp = math.sqrt(self.ref_sq), math.sqrt(self.cmp_sq)
        relative = _relative(self.diff_sq, self.ref_sq)
        if ref > 0 and cmp > 0:
            cosine = min(1.0, max(-1.0, self.dot / (ref * cmp)))
        elif math.isnan(ref) or math.isnan(cmp):
            cosine = math.nan
        else:
            cosine = 1.0 if ref == cmp == 0 else 0.0
        top1 = self.agree / self.positions if self.scores and self.positions else None
        return OutputComparison(name, relative, self.max_abs, cosine, top1)


def verify(
    original: onnx.ModelProto,
    compressed: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    progress: Callable[[int], None] | None = None,
) -> Verification:
    """Run both models on every feed (one session each) and compare their outputs, pooled over the feeds;
    `progress(samples done)` after each.

    The compressed model must have the original's outputs (by name) with the same shapes; otherwise the rewrite
    broke the model and InvalidModelError is raised.
    """
    return verify_many(original, [compressed], feeds, progress)[0]


def verify_many(
    original: onnx.ModelProto,
    candidates: Iterable[onnx.ModelProto],
    feeds: Iterable[Mapping[str, np.ndarray]],
    progress: Callable[[int], None] | None = None,
) -> list[Verification]:
    """`verify` for several candidates at once: the original runs once per feed."""
    reference_session = runtime.session(original)
    names = [o.name for o in reference_session.get_outputs()]
    sessions = []
    for candidate in candidates:
        sess = runtime.session(candidate)
        missing = [n for n in names if n not in {o.name for o in sess.get_outputs()}]
        if missing:
            raise InvalidModelError(
                f"The compressed model lacks output(s) {', '.join(map(repr, missing))} of the original; "
                "a rewrite must keep every graph output"
            )
        sessions.append(sess)
    scores = class_score_outputs(original)
    sums = [{name: _Accumulator(name in scores) for name in names} for _ in sessions]
    samples = 0
    rows = 0
    for feed in feeds:
        samples += 1
        batch = feed_rows(feed)
        rows += batch
        reference = runtime.run(reference_session, feed)
        # every row of a batch is a sample (jackknife, judge) when every output has it on its first axis
        split = batch if batch > 1 and all(np.ndim(reference[n]) and np.shape(reference[n])[0] == batch
                                           for n in names) else 1
        for sess, accumulators in zip(sessions, sums):
            outputs = runtime.run(sess, feed)
            for name in names:
                a, b = reference[name], outputs[name]
                if np.shape(a) != np.shape(b):
                    raise InvalidModelError(
                        f"Output {name!r} has shape {np.shape(a)} in the original but {np.shape(b)} in the "
                        "compressed model; the rewrite changed what the model computes"
                    )
                accumulators[name].add(a, b, split)
        if progress is not None:
            progress(samples)
    if not samples:
        raise InputDataError("No samples to verify on; give at least one feed (random inputs or an .npz)")
    return [Verification(tuple(acc[name].result(name) for name in names), samples, rows,
                         squares=tuple(tuple(acc[name].squares) for name in names)) for acc in sums]
