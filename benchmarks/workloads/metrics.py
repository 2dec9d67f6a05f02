"""Task metrics in plain numpy: box IoU, class-wise NMS, detection matching/F1, edit distance, CTC decoding, mask IoU,
classifier agreement.

Boxes are float arrays of shape (N, 4) in corner form ``x1, y1, x2, y2``. Nothing here imports onnx or onnxruntime.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "box_iou",
    "nms",
    "MatchCounts",
    "match_detections",
    "edit_distance",
    "char_accuracy",
    "ctc_greedy_decode",
    "mask_iou",
    "classifier_scores",
]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of corner boxes `a` (N, 4) and `b` (M, 4) -> (N, M). Empty boxes have IoU 0 with everything."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray | None = None,
        iou_threshold: float = 0.45) -> np.ndarray:
    """Greedy non-maximum suppression, per class when `classes` is given.

    Returns the indices of the kept boxes, highest score first. A box is suppressed by a higher-scoring box of the
    same class whose IoU with it is strictly greater than `iou_threshold`; ties in score keep the lower index.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    classes = np.zeros(len(scores), dtype=np.int64) if classes is None else np.asarray(classes).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    for cls in np.unique(classes):
        idx = order[classes[order] == cls]
        while idx.size:
            keep.append(int(idx[0]))
            idx = idx[1:][box_iou(boxes[idx[:1]], boxes[idx[1:]])[0] <= iou_threshold]
    keep_arr = np.array(keep, dtype=np.int64)
    return keep_arr[np.argsort(-scores[keep_arr], kind="stable")]


@dataclass(frozen=True)
class MatchCounts:
    """True/false positives and false negatives of predictions against references; they add up over images."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0  # summed IoU of the true positives

    def __add__(self, other: MatchCounts) -> MatchCounts:
        return MatchCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.iou_sum + other.iou_sum)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        """2TP / (2TP + FP + FN); 1.0 when there is nothing to find and nothing was found."""
        denom = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denom if denom else 1.0

    @property
    def mean_iou(self) -> float:
        return self.iou_sum / self.tp if self.tp else 0.0


def match_detections(pred_boxes: np.ndarray, ref_boxes: np.ndarray, pred_scores: np.ndarray | None = None,
                     pred_classes: np.ndarray | None = None, ref_classes: np.ndarray | None = None,
                     iou_threshold: float = 0.5) -> MatchCounts:
    """Match predictions to references greedily (highest score first, each reference at most once).

    A prediction is a true positive when its best still-unmatched reference of the same class has
    IoU >= `iou_threshold`; unmatched predictions are false positives, unmatched references false negatives.
    """
    pred_boxes = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
    ref_boxes = np.asarray(ref_boxes, dtype=np.float64).reshape(-1, 4)
    n_pred, n_ref = len(pred_boxes), len(ref_boxes)
    if pred_scores is None:
        pred_scores = np.zeros(n_pred)
    if (pred_classes is None) != (ref_classes is None):
        raise ValueError("give both pred_classes and ref_classes, or neither")
    if pred_classes is None:
        pred_classes, ref_classes = np.zeros(n_pred, np.int64), np.zeros(n_ref, np.int64)
    pred_classes, ref_classes = np.asarray(pred_classes).reshape(-1), np.asarray(ref_classes).reshape(-1)
    iou = box_iou(pred_boxes, ref_boxes)
    iou[pred_classes[:, None] != ref_classes[None, :]] = 0.0
    matched = np.zeros(n_ref, dtype=bool)
    tp, iou_sum = 0, 0.0
    for i in np.argsort(-np.asarray(pred_scores, dtype=np.float64), kind="stable"):
        if not n_ref:
            break
        row = np.where(matched, -1.0, iou[i])
        j = int(np.argmax(row))
        if row[j] >= iou_threshold:
            matched[j] = True
            tp += 1
            iou_sum += float(row[j])
    return MatchCounts(tp=tp, fp=n_pred - tp, fn=n_ref - tp, iou_sum=iou_sum)


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance (unit cost insert, delete, substitute) between two sequences."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_accuracy(pred: str, truth: str) -> float:
    """1 - edit_distance / max(len(pred), len(truth)), the normalized edit distance PaddleOCR reports; 1.0 for two
    empty strings."""
    longest = max(len(pred), len(truth))
    return 1.0 - edit_distance(pred, truth) / longest if longest else 1.0


def ctc_greedy_decode(probs: np.ndarray, characters: Sequence[str], blank: int = 0) -> str:
    """Best-path CTC decoding of one sequence: argmax per step, merge repeats, drop blanks.

    `probs` has shape (T, C) and `characters[c]` is the text of class c (`characters[blank]` is never emitted).
    """
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] != len(characters):
        raise ValueError(f"probs must have shape (T, {len(characters)}); got {probs.shape}")
    idx = probs.argmax(axis=1)
    keep = np.ones(len(idx), dtype=bool)
    keep[1:] = idx[1:] != idx[:-1]
    keep &= idx != blank
    return "".join(characters[i] for i in idx[keep])


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks of the same shape; 1.0 when both are empty."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"masks differ in shape: {a.shape} vs {b.shape}")
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def classifier_scores(candidate: Sequence[np.ndarray], original: Sequence[np.ndarray], truth: np.ndarray,
                      classes: int) -> dict[str, float]:
    """A classifier's logits against the original's: {"metric": top-1 agreement, "accuracy" and
    "accuracy_original" against the true classes `truth`, "prob_mae": mean absolute difference of the softmax
    probabilities}. Outputs of every feed are pooled (each reshaped to (-1, classes))."""
    cand = np.concatenate([np.asarray(o).reshape(-1, classes) for o in candidate])
    orig = np.concatenate([np.asarray(o).reshape(-1, classes) for o in original])
    return {
        "metric": float(np.mean(cand.argmax(1) == orig.argmax(1))),
        "accuracy": float(np.mean(cand.argmax(1) == truth)),
        "accuracy_original": float(np.mean(orig.argmax(1) == truth)),
        "prob_mae": float(np.mean(np.abs(_softmax(cand) - _softmax(orig)))),
    }


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
