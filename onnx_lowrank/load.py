"""Reading and writing model files without ever losing the user's data.

Loading accepts a path or a ModelProto; weights stored as external data next to the model are loaded with it.
Anything that is not a well-formed ONNX model is an InvalidModelError with one line saying what is wrong.
Saving writes to a temporary file beside the target and renames it into place, so a failure leaves no partial
file, and it refuses to write over the input model.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from . import runtime
from .errors import InvalidModelError, InvalidOptionError

__all__ = ["load_model", "save_model", "check_output_path"]


def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """The model as a ModelProto with all weights loaded; a ModelProto is returned as given (never mutated later)."""
    if isinstance(model, onnx.ModelProto):
        proto = model
        where = "the given ModelProto"
    else:
        path = Path(model)
        where = str(path)
        if not path.is_file():
            raise InvalidModelError(f"{where}: no such model file.")
        try:
            proto = onnx.load(str(path), load_external_data=True)
        except FileNotFoundError as exc:
            raise InvalidModelError(
                f"{where}: external weight file {exc.filename!r} is missing; keep it next to the model."
            ) from None
        except Exception as exc:  # protobuf and onnx raise many types for a damaged file
            raise InvalidModelError(f"{where} is not a readable ONNX model ({_first_line(exc)}).") from None
    if not proto.HasField("graph") or not proto.graph.node or proto.ir_version <= 0:
        raise InvalidModelError(f"{where} is not an ONNX model (no graph or no IR version).")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise InvalidModelError(f"{where} fails the ONNX checker: {_first_line(exc)}") from None
    return proto


def check_output_path(output: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Validate where a model will be written before any work is done."""
    target = Path(output)
    if target.suffix.lower() != ".onnx":
        raise InvalidOptionError(f"output path {str(target)!r} should end in .onnx.")
    if not target.parent.is_dir():
        raise InvalidOptionError(f"output folder {str(target.parent)!r} does not exist; create it first.")
    if target.is_dir():
        raise InvalidOptionError(f"output path {str(target)!r} is a folder; give a file name ending in .onnx.")
    for source in inputs:
        if target.exists() and Path(source).exists() and target.resolve() == Path(source).resolve():
            raise InvalidOptionError(f"output path {str(target)!r} is the input model; choose another file name.")
    return target


def save_model(model: onnx.ModelProto, output: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write `model` to `output` atomically. With `external_data` (default: automatically, for models too large for
    one protobuf message) the weights go to '<name>.data' beside it."""
    target = Path(output)
    external = runtime.model_size(model) > runtime.PROTOBUF_LIMIT if external_data is None else external_data
    data_name = target.name + ".data"
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".onnx-lowrank-") as scratch:
        staged = Path(scratch) / target.name
        if external:
            runtime.save_with_external_data(model, scratch, target.name)
            os.replace(Path(scratch) / data_name, target.parent / data_name)
        else:
            staged.write_bytes(model.SerializeToString())
        os.replace(staged, target)
    return target


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
