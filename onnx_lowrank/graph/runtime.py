"""Create onnxruntime sessions from in-memory models and run them.

Every check this project makes (shapes it cannot infer, verification, latency) ends in onnxruntime on the CPU, so
session creation lives in one place: a model is handed over as bytes, or, when it is too large for one protobuf
message (2 GB hard limit; we switch at ~1.8 GB to leave headroom, counting weights still in the source model's
external data file), written with external data to a temporary directory and loaded from there. ORT errors
are turned into this project's one-line error types.

Weights stay lazy: a model loaded from a file with external data keeps its tensors as headers whose `location` is
the absolute, validated path of the data file (`load.load_model` sets it), and `tensor_array` reads one tensor's
bytes when it is asked for. A session for such a model gets the headers and the folder of the data file, and ORT
reads the weights from there as it does for a model opened by path; the writer (`save_with_external_data`) streams
each tensor into the new data file one at a time, so no step ever holds every weight at once.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_lowrank.errors import InputDataError, InvalidModelError, InvalidOptionError
from onnx_lowrank.graph.walk import subgraphs

__all__ = ["PROTOBUF_LIMIT", "RuntimeSettings", "session", "run", "model_size", "save_with_external_data", "header_copy",
           "with_outputs", "tensor_array", "external_tensors", "external_length", "external_location", "inline_copy", "is_external"]

PROTOBUF_LIMIT = 1_800_000_000
"""Bytes above which a model is passed to ORT (and shape inference) through a file with external data."""

IN_MEMORY_LIMIT = 64 << 20
"""Bytes above which a model goes to onnxruntime (and the onnx checker) as a file with external data rather than
serialized in memory: serializing copies every weight once more and the C++ side parses them into yet another copy,
while weights in a page-aligned data file are mapped by ORT (and not read at all by the checker)."""

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
    """Serialized size in bytes with every weight inline (external tensors count their stored length); models
    protobuf cannot even measure count as infinitely large."""
    inline = held_size(model)
    return inline + sum(external_length(tensor) for tensor in external_tensors(model))


def held_size(model: onnx.ModelProto) -> int:
    """Serialized size in bytes of what the model holds in memory (external weights count as their headers), to
    within a few bytes per initializer. Measured part by part: protobuf sizes a message by serializing it, which
    for a whole model would be one more copy of its weights."""
    try:
        rest = without_initializers(model).ByteSize()
        return rest + sum(tensor.ByteSize() + _FIELD_OVERHEAD for tensor in model.graph.initializer)
    except Exception:  # protobuf refuses to size messages past 2 GB on some builds
        return 1 << 62


_FIELD_OVERHEAD = 11  # an initializer's tag and length in its graph, at most (1 + a 10-byte varint)


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of `model` (initializers and attribute tensors, subgraphs included) stored as external data."""
    return (tensor for tensor in all_tensors(model.graph) if is_external(tensor))


def all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    """The tensors held in a node's attributes, those of its If/Loop/Scan bodies included."""
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.TENSOR:
            yield attribute.t
        elif attribute.type == onnx.AttributeProto.TENSORS:
            yield from attribute.tensors
    for body in subgraphs(node):
        yield from all_tensors(body)


def tensor_size(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64))


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def external_location(tensor: onnx.TensorProto) -> str:
    return _external_info(tensor).get("location", "")


def external_length(tensor: onnx.TensorProto) -> int:
    """Bytes an external tensor occupies in its data file."""
    info = _external_info(tensor)
    if "length" in info:
        return int(info["length"])
    count = int(np.prod(tensor.dims, dtype=np.int64))
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _external_bytes(tensor: onnx.TensorProto) -> bytes:
    """The stored bytes of an external tensor whose location is absolute (as `load.load_model` leaves it)."""
    info = _external_info(tensor)
    with open(info["location"], "rb") as stream:
        stream.seek(int(info.get("offset", 0)))
        data = stream.read(external_length(tensor))
    if len(data) != external_length(tensor):
        raise InvalidModelError(f"the external data of tensor {tensor.name!r} is cut short in {info['location']}; "
                                "the data file is damaged.")
    return data


def inline_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` itself when every tensor is inline, else a copy with the external tensors read in (for a model
    small enough to be one protobuf message)."""
    if not any(external_tensors(model)):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in list(external_tensors(copy)):
        _read_in(tensor)
    return copy


def _read_in(tensor: onnx.TensorProto) -> None:
    """Turn an external tensor into an inline one holding its bytes."""
    data = _external_bytes(tensor)
    tensor.ClearField("external_data")
    tensor.data_location = onnx.TensorProto.DEFAULT
    tensor.raw_data = data


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The value of `tensor`, reading its bytes from the data file when it is stored as external data; the tensor
    itself is left as it is (a header), so the model never holds the weight."""
    if not is_external(tensor):
        return onnx.numpy_helper.to_array(tensor)
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    _read_in(inline)
    return onnx.numpy_helper.to_array(inline)


_INLINE_BYTES = 1024  # tensors smaller than this stay inside the .onnx file
_ALIGNMENT = 4096  # external tensors start on page boundaries, so onnxruntime can map them
_CHUNK = 64 << 20  # bytes copied at a time from a source data file


def save_with_external_data(model: onnx.ModelProto, directory: str | Path, name: str = "model.onnx",
                            durable: bool = False) -> Path:
    """Write `model` to `directory`/`name` with every tensor of 1 KiB or more in one side file '<name>.data';
    return the model path. The caller's model is never touched. `durable` flushes both files to the disk before
    returning (for files the user keeps; a temporary copy for onnxruntime need not wait for the disk).

    The main graph's initializers are written one at a time (a tensor still in the source model's data file is
    copied from it in chunks), so memory holds at most one weight beyond what the model already holds. Attribute
    tensors (Constant nodes) and subgraph initializers are externalized in a copy of the rest of the model. The
    output is a function of the model alone: the same model gives the same bytes.
    """
    path = Path(directory) / name
    data_name = name + ".data"
    header = without_initializers(model)
    with open(Path(directory) / data_name, "wb") as data:
        for tensor in model.graph.initializer:
            header.graph.initializer.append(_stored(tensor, data, data_name))
        for node in header.graph.node:
            for tensor in _node_tensors(node):
                _externalize_in_place(tensor, data, data_name)
        _finish(data, durable)
    with open(path, "wb") as stream:
        stream.write(header.SerializeToString())
        _finish(stream, durable)
    return path


def header_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose main-graph initializers of 1 KiB or more keep their name, type and dims but not their
    bytes (marked as external data with no file): all that shape inference reads, copied without copying the
    weights. Not a model to run or save."""
    header = without_initializers(model)
    for tensor in model.graph.initializer:
        if _stays_inline(tensor):
            header.graph.initializer.append(tensor)
            continue
        stub = _without_data(tensor)
        stub.data_location = onnx.TensorProto.EXTERNAL
        header.graph.initializer.append(stub)
    return header


def without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of everything in `model` but its main graph's initializers."""
    header = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(header, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(header.graph, field, value)
    return header


def _finish(stream, durable: bool) -> None:
    stream.flush()
    if durable:
        os.fsync(stream.fileno())


def _copy_field(target, field, value) -> None:
    if field.is_repeated:
        getattr(target, field.name).extend(value)
    elif field.message_type is not None:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def _stored(tensor: onnx.TensorProto, data, data_name: str) -> onnx.TensorProto:
    """The header of `tensor` as written: its bytes appended to `data`; a small inline tensor is kept as it is."""
    if _stays_inline(tensor):
        return tensor
    header = _without_data(tensor)
    offset = _pad(data)
    if is_external(tensor):
        _copy_external(tensor, data)
    elif tensor.HasField("raw_data"):
        data.write(tensor.raw_data)
    else:  # typed fields (float_data, ...): written as the raw little-endian bytes onnx expects
        data.write(onnx.numpy_helper.to_array(tensor).astype(_little_endian(tensor)).tobytes())
    _point_to(header, data_name, offset, data.tell() - offset)
    return header


def _stays_inline(tensor: onnx.TensorProto) -> bool:
    """Small inline tensors (and strings, which have no raw layout) stay inside the .onnx file."""
    return not is_external(tensor) and (tensor.ByteSize() < _INLINE_BYTES
                                        or tensor.data_type == onnx.TensorProto.STRING)


def _without_data(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A copy of `tensor` without its values: name, type, dims, doc string."""
    header = onnx.TensorProto()
    for field, value in tensor.ListFields():
        if field.name not in _DATA_FIELDS:
            _copy_field(header, field, value)
    return header


_DATA_FIELDS = ("raw_data", "external_data", "data_location", "float_data", "int32_data", "string_data", "int64_data",
                "double_data", "uint64_data")


def _externalize_in_place(tensor: onnx.TensorProto, data, data_name: str) -> None:
    """Move a copied attribute tensor's bytes into `data` (it belongs to the header copy, so it may change)."""
    if is_external(tensor):
        offset = _pad(data)
        _copy_external(tensor, data)
    elif not _stays_inline(tensor):
        offset = _pad(data)
        data.write(tensor.raw_data if tensor.HasField("raw_data")
                   else onnx.numpy_helper.to_array(tensor).astype(_little_endian(tensor)).tobytes())
        for field in _DATA_FIELDS:
            tensor.ClearField(field)
    else:
        return
    tensor.ClearField("external_data")
    _point_to(tensor, data_name, offset, data.tell() - offset)


def _little_endian(tensor: onnx.TensorProto) -> np.dtype:
    return onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).newbyteorder("<")


def _pad(data) -> int:
    offset = data.tell()
    if offset % _ALIGNMENT:
        data.write(b"\0" * (_ALIGNMENT - offset % _ALIGNMENT))
    return data.tell()


def _copy_external(tensor: onnx.TensorProto, data) -> None:
    info = _external_info(tensor)
    remaining = external_length(tensor)
    with open(info["location"], "rb") as source:
        source.seek(int(info.get("offset", 0)))
        while remaining:
            chunk = source.read(min(remaining, _CHUNK))
            if not chunk:
                raise InvalidModelError(f"the external data of tensor {tensor.name!r} is cut short in "
                                        f"{info['location']}; the data file is damaged.")
            data.write(chunk)
            remaining -= len(chunk)


def _point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


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
) -> ort.InferenceSession:
    """A session for `model`: on the CPU with ORT_ENABLE_ALL, or as `settings` say. `optimize=False` loads faster
    and keeps every node as written — what the shape fallback wants.

    `threads` sets the intra-op thread count (None: ORT's default, one per core); `settings.threads` wins when
    given. Worker threads stop spinning at the end of each run: otherwise they spin on for ~50 ms and steal a core
    from whatever runs next (the other model of an interleaved comparison, the next layer variant, the numpy work
    between calibration batches; on YOLOv8n this alone cut the plan step from 12.5 to 8.6 s). Within a run they
    still spin, as in deployment. A model ORT refuses raises InvalidModelError with ORT's message
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
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    providers = [settings.provider] if settings.provider == DEFAULT_PROVIDER else [settings.provider, DEFAULT_PROVIDER]
    try:
        if any(external_tensors(model)) and held_size(model) <= IN_MEMORY_LIMIT:
            sess = _session_from_folder(model, options, providers)
            if sess is not None:
                return sess
        if model_size(model) <= IN_MEMORY_LIMIT:
            return ort.InferenceSession(inline_copy(model).SerializeToString(), options, providers=providers)
        # ORT maps or reads the external data while the session is created, so the directory may go right after
        # (a mapped file outlives its name).
        with tempfile.TemporaryDirectory(prefix="onnx_lowrank_") as directory:
            path = save_with_external_data(model, directory)
            return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # ORT raises its own pybind classes (Fail, InvalidGraph, NotImplemented, ...)
        raise InvalidModelError(
            f"onnxruntime cannot load the model: {_one_line(error)}; check that the model runs in onnxruntime"
        ) from error


def _session_from_folder(model: onnx.ModelProto, options: ort.SessionOptions, providers):
    """A session for a model whose external weights all live in one folder (the input model's): ORT is given the
    serialized headers with locations relative to that folder and reads the weights from there itself, as it does
    for a model loaded by path. None when the weights are spread over several folders."""
    locations = [_external_info(tensor)["location"] for tensor in external_tensors(model)]
    folder = os.path.dirname(locations[0])
    if any(os.path.dirname(location) != folder for location in locations):
        return None
    header = onnx.ModelProto()
    header.CopyFrom(model)
    for tensor in external_tensors(header):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = os.path.basename(entry.value)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    return ort.InferenceSession(header.SerializeToString(), options, providers=providers)


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
