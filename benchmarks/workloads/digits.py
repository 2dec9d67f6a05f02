"""The digits workload of `digits-encoder` (models/encoder.py): scikit-learn's handwritten digits the model never saw.

The model was trained on the first 1197 digits of `models/encoder.py`'s fixed permutation; the other 600 are held
out. The calibration split is the first `n_calibration` of them (128 images of 17 tokens: 2176 rows, enough to
judge the 768 channels of a feed-forward block), the evaluation split the last `n_evaluation`. One image per feed, batch 1,
as a deployed classifier runs.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .base import Sample, Workload

__all__ = ["DigitsWorkload"]

_ENCODER = Path(__file__).resolve().parents[2] / "models" / "encoder.py"


def _encoder_module():
    """models/encoder.py by file path (it needs only numpy at import): its split and preprocessing are the model's."""
    module = sys.modules.get("onnx_lowrank_models_encoder")
    if module is None:
        spec = importlib.util.spec_from_file_location("onnx_lowrank_models_encoder", _ENCODER)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class DigitsWorkload(Workload):
    """Held-out 8x8 digits; metric: top-1 agreement with the original. Extras: accuracy of candidate and original
    against the true digit, and the mean absolute difference of the softmax probabilities."""

    name: str = "digits-encoder"
    model: str = "digits-encoder"
    metric: str = "top-1 agreement vs original"
    n_calibration: int = 128
    n_evaluation: int = 400

    @cached_property
    def _held_out(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        encoder = _encoder_module()
        digits = load_digits()
        order = encoder.split(len(digits.target))[encoder.TRAIN:]
        return encoder.images(digits.data[order]), digits.target[order].astype(np.int64)

    def _build(self, split: str) -> list[Sample]:
        pixels, labels = self._held_out
        if self.n_calibration + self.n_evaluation > len(labels):
            raise ValueError(f"only {len(labels)} held-out digits for {self.n_calibration} + {self.n_evaluation}")
        chosen = range(self.n_calibration) if split == "calibration" else range(len(labels) - self.n_evaluation,
                                                                               len(labels))
        return [Sample({"pixels": pixels[i : i + 1].copy()}, int(labels[i])) for i in chosen]

    def labels(self) -> np.ndarray:
        """The true digit of each evaluation feed."""
        return np.array([s.truth for s in self._evaluation], dtype=np.int64)

    def compare(self, candidate: Sequence[np.ndarray], original: Sequence[np.ndarray]) -> dict[str, float]:
        cand = np.concatenate([np.asarray(o).reshape(-1, 10) for o in candidate])
        orig = np.concatenate([np.asarray(o).reshape(-1, 10) for o in original])
        truth = self.labels()
        return {
            "metric": float(np.mean(cand.argmax(1) == orig.argmax(1))),
            "accuracy": float(np.mean(cand.argmax(1) == truth)),
            "accuracy_original": float(np.mean(orig.argmax(1) == truth)),
            "prob_mae": float(np.mean(np.abs(_softmax(cand) - _softmax(orig)))),
        }


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
