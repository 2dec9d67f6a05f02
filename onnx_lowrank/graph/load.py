"""Reading and writing model files without ever losing the user's data.

Loading accepts a path or a ModelProto. Weights stored as external data are not read: each such tensor stays a
header whose `location` is set to the absolute path of its data file, after checking that the file lies inside the
model's folder (no absolute path, no `..`, no symlink leading out) and holds the bytes the header promises; a weight
is read when its layer asks for it (`runtime.tensor_array`). A file over `LAZY_INLINE_BYTES` whose weights are inside
it is loaded the same way, its weights left in the .onnx file (`inline_weights`). The model is checked by path, which onnx can do above
the 2 GiB limit of one protobuf message. Anything that is not a well-formed ONNX model is an InvalidModelError with
one line saying what is wrong.

Saving writes into a hidden folder beside the target and renames into place, so a failure leaves no partial file;
with external data the '.data' file is moved first and the '.onnx' last, so the model file appears only when both
are complete. Hidden folders left by a run that was killed are removed by the next save into the same folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx.defs

from onnx_lowrank.graph import runtime
from onnx_lowrank.graph.walk import subgraphs
from onnx_lowrank.graph.inline_weights import load_without_weights
from onnx_lowrank.errors import InvalidModelError, InvalidOptionError

__all__ = ["load_model", "save_model", "check_output_path", "check_model", "fingerprint"]

_STAGING_PREFIX = ".onnx-lowrank-"

LAZY_INLINE_BYTES = 64 << 20
"""A model file larger than this, with its weights inside it, is loaded without them (`inline_weights`): parsed
whole, every copy made of it later (the rewritten model, a session) would copy every weight again."""


def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """The model as a ModelProto whose external weights are read on demand; a ModelProto is returned as given
    (never mutated later)."""
    if isinstance(model, onnx.ModelProto):
        _check_structure(model, "the given ModelProto")
        locations = [runtime.external_location(tensor) for tensor in runtime.external_tensors(model)]
        if locations and all(os.path.isabs(location) for location in locations):
            return model  # loaded (and checked) by load_model: its weights are still on disk
        if locations:
            raise InvalidModelError("the given ModelProto refers to external data files; pass the model's path "
                                    "instead, so they can be found.")
        try:
            check_model(model)
        except Exception as exc:
            raise InvalidModelError(f"the given ModelProto fails the ONNX checker: {_first_line(exc)}") from None
        return model
    path = Path(model)
    where = str(path)
    if path.is_dir():
        raise InvalidModelError(f"{where} is a folder, not a model file; give the path of the .onnx file.")
    if not path.is_file():
        raise InvalidModelError(f"{where}: no such model file.")
    if path.stat().st_size == 0:
        raise InvalidModelError(f"{where} is empty (0 bytes); export the model again.")
    try:
        proto = load_without_weights(path) if path.stat().st_size > LAZY_INLINE_BYTES else None
        weights_inside = proto is not None  # its external tensors are the weights left in the file itself
        if proto is None:
            proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf and onnx raise many types for a damaged file
        raise InvalidModelError(f"{where} is not a readable ONNX model, or is cut short ({_first_line(exc)}).") from None
    _check_structure(proto, where)
    folder = path.resolve().parent
    for tensor in runtime.external_tensors(proto) if not weights_inside else ():
        _locate(tensor, folder, where)
    def checker(full_check: bool) -> None:  # by path; weights left in the .onnx file would all be read by it
        if weights_inside:
            check_model(proto, full_check=full_check)
        else:
            onnx.checker.check_model(str(path), full_check=full_check)

    try:  # with shape inference: declared shapes that contradict the operators would only fail on our output
        checker(full_check=True)
    except Exception as full:
        try:  # which kind of failure: the plain checker runs only now, to name it
            checker(full_check=False)
        except Exception as exc:
            raise InvalidModelError(f"{where} fails the ONNX checker: {_first_line(exc)}") from None
        raise InvalidModelError(f"{where}: its declared shapes or types contradict its operators "
                                f"({_first_line(full)}); export it again or fix its value_info.") from None
    return proto


def _check_structure(proto: onnx.ModelProto, where: str) -> None:
    """What the checker does not say clearly: no graph at all, or a default-domain opset this onnx does not know."""
    if not proto.HasField("graph") or not proto.graph.node or proto.ir_version <= 0:
        raise InvalidModelError(f"{where} is not an ONNX model (no graph or no IR version).")
    _check_names_and_types(proto.graph, where)
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and not 1 <= opset.version <= newest:
            raise InvalidModelError(f"{where} declares ONNX opset {opset.version}, which does not exist (this onnx "
                                    f"knows 1 to {newest}); export it with an opset from 7 to {newest}.")


_KNOWN_TYPES = frozenset(onnx.TensorProto.DataType.values()) - {onnx.TensorProto.UNDEFINED}


def _check_names_and_types(graph: onnx.GraphProto, where: str) -> None:
    """Damage the checker lets through: a name that is not valid UTF-8 (protobuf hands it back as bytes) or a
    constant of an unknown data type (one flipped byte does either)."""
    names = [node.name for node in graph.node] + [name for node in graph.node for name in (*node.input, *node.output)]
    names += [value.name for value in (*graph.input, *graph.output, *graph.initializer)]
    if any(not isinstance(name, str) for name in names):
        raise InvalidModelError(f"{where}: a node or tensor name is not valid UTF-8; the file is damaged.")
    tensors = list(graph.initializer) + [attr.t for node in graph.node for attr in node.attribute
                                         if attr.type == onnx.AttributeProto.TENSOR]
    for tensor in tensors:
        if tensor.data_type not in _KNOWN_TYPES:
            raise InvalidModelError(f"{where}: tensor {tensor.name!r} has the unknown data type {tensor.data_type}; "
                                    "the file is damaged.")
    for node in graph.node:
        for sub in subgraphs(node):
            _check_names_and_types(sub, where)


def _locate(tensor: onnx.TensorProto, folder: Path, where: str) -> None:
    """Point an external tensor at the absolute path of its data file, after checking that the file is inside the
    model's folder and long enough; the tensor is left without its bytes."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    if not location or os.path.isabs(location) or ".." in Path(location).parts or location.startswith(("/", "\\")):
        raise InvalidModelError(f"{where}: weight {tensor.name!r} is stored at {location!r}, outside the model's "
                                "folder; keep external data files next to the model.")
    data_file = (folder / location).resolve()
    if not data_file.is_relative_to(folder):
        raise InvalidModelError(f"{where}: weight {tensor.name!r} is stored at {location!r}, which leads outside "
                                "the model's folder (a symbolic link); keep external data files next to the model.")
    if not data_file.is_file():
        raise InvalidModelError(f"{where}: external weight file {location!r} is missing; keep it next to the model.")
    try:
        offset, length = int(info.get("offset", 0)), runtime.external_length(tensor)
    except ValueError:
        raise InvalidModelError(f"{where}: weight {tensor.name!r} has a malformed offset or length.") from None
    if offset < 0 or length < 0 or offset + length > data_file.stat().st_size:
        raise InvalidModelError(f"{where}: external weight file {location!r} is shorter than its weights need "
                                f"(weight {tensor.name!r}); the file is truncated, copy it again.")
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = str(data_file)


def check_model(model: onnx.ModelProto, full_check: bool = False) -> None:
    """The ONNX checker on `model`: in memory when it is small and holds no external tensors, else on a copy written
    with external data (onnx checks files of any size by path, without reading the weights). Raises onnx's own
    errors: on a model we wrote, a failure is our bug, not the user's."""
    if runtime.model_size(model) <= runtime.IN_MEMORY_LIMIT and not any(runtime.external_tensors(model)):
        onnx.checker.check_model(model, full_check=full_check)
        return
    with tempfile.TemporaryDirectory(prefix="onnx_lowrank_") as directory:
        onnx.checker.check_model(str(runtime.save_with_external_data(model, directory)), full_check=full_check)


def check_output_path(output: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Validate where a model will be written before any work is done: a writable folder, a .onnx name, and not
    the input model (nor its external data file) under any spelling or symlink."""
    target = Path(output)
    if target.suffix.lower() != ".onnx":
        raise InvalidOptionError(f"output path {str(target)!r} should end in .onnx.")
    if target.is_dir():
        raise InvalidOptionError(f"output path {str(target)!r} is a folder; give a file name ending in .onnx.")
    folder = target.parent
    if not folder.is_dir():
        raise InvalidOptionError(f"output folder {str(folder)!r} does not exist; create it first.")
    if not _writable(folder):
        raise InvalidOptionError(f"output folder {str(folder)!r} is not writable; choose another folder.")
    data = target.with_name(target.name + ".data")
    written = {target.resolve(), data.resolve()}
    for source in map(Path, inputs):
        if source.resolve() in written or (source.exists() and target.exists() and source.samefile(target)):
            raise InvalidOptionError(f"output path {str(target)!r} is the input model; choose another file name.")
        for data_file in _data_files(source) if data.exists() else ():
            if data_file in written:
                raise InvalidOptionError(f"output path {str(target)!r} would overwrite {str(data_file)!r}, the "
                                         "input model's external data; choose another file name.")
    return target


def _data_files(model: Path) -> set[Path]:
    """The external data files a model file refers to (none when it cannot be read: loading will say why)."""
    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:
        return set()
    folder = model.resolve().parent
    locations = ({e.value for e in tensor.external_data if e.key == "location"}
                 for tensor in runtime.external_tensors(proto))
    return {(folder / location).resolve() for names in locations for location in names}


def _writable(folder: Path) -> bool:
    """Whether a file can be created in `folder`, by trying (permission bits do not bind root, and a read-only
    mount or a pseudo file system refuses whatever the bits say)."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=_STAGING_PREFIX):
            return True
    except OSError:
        return False


def save_model(model: onnx.ModelProto, output: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write `model` to `output` atomically. With `external_data` (default: automatically, for models too large for
    one protobuf message or whose weights are still in the input's data file) the weights go to '<name>.data'
    beside it; the same model always gives the same bytes."""
    target = Path(output)
    external = runtime.model_size(model) > runtime.PROTOBUF_LIMIT if external_data is None else external_data
    data_name = target.name + ".data"
    _remove_abandoned_staging(target.parent)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{_STAGING_PREFIX}{os.getpid()}-"))
    try:
        staged = scratch / target.name
        if external:
            runtime.save_with_external_data(model, scratch, target.name, durable=True)
            target.unlink(missing_ok=True)  # a model file never points at a half-replaced data file
            os.replace(scratch / data_name, target.parent / data_name)
        else:
            _write_inline(runtime.inline_copy(model).SerializeToString(), staged)
        os.replace(staged, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _write_inline(payload: bytes, path: Path) -> None:
    with open(path, "wb") as stream:
        stream.write(payload)
        stream.flush()
        os.fsync(stream.fileno())


def _remove_abandoned_staging(folder: Path) -> None:
    """Staging folders of earlier runs that were killed (their process is gone); a live run's folder is kept."""
    for entry in folder.glob(f"{_STAGING_PREFIX}*"):
        pid = entry.name[len(_STAGING_PREFIX):].split("-", 1)[0]
        if entry.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def fingerprint(model: onnx.ModelProto) -> str:
    """A short hash of the model's graph and every weight's values, whatever way they are stored (inline, external,
    or left in the .onnx file): what a plan records so that it is applied to the model it was made for. Weights are
    read one at a time."""
    rest = runtime.without_initializers(model)
    digest = hashlib.sha256()
    for tensor in runtime.all_tensors(rest.graph):  # Constant nodes and subgraphs: their values, not where they are
        if runtime.is_external(tensor):
            digest.update(runtime.tensor_array(tensor).tobytes())
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
    digest.update(rest.SerializeToString(deterministic=True))
    for tensor in model.graph.initializer:
        array = runtime.tensor_array(tensor)
        digest.update(f"{tensor.name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return "sha256:" + digest.hexdigest()[:32]

