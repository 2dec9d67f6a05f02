"""The digits workload of `digits-encoder` (models/encoder.py): scikit-learn's handwritten digits the model never saw.

The model was trained on the first 1197 digits of `models/encoder.py`'s fixed permutation; the other 600 are held
out. The calibration split is the first `n_calibration` of them (128 images of 17 tokens: 2176 rows, enough to
judge the 768 channels of a feed-forward block), the evaluation split the last `n_evaluation`. One image per feed, batch 1,
as a deployed classifier runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .base import Sample, Workload, models_script
from .metrics import classifier_scores

__all__ = ["DigitsWorkload"]


def _encoder_module():
    """models/encoder.py by file path (its split and preprocessing are the model's)."""
    return models_script("encoder")

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
        return classifier_scores(candidate, original, self.labels(), 10)
