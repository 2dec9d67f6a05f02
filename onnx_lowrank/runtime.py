"""Create onnxruntime sessions from in-memory models and run them.

Every check this project makes (shapes it cannot infer, verification, latency) ends in onnxruntime on the CPU, so
session creation lives in one place: a model is handed over as bytes, or, when it is too large for one protobuf
message (2 GB hard limit; we switch at ~1.8 GB to leave headroom), written with external data to a temporary
directory and loaded from there. ORT errors are turned into this project's one-line error types.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InputDataError, InvalidModelError, InvalidOptionError

__all__ = ["PROTOBUF_LIMIT", "RuntimeSettings", "session", "run", "model_size", "save_with_external_data",
           "with_outputs"]

PROTOBUF_LIMIT = 1_800_000_000
"""Bytes above which a model is passed to ORT (and shape inference) through a file with external data."""

DEFAULT_PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class RuntimeSettings:
    """The session options a model will be deployed with: what latency is measured under (and cached by).

    `threads` is the intra-op thread count (None: onnxruntime's default, one per physical core); `provider` the
    execution provider; `optimization` the graph optimization level (all, extended, basic or disabled).
    """

    threads: int | None = None
    provider: str = DEFAULT_PROVIDER
    optimization: str = "all"

    def __post_init__(self) -> None:
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise InvalidOptionError(f"threads must be a whole number >= 1. Got {self.threads!r} instead.")
        if self.optimization not in _OPTIMIZATION_LEVELS:
            raise InvalidOptionError(f"The optimization level must be one of {', '.join(_OPTIMIZATION_LEVELS)}. "
                                     f"Got {self.optimization!r} instead.")
        available = ort.get_available_providers()
        if self.provider not in available:
            raise InvalidOptionError(f"The execution provider {self.provider!r} is not available in this "
                                     f"onnxruntime; choose one of {', '.join(available)}.")


_OPTIMIZATION_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ")


def _one_line(error: BaseException, limit: int = 400) -> str:
    """ORT's message on one line: its details often sit on the lines after the first ("... for the following
    indices" / "index: 1 Got: 7 Expected: 6"), so lines are joined rather than cut, and the status prefix dropped."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = _ORT_PREFIX.sub("", text).rstrip(" .") or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def model_size(model: onnx.ModelProto) -> int:
    """Serialized size in bytes; models protobuf cannot even measure count as infinitely large."""
    try:
        return model.ByteSize()
    except Exception:  # protobuf refuses to size messages past 2 GB on some builds
        return 1 << 62


def save_with_external_data(model: onnx.ModelProto, directory: str | Path, name: str = "model.onnx") -> Path:
    """Write a copy of `model` to `directory` with its large tensors in one side file; return the model path.

    `onnx.save_model(..., save_as_external_data=True)` rewrites the tensors it moves out, so it gets a copy: the
    caller's model is never touched.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    path = Path(directory) / name
    onnx.save_model(
        copy,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=name + ".data",
        size_threshold=1024,
    )
    return path


def with_outputs(model: onnx.ModelProto, names, elem_types: Mapping[str, int] | None = None) -> onnx.ModelProto:
    """A copy of `model` that also returns the intermediate tensors `names` as graph outputs (how shapes are
    measured and calibration activations captured; the caller's model is untouched).

    ORT accepts a graph output that carries only its name (it infers the type); a known element type is written
    anyway. Stale value_info of those tensors is dropped, so it cannot clash with what ORT sees.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    asked = set(names)
    kept = [value for value in graph.value_info if value.name not in asked]
    graph.ClearField("value_info")
    graph.value_info.extend(kept)
    existing = {value.name for value in graph.output}
    for name in dict.fromkeys(names):
        if name in existing:
            continue
        value = graph.output.add()
        value.name = name
        if elem_types and name in elem_types:
            value.type.tensor_type.elem_type = elem_types[name]
    return copy


def session(
    model: onnx.ModelProto,
    threads: int | None = None,
    *,
    optimize: bool = True,
    settings: RuntimeSettings | None = None,
    timing: bool = False,
) -> ort.InferenceSession:
    """A session for `model`: on the CPU with ORT_ENABLE_ALL, or as `settings` say. `optimize=False` loads faster
    and keeps every node as written — what the shape fallback wants.

    `threads` sets the intra-op thread count (None: ORT's default, one per core); `settings.threads` wins when
    given. `timing` stops the worker threads spinning at the end of each run: otherwise they spin on for ~50 ms and
    steal a core from whatever runs next (the other model of an interleaved comparison, the next layer variant).
    Within a run they still spin, as in deployment. A model ORT refuses raises InvalidModelError with ORT's message
    joined onto one line.
    """
    settings = settings or RuntimeSettings(threads=threads)
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        _OPTIMIZATION_LEVELS[settings.optimization] if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if settings.threads is not None:
        options.intra_op_num_threads = int(settings.threads)
        options.inter_op_num_threads = 1
    if timing:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    providers = [settings.provider] if settings.provider == DEFAULT_PROVIDER else [settings.provider, DEFAULT_PROVIDER]
    try:
        if model_size(model) <= PROTOBUF_LIMIT:
            return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
        # ORT reads external data while the session is created, so the directory may go right after.
        with tempfile.TemporaryDirectory(prefix="onnx_lowrank_") as directory:
            path = save_with_external_data(model, directory)
            return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # ORT raises its own pybind classes (Fail, InvalidGraph, NotImplemented, ...)
        raise InvalidModelError(
            f"onnxruntime cannot load the model: {_one_line(error)}; check that the model runs in onnxruntime"
        ) from error


def run(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run `sess` once on `feeds`; return every output by name, in the model's output order.

    Feeds ORT rejects (missing or unknown name, wrong dtype or shape) raise InputDataError; any other failure while
    running raises InvalidModelError. Both carry ORT's message, joined onto one line.
    """
    names = [output.name for output in sess.get_outputs()]
    try:
        values = sess.run(names, dict(feeds))
    except Exception as error:
        message = _one_line(error)
        # INVALID_ARGUMENT: wrong dtype/shape/name; ValueError: ORT's Python layer found a required input missing.
        bad_feed = type(error).__name__ == "InvalidArgument" or "INVALID_ARGUMENT" in str(error)
        if bad_feed or isinstance(error, ValueError):
            raise InputDataError(
                f"onnxruntime rejected the inputs: {message}; give inputs matching the model"
            ) from error
        raise InvalidModelError(f"onnxruntime failed to run the model: {message}") from error
    return dict(zip(names, values))
