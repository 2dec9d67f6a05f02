"""Benchmark workloads: real task metrics for the pretrained models of models/manifest.json, from offline material.

Each `Workload` has a calibration split and a disjoint evaluation split of onnxruntime feeds (dicts input name ->
numpy array), built deterministically on first use, and `score(candidate, original)` that runs both sessions on the
evaluation split and returns {"metric": main value, ...extras}.

>>> from benchmarks.workloads import workloads, open_session, model_path    # doctest: +SKIP
>>> wl = workloads()["ppocrv4-rec"]                                           # doctest: +SKIP
>>> original = open_session(model_path(wl.model))                             # doctest: +SKIP
>>> wl.score(original, original)["metric"]                                    # doctest: +SKIP
0.98...

==============  ==============  ===========================  ===============================================
name            model           main metric                  material
==============  ==============  ===========================  ===============================================
yolov8n-320     yolov8n-320     box F1@0.5 vs original       scikit-image photos and LFW face mosaics
ppocrv4-det     ppocrv4-det     mask IoU (prob > 0.3) vs     rendered pages, known line boxes
                                original
ppocrv4-rec     ppocrv4-rec     char accuracy vs ground      rendered text lines, known strings
                                truth
ppocr-cls       ppocr-cls       top-1 agreement vs original  rendered lines, half rotated by 180
digits-encoder  digits-encoder  top-1 agreement vs original  scikit-learn digits the model was not trained on
bytes-          bytes-          top-1 agreement vs original  generated 256-byte windows of 8 file contents,
classifier      classifier                                   held out from training
text-           text-           top-1 agreement vs original  generated token sequences (majority token),
transformer     transformer                                  held out from training
==============  ==============  ===========================  ===============================================
"""

from __future__ import annotations

from functools import cache

from .base import Feed, Sample, Session, Workload, model_path, open_session, run_first_output
from .detection import DetectionWorkload
from .digits import DigitsWorkload
from .ocr import AngleWorkload, RecognitionWorkload, TextDetectionWorkload
from .tokens import BytesWorkload, TextTransformerWorkload

__all__ = [
    "Feed",
    "Sample",
    "Session",
    "Workload",
    "DetectionWorkload",
    "TextDetectionWorkload",
    "RecognitionWorkload",
    "AngleWorkload",
    "DigitsWorkload",
    "BytesWorkload",
    "TextTransformerWorkload",
    "workloads",
    "model_path",
    "open_session",
    "run_first_output",
]


@cache
def _defaults() -> tuple[Workload, ...]:
    return (DetectionWorkload(), TextDetectionWorkload(), RecognitionWorkload(), AngleWorkload(), DigitsWorkload(),
            BytesWorkload(), TextTransformerWorkload())


def workloads() -> dict[str, Workload]:
    """The default workload of every model, by workload name. Instances are shared, so feeds are built only once."""
    return {w.name: w for w in _defaults()}
