"""Load a model whose weights are stored inline without holding them: each large weight stays in the .onnx file.

A model below 2 GB is usually one protobuf message with every weight inside it (`raw_data` of each initializer).
Parsed whole, it holds all of its weights in memory, and protobuf keeps them until the whole message is freed, so
every copy made on the way (the rewritten model, a session) adds another. Instead the file is read field by field
(the protobuf wire format: a varint tag, then a varint, a fixed 4 or 8 bytes, or a length and that many bytes): the
graph's initializers lose their `raw_data` of 1 KiB or more, which is skipped without being read, and each such
tensor is marked as external data at its own offset in the .onnx file. The result is the lazily loaded model that a
file with external data gives (see `load`): a weight is read when its layer needs it, and the file it is read from
is the one the user gave.

Anything this reader does not expect (a field repeated where onnx writes it once, a group, a weight already stored
in another file) makes it return None, and the caller parses the file whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import onnx

from onnx_lowrank.graph.runtime import external_tensors

__all__ = ["load_without_weights"]

_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_RAW_DATA = 9  # TensorProto.raw_data
_TENSOR_EXTERNAL_DATA = 13  # TensorProto.external_data
_TENSOR_DATA_LOCATION = 14  # TensorProto.data_location (1: EXTERNAL)
_LENGTH_DELIMITED = 2
_SMALLEST_SKIPPED = 1024  # smaller weights stay inline, as `runtime.save_with_external_data` keeps them


class _Unexpected(Exception):
    """The file is not laid out the way this reader handles: parse it whole instead."""


def load_without_weights(path: str | Path) -> onnx.ModelProto | None:
    """The model in `path` with every initializer's raw_data of 1 KiB or more left in the file, the tensor pointing
    at it as external data (absolute location, offset, length); None when the file is laid out in a way this reader
    does not handle. A damaged file raises ValueError, or what onnx's parser raises."""
    path = Path(path).resolve()
    skipped: list[tuple[int, int] | None] = []  # per initializer: (offset, length) of its raw_data left in the file
    with open(path, "rb") as stream:
        end = stream.seek(0, 2)
        stream.seek(0)
        try:
            header = _model(stream, end, skipped)
        except _Unexpected:
            return None
    model = onnx.ModelProto.FromString(bytes(header))
    if len(model.graph.initializer) != len(skipped) or any(external_tensors(model)):
        return None  # some weights in other files too: those are located and checked by `load`
    for tensor, place in zip(model.graph.initializer, skipped):
        if place is not None:
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", str(path)), ("offset", str(place[0])), ("length", str(place[1]))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
    return model


def _model(stream: BinaryIO, end: int, skipped: list) -> bytearray:
    header = bytearray()
    graphs = 0
    for field, wire, start, value_start, value_end in _fields(stream, end):
        if field == _MODEL_GRAPH and wire == _LENGTH_DELIMITED:
            graphs += 1
            if graphs > 1:
                raise _Unexpected("the graph is split over several fields")
            header += _delimited(field, _graph(stream, value_start, value_end, skipped))
        else:
            header += _read(stream, start, value_end)
    return header


def _graph(stream: BinaryIO, start: int, end: int, skipped: list) -> bytearray:
    graph = bytearray()
    for field, wire, field_start, value_start, value_end in _fields(stream, end, start):
        if field == _GRAPH_INITIALIZER and wire == _LENGTH_DELIMITED:
            graph += _delimited(field, _tensor(stream, value_start, value_end, skipped))
        else:
            graph += _read(stream, field_start, value_end)
    return graph


def _tensor(stream: BinaryIO, start: int, end: int, skipped: list) -> bytearray:
    tensor = bytearray()
    place = None
    raw_fields = 0
    external = False
    for field, wire, field_start, value_start, value_end in _fields(stream, end, start):
        raw_fields += field == _TENSOR_RAW_DATA
        if field == _TENSOR_RAW_DATA and wire == _LENGTH_DELIMITED and value_end - value_start >= _SMALLEST_SKIPPED:
            place = (value_start, value_end - value_start)
            continue
        encoded = _read(stream, field_start, value_end)
        tensor += encoded
        external |= field == _TENSOR_EXTERNAL_DATA or (field == _TENSOR_DATA_LOCATION and encoded[-1] != 0)
    if raw_fields > 1 or (place is not None and external):
        raise _Unexpected("a tensor with two raw_data fields, or both inline and external")
    skipped.append(place)
    return tensor


def _fields(stream: BinaryIO, end: int, start: int | None = None):
    """(field number, wire type, start of the tag, start of the value, end of the value) of every field of the
    message between the current position (or `start`) and `end`; values are skipped, not read."""
    position = stream.tell() if start is None else start
    while position < end:
        stream.seek(position)
        tag = _varint(stream)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _varint(stream)
            value_start = value_end = stream.tell()
        elif wire == 1 or wire == 5:
            value_start = stream.tell()
            value_end = value_start + (8 if wire == 1 else 4)
        elif wire == _LENGTH_DELIMITED:
            length = _varint(stream)
            value_start = stream.tell()
            value_end = value_start + length
        else:
            raise _Unexpected(f"wire type {wire}")
        if field == 0 or value_end > end:
            raise ValueError("the file is cut short or damaged")
        yield field, wire, position, value_start, value_end
        position = value_end


def _varint(stream: BinaryIO) -> int:
    result = shift = 0
    while True:
        byte = stream.read(1)
        if not byte:
            raise ValueError("the file is cut short")
        result |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("a malformed varint")


def _read(stream: BinaryIO, start: int, end: int) -> bytes:
    stream.seek(start)
    return stream.read(end - start)


def _delimited(field: int, value: bytes | bytearray) -> bytes:
    return _encode_varint(field << 3 | _LENGTH_DELIMITED) + _encode_varint(len(value)) + bytes(value)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
