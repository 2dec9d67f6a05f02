"""OCR workloads on the PP-OCR models of rapidocr-onnxruntime 1.4.4: text recognition, text detection, angle classifier.

Inputs are rendered text (see `render`), preprocessed the way rapidocr_onnxruntime 1.4.4 does it (read from its wheel):

* every model takes BGR (rapidocr reads images with OpenCV) scaled as (x / 255 - 0.5) / 0.5, NCHW float32;
* recognition (ch_ppocr_rec/text_recognize.py): resize to height 48 keeping the aspect ratio, width
  ceil(48 * w / h) capped at 320, right-padded with zeros to 320. Lines are rendered short enough to fit, so
  nothing is squeezed; a batch of one in rapidocr gives the same tensor. The output (1, T, 6625) is decoded by greedy
  CTC over ["blank"] + metadata_props["character"].splitlines() + [" "] (ch_ppocr_rec/utils.py CTCLabelDecode);
* angle classifier (ch_ppocr_cls/text_cls.py): the same resize to 48 x at most 192, padded to 192; labels
  ["0", "180"];
* detection (ch_ppocr_det/utils.py DetPreProcess, config limit_side_len 736, limit_type "min"): scale so the short
  side is at least 736, round each side to a multiple of 32. The output is a text probability map (1, 1, H, W);
  rapidocr binarizes it at 0.3, dilates with a 2x2 kernel, keeps regions whose mean probability is >= 0.5 and grows
  them by area * 1.6 / perimeter ("unclip"). `text_boxes` does the same for axis-aligned regions, without OpenCV.

Resizing uses Pillow's bilinear filter instead of OpenCV's, so pixels differ slightly from rapidocr's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image
from scipy import ndimage

from .base import Sample, Workload, model_path
from .metrics import MatchCounts, char_accuracy, ctc_greedy_decode, match_detections
from .render import random_text, render_line, render_page, sample_style

__all__ = [
    "normalize_bgr",
    "preprocess_line",
    "preprocess_page",
    "read_characters",
    "text_boxes",
    "RecognitionWorkload",
    "TextDetectionWorkload",
    "AngleWorkload",
]

_SPLITS = {"calibration": 0, "evaluation": 1}


def _rng(seed: int, split: str) -> np.random.Generator:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {list(_SPLITS)}; got {split!r}")
    return np.random.default_rng([seed, _SPLITS[split]])


def normalize_bgr(image: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> BGR float32 (1, 3, H, W) scaled to [-1, 1] as (x / 255 - 0.5) / 0.5."""
    bgr = np.asarray(image, dtype=np.float32)[:, :, ::-1]
    return np.ascontiguousarray(((bgr / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None], dtype=np.float32)


def preprocess_line(image: np.ndarray, width: int, height: int = 48) -> np.ndarray:
    """rapidocr's rec/cls resize_norm_img: height `height`, width ceil(height * w / h) capped at `width`, zero pad."""
    h, w = image.shape[:2]
    resized_w = min(width, math.ceil(height * w / h))
    resized = np.asarray(Image.fromarray(image).resize((resized_w, height), Image.BILINEAR))
    out = np.zeros((1, 3, height, width), dtype=np.float32)
    out[:, :, :, :resized_w] = normalize_bgr(resized)
    return out


def preprocess_page(image: np.ndarray, limit_side_len: int = 736) -> np.ndarray:
    """rapidocr's DetPreProcess with limit_type "min": short side up to `limit_side_len`, sides multiples of 32."""
    h, w = image.shape[:2]
    ratio = limit_side_len / min(h, w) if min(h, w) < limit_side_len else 1.0
    resize_h = max(32, int(round(int(h * ratio) / 32) * 32))
    resize_w = max(32, int(round(int(w * ratio) / 32) * 32))
    resized = np.asarray(Image.fromarray(image).resize((resize_w, resize_h), Image.BILINEAR))
    return normalize_bgr(resized)


def read_characters(path) -> tuple[str, ...]:
    """The CTC classes of a PP-OCR rec model: ("blank", *metadata_props["character"].splitlines(), " ")."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" not in meta:
        raise ValueError(f"{path} has no 'character' entry in metadata_props; not a rapidocr PP-OCR rec model?")
    return ("blank", *meta["character"].splitlines(), " ")


def text_boxes(prob: np.ndarray, thresh: float = 0.3, box_thresh: float = 0.5, unclip_ratio: float = 1.6,
               min_size: int = 3) -> np.ndarray:
    """Axis-aligned DB post-processing of a probability map (H, W) -> boxes (N, 4) x1, y1, x2, y2 in map pixels.

    Binarize at `thresh`, dilate 2x2, take 8-connected regions; drop those whose box has a side < `min_size` or whose
    mean probability inside the box is < `box_thresh`; grow each box by area * unclip_ratio / perimeter per side.
    """
    prob = np.asarray(prob, dtype=np.float32)
    # origin -1: grow down and right by one pixel, as cv2.dilate with a 2x2 kernel does
    mask = ndimage.binary_dilation(prob > thresh, structure=np.ones((2, 2), dtype=bool), origin=-1)
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    boxes = []
    for rows, cols in ndimage.find_objects(labels):
        h, w = rows.stop - rows.start, cols.stop - cols.start
        if min(h, w) < min_size or prob[rows, cols].mean() < box_thresh:
            continue
        grow = h * w * unclip_ratio / (2 * (h + w))
        boxes.append((cols.start - grow, rows.start - grow, cols.stop + grow, rows.stop + grow))
    return np.array(boxes, dtype=np.float64).reshape(-1, 4)


@dataclass(frozen=True)
class RecognitionWorkload(Workload):
    """Rendered single text lines; metric: character accuracy of the candidate's text against the ground truth.

    Character accuracy is 1 - edit distance / max(len) per line, averaged; leading and trailing spaces of the
    decoded text are stripped before comparing (the lines are rendered without them). Extras: the original's
    character accuracy, exact matches against the ground truth, and agreement (identical decoded text) and character
    accuracy of the candidate against the original.
    """

    name: str = "ppocrv4-rec"
    model: str = "ppocrv4-rec"
    metric: str = "char accuracy vs ground truth"
    n_calibration: int = 16
    n_evaluation: int = 48
    width: int = 320
    seed: int = 20240101

    def _build(self, split: str) -> list[Sample]:
        rng = _rng(self.seed, split)
        n = self.n_calibration if split == "calibration" else self.n_evaluation
        samples = []
        for _ in range(n):
            text, style = random_text(rng), sample_style(rng)
            image = render_line(text, style)
            while len(text) > 1 and math.ceil(48 * image.shape[1] / image.shape[0]) > self.width:
                text = text[:-1].rstrip()
                image = render_line(text, style)
            samples.append(Sample({"x": preprocess_line(image, self.width)}, text))
        return samples

    @cached_property
    def characters(self) -> tuple[str, ...]:
        """CTC classes of the original model (read from the fetched model file)."""
        return read_characters(model_path(self.model))

    def texts(self) -> list[str]:
        """Ground-truth text of each evaluation feed."""
        return [s.truth for s in self._evaluation]

    def decode(self, outputs: Sequence[np.ndarray]) -> list[str]:
        """Greedy CTC text of each (1, T, C) output."""
        return [ctc_greedy_decode(np.asarray(o)[0], self.characters) for o in outputs]

    def compare(self, candidate: Sequence[np.ndarray], original: Sequence[np.ndarray]) -> dict[str, float]:
        truths = self.texts()
        cand, orig = self.decode(candidate), self.decode(original)
        acc = [char_accuracy(c.strip(), t) for c, t in zip(cand, truths)]
        acc_orig = [char_accuracy(o.strip(), t) for o, t in zip(orig, truths)]
        return {
            "metric": float(np.mean(acc)),
            "char_accuracy_original": float(np.mean(acc_orig)),
            "exact_match": float(np.mean([c.strip() == t for c, t in zip(cand, truths)])),
            "exact_match_original": float(np.mean([o.strip() == t for o, t in zip(orig, truths)])),
            "agreement": float(np.mean([c == o for c, o in zip(cand, orig)])),
            "char_accuracy_vs_original": float(np.mean([char_accuracy(c, o) for c, o in zip(cand, orig)])),
        }


@dataclass(frozen=True)
class AngleWorkload(Workload):
    """Rendered text lines, every second one rotated by 180 degrees; metric: top-1 agreement with the original.

    Extras: accuracy of candidate and original against the true orientation, and the mean absolute difference of
    the "180" probability.
    """

    name: str = "ppocr-cls"
    model: str = "ppocr-cls"
    metric: str = "top-1 agreement vs original"
    n_calibration: int = 16
    n_evaluation: int = 64
    width: int = 192
    seed: int = 20240202

    def _build(self, split: str) -> list[Sample]:
        rng = _rng(self.seed, split)
        n = self.n_calibration if split == "calibration" else self.n_evaluation
        samples = []
        for i in range(n):
            image = render_line(random_text(rng), sample_style(rng))
            rotated = i % 2 == 1
            if rotated:
                image = np.ascontiguousarray(image[::-1, ::-1])
            samples.append(Sample({"x": preprocess_line(image, self.width)}, int(rotated)))
        return samples

    def labels(self) -> np.ndarray:
        """True class of each evaluation feed: 0 upright, 1 rotated by 180 degrees."""
        return np.array([s.truth for s in self._evaluation], dtype=np.int64)

    def compare(self, candidate: Sequence[np.ndarray], original: Sequence[np.ndarray]) -> dict[str, float]:
        cand = np.concatenate([np.asarray(o).reshape(-1, 2) for o in candidate])
        orig = np.concatenate([np.asarray(o).reshape(-1, 2) for o in original])
        truth = self.labels()
        return {
            "metric": float(np.mean(cand.argmax(1) == orig.argmax(1))),
            "accuracy": float(np.mean(cand.argmax(1) == truth)),
            "accuracy_original": float(np.mean(orig.argmax(1) == truth)),
            "prob_mae": float(np.mean(np.abs(cand[:, 1] - orig[:, 1]))),
        }


@dataclass(frozen=True)
class TextDetectionWorkload(Workload):
    """Rendered pages with lines of text at known places; metric: IoU of the (prob > 0.3) maps of candidate and
    original, pooled over pages (sum of intersections / sum of unions).

    Extras: box F1 at IoU 0.5 of `text_boxes` against the rendered line boxes, for candidate and original; box F1 of
    the candidate against the original's boxes; mean absolute difference of the probability maps.
    """

    name: str = "ppocrv4-det"
    model: str = "ppocrv4-det"
    metric: str = "mask IoU (prob > 0.3) vs original"
    n_calibration: int = 4
    n_evaluation: int = 8
    page_size: tuple[int, int] = (640, 640)
    thresh: float = 0.3
    seed: int = 20240303

    def _build(self, split: str) -> list[Sample]:
        rng = _rng(self.seed, split)
        n = self.n_calibration if split == "calibration" else self.n_evaluation
        samples = []
        for _ in range(n):
            page, boxes, _texts = render_page(rng, self.page_size)
            x = preprocess_page(page)
            scale = np.array([x.shape[3] / page.shape[1], x.shape[2] / page.shape[0]] * 2)
            samples.append(Sample({"x": x}, boxes * scale))
        return samples

    def boxes(self) -> list[np.ndarray]:
        """Ground-truth line boxes of each evaluation page, in probability-map pixels."""
        return [s.truth for s in self._evaluation]

    def compare(self, candidate: Sequence[np.ndarray], original: Sequence[np.ndarray]) -> dict[str, float]:
        inter = union = 0
        mae = []
        vs_gt, vs_gt_orig, vs_orig = MatchCounts(), MatchCounts(), MatchCounts()
        for cand, orig, truth in zip(candidate, original, self.boxes()):
            cand, orig = np.asarray(cand)[0, 0], np.asarray(orig)[0, 0]
            a, b = cand > self.thresh, orig > self.thresh
            inter += np.count_nonzero(a & b)
            union += np.count_nonzero(a | b)
            mae.append(float(np.mean(np.abs(cand - orig))))
            cand_boxes, orig_boxes = text_boxes(cand, self.thresh), text_boxes(orig, self.thresh)
            vs_gt += match_detections(cand_boxes, truth)
            vs_gt_orig += match_detections(orig_boxes, truth)
            vs_orig += match_detections(cand_boxes, orig_boxes)
        return {
            "metric": float(inter / union) if union else 1.0,
            "box_f1": vs_gt.f1,
            "box_f1_original": vs_gt_orig.f1,
            "box_f1_vs_original": vs_orig.f1,
            "prob_mae": float(np.mean(mae)),
        }

