"""Models on disk: saved whole or with their weights as external data, and file digests.

(The real models of models/manifest.json: `benchmarks.workloads.base.model_path`, in tests marked `slow` only.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx


def save(model: onnx.ModelProto, path: str | Path) -> Path:
    path = Path(path)
    path.write_bytes(model.SerializeToString())
    return path


def save_external(model: onnx.ModelProto, path: str | Path) -> Path:
    """Save a copy of `model` with every weight as external data in `<name>.data` beside it (onnx.save_model
    rewrites what it is given, so `model` itself is left as it was)."""
    path = Path(path)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)
    return path


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

