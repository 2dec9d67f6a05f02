"""Object detection workload on NudeNet's YOLOv8n (320 x 320, 18 classes), scored against the original model.

Images come only from files bundled inside scikit-image (no download): the photos astronaut, camera, coffee,
chelsea and rocket, and mosaics of the 25 x 25 grey face crops in ``lfw_subset`` (its first 100 entries are faces).
NudeNet's classes are body parts and exposure states; on these images the original model finds faces
(FACE_FEMALE / FACE_MALE) and little else, so most evaluation images are face mosaics, which give it several
detections each, plus augmented photos (crops, flips).

Preprocessing follows nudenet 3.4.2 (nudenet.py ``_read_image``): pad the image at the bottom and right with black to
a square, resize to 320 x 320, RGB, /255, NCHW float32. The output (1, 22, 2100) holds per anchor cx, cy, w, h in
input pixels and 18 class scores (already sigmoid). `decode` keeps anchors whose best class score is above
`conf_threshold` (0.25: nudenet keeps >= 0.2 and its NMS uses 0.25) and runs class-wise NMS at IoU 0.45.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from .base import Sample, Workload
from .metrics import MatchCounts, box_iou, match_detections, nms

__all__ = ["CLASSES", "letterbox", "face_mosaic", "photo", "augment", "Detections", "decode", "DetectionWorkload"]

CLASSES = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)

_PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket")
# lfw_subset: 100 faces then 100 non-faces. Calibration mosaics draw from the first faces, evaluation from the rest.
_CALIBRATION_FACES = range(0, 40)
_EVALUATION_FACES = range(40, 100)


def photo(name: str) -> np.ndarray:
    """A photo bundled with scikit-image as RGB uint8 (grey images are repeated over 3 channels)."""
    if name not in _PHOTOS:
        raise ValueError(f"photo must be one of {list(_PHOTOS)}; got {name!r}")
    import skimage.data

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def _lfw_faces() -> np.ndarray:
    import skimage.data

    return skimage.data.lfw_subset()[:100]


def letterbox(image: np.ndarray, size: int = 320) -> np.ndarray:
    """nudenet's preprocessing: pad bottom/right with black to a square, resize to `size`, -> (1, 3, size, size)
    float32 RGB in [0, 1]."""
    h, w = image.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, 3), dtype=np.uint8)
    square[:h, :w] = image
    resized = np.asarray(Image.fromarray(square).resize((size, size), Image.BILINEAR), dtype=np.float32)
    return np.ascontiguousarray(resized.transpose(2, 0, 1)[None] / 255.0, dtype=np.float32)


def face_mosaic(faces: np.ndarray, rng: np.random.Generator, grid: int, size: int = 320) -> np.ndarray:
    """`grid` x `grid` face crops (float grey in [0, 1]) on a grey canvas, each scaled to 70-100 % of its cell,
    jittered inside it and mirrored at random. Returns RGB uint8 (size, size, 3)."""
    cell = size // grid
    canvas = np.full((size, size), int(rng.integers(60, 200)), dtype=np.uint8)
    picks = rng.choice(len(faces), grid * grid, replace=False)
    for k, index in enumerate(picks):
        side = int(cell * rng.uniform(0.7, 1.0))
        face = Image.fromarray((np.clip(faces[index], 0, 1) * 255).astype(np.uint8)).resize((side, side),
                                                                                          Image.BILINEAR)
        face = np.asarray(face)
        if rng.random() < 0.5:
            face = face[:, ::-1]
        y = (k // grid) * cell + int(rng.integers(0, cell - side + 1))
        x = (k % grid) * cell + int(rng.integers(0, cell - side + 1))
        canvas[y:y + side, x:x + side] = face
    return np.stack([canvas] * 3, axis=-1)


def augment(image: np.ndarray, rng: np.random.Generator, min_keep: float = 0.6) -> np.ndarray:
    """A random crop keeping at least `min_keep` of each side, mirrored with probability 1/2."""
    h, w = image.shape[:2]
    ch, cw = int(h * rng.uniform(min_keep, 1.0)), int(w * rng.uniform(min_keep, 1.0))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = image[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)


@dataclass(frozen=True)
class Detections:
    """Decoded detections of one image: corner boxes (N, 4) in input pixels, scores (N,), class ids (N,)."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def decode(output: np.ndarray, conf_threshold: float = 0.25, iou_threshold: float = 0.45,
           max_detections: int = 300) -> Detections:
    """YOLOv8 output (1, 4 + C, A) -> detections after a confidence threshold and class-wise NMS."""
    rows = np.asarray(output, dtype=np.float32)[0].T  # (A, 4 + C)
    class_scores = rows[:, 4:]
    scores, classes = class_scores.max(axis=1), class_scores.argmax(axis=1)
    keep = scores > conf_threshold
    xywh, scores, classes = rows[keep, :4], scores[keep], classes[keep]
    boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], axis=1)
    kept = nms(boxes, scores, classes, iou_threshold)[:max_detections]
    return Detections(boxes[kept].astype(np.float64), scores[kept].astype(np.float64), classes[kept])


@dataclass(frozen=True)
class DetectionWorkload(Workload):
    """Photos and face mosaics; metric: F1 at IoU 0.5 (same class) of the candidate's detections against the
    original's, pooled over images.

    Extras: precision and recall against the original, mean IoU of matched boxes, mean absolute score difference of
    matched boxes, and the mean number of detections per image of both models.
    """

    name: str = "yolov8n-320"
    model: str = "yolov8n-320"
    metric: str = "box F1@0.5 vs original"
    n_mosaics_calibration: int = 12
    n_mosaics_evaluation: int = 10
    conf_threshold: float = 0.25
    iou_threshold: float = 0.45
    match_iou: float = 0.5
    seed: int = 20240404

    def with_calibration(self, count: int) -> "DetectionWorkload":
        """At least `count` calibration images: the 4 photos, then more face mosaics (the first ones unchanged)."""
        return replace(self, n_mosaics_calibration=max(self.n_mosaics_calibration, count - 4))

    def with_evaluation(self, count: int) -> "DetectionWorkload":
        """At least `count` evaluation images: the 6 photos, then more face mosaics (the first ones unchanged)."""
        return replace(self, n_mosaics_evaluation=max(self.n_mosaics_evaluation, count - 6))

    def images(self, split: str) -> list[np.ndarray]:
        """The RGB images of a split, before letterboxing."""
        if split == "calibration":
            rng = np.random.default_rng([self.seed, 0])
            photos = [photo("chelsea"), photo("rocket"), augment(photo("coffee"), rng), augment(photo("camera"), rng)]
            faces, n_mosaics = _lfw_faces()[_CALIBRATION_FACES], self.n_mosaics_calibration
        elif split == "evaluation":
            rng = np.random.default_rng([self.seed, 1])
            astronaut, camera = photo("astronaut"), photo("camera")
            photos = [astronaut, np.ascontiguousarray(astronaut[:, ::-1]), augment(astronaut, rng),
                      camera, augment(camera, rng), photo("coffee")]
            faces, n_mosaics = _lfw_faces()[_EVALUATION_FACES], self.n_mosaics_evaluation
        else:
            raise ValueError(f"split must be 'calibration' or 'evaluation'; got {split!r}")
        mosaics = [face_mosaic(faces, rng, grid=3 + k % 2) for k in range(n_mosaics)]
        return photos + mosaics

    def _build(self, split: str) -> list[Sample]:
        return [Sample({"images": letterbox(image)}) for image in self.images(split)]

    def decode(self, output: np.ndarray) -> Detections:
        return decode(output, self.conf_threshold, self.iou_threshold)

    def compare(self, candidate: Sequence[np.ndarray], original: Sequence[np.ndarray]) -> dict[str, float]:
        counts = MatchCounts()
        n_cand = n_orig = 0
        score_diffs = []
        for cand_out, orig_out in zip(candidate, original):
            cand, orig = self.decode(cand_out), self.decode(orig_out)
            n_cand, n_orig = n_cand + len(cand), n_orig + len(orig)
            counts += match_detections(cand.boxes, orig.boxes, cand.scores, cand.classes, orig.classes,
                                       self.match_iou)
            if len(cand) and len(orig):
                # score drift of each candidate box against its best same-class original box
                iou = box_iou(cand.boxes, orig.boxes) * (cand.classes[:, None] == orig.classes[None, :])
                best = iou.argmax(axis=1)
                hit = iou[np.arange(len(cand)), best] >= self.match_iou
                score_diffs.extend(np.abs(cand.scores[hit] - orig.scores[best[hit]]).tolist())
        n_images = max(len(original), 1)
        return {
            "metric": counts.f1,
            "precision": counts.precision,
            "recall": counts.recall,
            "mean_iou": counts.mean_iou,
            "score_mae": float(np.mean(score_diffs)) if score_diffs else 0.0,
            "detections_per_image": n_cand / n_images,
            "detections_per_image_original": n_orig / n_images,
        }
