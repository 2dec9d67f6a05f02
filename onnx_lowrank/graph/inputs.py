"""The model's inputs: what they are, which concrete shapes to run them at, and the data to feed them.

Exported vision models usually leave batch, height and width dynamic. Measuring activations, verifying and timing
all need one concrete shape per input, so: a dynamic first dimension (the batch) defaults to 1, and every other
dynamic dimension must be given by the user (`--input-shape x:1x3x640x640`); guessing an image size would silently
measure the wrong model. Data comes either as random image-like tensors or from `.npz` files keyed by input name.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from os import PathLike
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnx_lowrank.errors import InputDataError, InvalidModelError, InvalidOptionError

__all__ = [
    "InputSpec", "parse_input_shapes", "model_inputs", "resolve_shapes", "random_feeds", "load_feeds", "iter_feeds",
    "sample_files", "Samples", "samples_from", "parse_shape_specs", "feed_rows", "batch_can_be_cut", "sample_units",
]

_SHAPE_EXAMPLE = "images:1x3x640x640 (or images:1,3,640,640)"


@dataclass(frozen=True)
class InputSpec:
    """One real graph input. `shape` holds None for each dynamic dimension; it is None when the rank is unknown."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None

    @property
    def dynamic_positions(self) -> tuple[int, ...]:
        return tuple(i for i, d in enumerate(self.shape or ()) if d is None)


def _format_dims(dims: Iterable[object]) -> str:
    return "x".join(str(d) for d in dims)


def parse_input_shapes(specs: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse CLI strings `NAME:1x3x320x320` or `NAME:1,3,320,320` into {name: shape}.

    The name is everything before the last colon, so TensorFlow-style names such as `input:0:1x3x224x224` work.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, colon, dims_text = str(spec).strip().rpartition(":")
        name = name.strip()
        parts = re.split(r"[xX,]", dims_text.strip()) if dims_text.strip() else []
        if not colon or not name or not parts or not all(re.fullmatch(r"\s*\d+\s*", p) for p in parts):
            raise InvalidOptionError(
                f"Malformed input shape {spec!r}: expected NAME:DIMS with positive integer dims, e.g. {_SHAPE_EXAMPLE}"
            )
        dims = tuple(int(p) for p in parts)
        if any(d <= 0 for d in dims):
            raise InvalidOptionError(
                f"Input shape {spec!r} has a dimension <= 0: every dim must be a positive integer, "
                f"e.g. {_SHAPE_EXAMPLE}"
            )
        if name in shapes:
            raise InvalidOptionError(f"Input {name!r} is given two shapes ({spec!r} and an earlier one); give it once")
        shapes[name] = dims
    return shapes


def parse_shape_specs(specs: Mapping[str, Sequence[int]] | Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """Input shapes as the API takes them ({name: dims} or CLI strings) -> {name: shape}."""
    if not specs:
        return {}
    if isinstance(specs, Mapping):
        return {name: tuple(int(d) for d in dims) for name, dims in specs.items()}
    return parse_input_shapes(list(specs))


def _numpy_dtype(value: onnx.ValueInfoProto) -> np.dtype:
    if value.type.WhichOneof("value") != "tensor_type":
        raise InvalidModelError(
            f"Model input {value.name!r} is not a tensor; only models whose inputs are all tensors are supported"
        )
    elem_type = value.type.tensor_type.elem_type
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception as error:
        raise InvalidModelError(
            f"Model input {value.name!r} has element type {elem_type}, which numpy cannot represent; "
            "only numeric and bool inputs are supported"
        ) from error


def _dims(value: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    # A dim_param, a missing value, and the -1/0 some exporters write all mean "dynamic".
    return tuple(
        d.dim_value if d.WhichOneof("value") == "dim_value" and d.dim_value > 0 else None
        for d in tensor_type.shape.dim
    )


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed, in graph order (graph inputs that are also initializers are defaults, not
    inputs, and are left out)."""
    initializers = {t.name for t in model.graph.initializer}
    return [
        InputSpec(value.name, _numpy_dtype(value), _dims(value))
        for value in model.graph.input
        if value.name not in initializers
    ]


def _declared(spec: InputSpec) -> str:
    """The declared shape with '?' for dynamic dims, e.g. ?x3x?x?."""
    return _format_dims("?" if d is None else d for d in spec.shape or ())


def _placeholder(spec: InputSpec) -> list[str]:
    """The shape with static dims filled in and dynamic ones as letters (batch -> 1), for error messages."""
    shape = spec.shape or ()
    rank = len(shape)
    letters = {4: {2: "H", 3: "W"}, 5: {2: "D", 3: "H", 4: "W"}, 3: {2: "L"}}.get(rank, {})
    out = []
    for i, d in enumerate(shape):
        if d is not None:
            out.append(str(d))
        elif i == 0:
            out.append("1")
        else:
            out.append(letters.get(i, f"D{i}"))
    return out


def resolve_shapes(model: onnx.ModelProto, overrides: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """One concrete shape per real input: the override when given (checked against rank and static dims), else the
    model's static shape with a dynamic first dimension set to 1. Any other dynamic dimension must be overridden."""
    specs = model_inputs(model)
    by_name = {spec.name: spec for spec in specs}
    names = ", ".join(by_name) or "(none)"
    unknown = [name for name in overrides if name not in by_name]
    if unknown:
        raise InvalidOptionError(
            f"--input-shape names {', '.join(map(repr, unknown))}, which the model does not take; "
            f"its inputs are: {names}"
        )
    shapes: dict[str, tuple[int, ...]] = {}
    missing: list[tuple[InputSpec, list[int]]] = []  # every input still needing a size, to name them all at once
    for spec in specs:
        if spec.name in overrides:
            shapes[spec.name] = _checked_override(spec, overrides[spec.name])
            continue
        if spec.shape is None:
            missing.append((spec, []))
            continue
        dynamic = [i for i in spec.dynamic_positions if i != 0]
        if dynamic:
            missing.append((spec, dynamic))
            continue
        shapes[spec.name] = tuple(1 if d is None else d for d in spec.shape)
    if missing:
        raise InvalidOptionError(_missing_shapes_message(missing))
    return shapes


def assumed_sizes_note(model: onnx.ModelProto, overrides: Mapping[str, Sequence[int]]) -> str | None:
    """One line naming the inputs whose dynamic first (batch) dimension `resolve_shapes` set to 1, and how to set
    it; None when nothing was assumed."""
    assumed = [spec for spec in model_inputs(model)
               if spec.name not in overrides and spec.shape and spec.shape[0] is None]
    if not assumed:
        return None
    shapes = " ".join(f"{spec.name}:{_format_dims(['N', *(str(d) for d in spec.shape[1:])])}" for spec in assumed)
    return (f"Assumed batch size 1 for the dynamic first dimension of {', '.join(repr(s.name) for s in assumed)} "
            f"(FLOPs, timing and random verification use it); set it with --input-shapes {shapes}, N your batch size.")


def _missing_shapes_message(missing: list[tuple[InputSpec, list[int]]]) -> str:
    """One message naming every input that needs a size, with a line ready to paste."""
    if len(missing) == 1 and missing[0][0].shape is None:
        name = missing[0][0].name
        return f"Input {name!r} has no declared shape; give one with --input-shape {name}:1x3x640x640"
    if len(missing) == 1:
        spec, dynamic = missing[0]
        placeholder = _placeholder(spec)
        letters = ", ".join(placeholder[i] for i in dynamic)
        return (f"Input {spec.name!r} has dynamic dimension(s) at position(s) {', '.join(map(str, dynamic))} "
                f"(shape {_declared(spec)}); give them with --input-shape {spec.name}:{_format_dims(placeholder)}, "
                f"replacing {letters} by the sizes you run the model at")
    described = ", ".join(f"{spec.name!r} ({_declared(spec) if spec.shape is not None else 'no declared shape'})"
                          for spec, _ in missing)
    pasteable = " ".join(f"{spec.name}:{_format_dims(_placeholder(spec)) if spec.shape is not None else '1x3x640x640'}"
                         for spec, _ in missing)
    return (f"Inputs {described} need concrete sizes; give them all with --input-shapes {pasteable}, replacing the "
            "letters by the sizes you run the model at")


def _checked_override(spec: InputSpec, dims: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in dims)
    except (TypeError, ValueError) as error:
        raise InvalidOptionError(
            f"Shape for input {spec.name!r} must be a sequence of integers, got {dims!r}"
        ) from error
    if any(d <= 0 for d in shape):
        raise InvalidOptionError(
            f"Shape {_format_dims(shape)} for input {spec.name!r} has a dimension <= 0; use positive sizes"
        )
    if spec.shape is None:
        return shape
    suggestion = f"{spec.name}:{_format_dims(_placeholder(spec))}"
    if len(shape) != len(spec.shape):
        raise InvalidOptionError(
            f"Shape {_format_dims(shape)} for input {spec.name!r} has rank {len(shape)} but the input has rank "
            f"{len(spec.shape)}; give all dimensions, e.g. --input-shape {suggestion}"
        )
    for i, (given, fixed) in enumerate(zip(shape, spec.shape)):
        if fixed is not None and given != fixed:
            raise InvalidOptionError(
                f"Shape {_format_dims(shape)} for input {spec.name!r} sets dimension {i} to {given} but the model "
                f"fixes it to {fixed}; only dynamic dimensions can be chosen, e.g. --input-shape {suggestion}"
            )
    return shape


def random_feeds(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]], count: int = 1, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """`count` deterministic, distinct feed dicts: floats uniform in [0, 1) like a normalised image; integers that
    index a constant table through a Gather drawn over that table's rows (token ids over the vocabulary), other
    integers 0 or 1 (masks, segment ids); bools a random mix. All-zero integer inputs made every sample the same and
    hid what real data moves. `shapes` goes through `resolve_shapes`, so fully static inputs and a dynamic batch
    need no entry."""
    if count < 1:
        raise InvalidOptionError(f"The number of random samples must be at least 1, got {count}")
    resolved = resolve_shapes(model, shapes)
    specs = model_inputs(model)
    rng = np.random.default_rng(seed)
    upper = _gather_table_sizes(model)
    feeds = []
    for _ in range(count):
        feed = {}
        for spec in specs:
            shape = resolved[spec.name]
            if spec.dtype.kind == "f":
                feed[spec.name] = rng.random(shape).astype(spec.dtype)  # drawn in float64: same values for any dtype
            elif spec.dtype.kind == "b":
                feed[spec.name] = rng.random(shape) < 0.5
            elif spec.dtype.kind in "iu":
                feed[spec.name] = rng.integers(0, upper.get(spec.name, 2), size=shape).astype(spec.dtype)
            else:
                raise InvalidModelError(
                    f"Input {spec.name!r} has dtype {spec.dtype}, for which no random data can be made; "
                    "give real samples"
                )
        feeds.append(feed)
    return feeds


def _gather_table_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Graph input -> the number of rows of the constant table it indexes directly (Gather indices), the smallest
    when it indexes several: the range where random indices stay valid."""
    tables = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                tables[node.output[0]] = tuple(value.dims)
    sizes: dict[str, int] = {}
    inputs = {value.name for value in model.graph.input}
    for node in model.graph.node:
        if node.op_type != "Gather" or len(node.input) < 2 or node.input[1] not in inputs:
            continue
        dims = tables.get(node.input[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if dims and -len(dims) <= axis < len(dims) and dims[axis] > 0:
            sizes[node.input[1]] = min(sizes.get(node.input[1], dims[axis]), int(dims[axis]))
    return sizes


def load_feeds(path: str | Path, model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """Samples from disk, checked against the model: every sample of `iter_feeds`, in memory at once."""
    return list(iter_feeds(path, model))


def sample_files(path: str | Path, model: onnx.ModelProto) -> list[Path]:
    """The .npz files behind `path`: the file itself, or every .npz of a directory in file-name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".npz" and p.is_file())
        if not files:
            names = ", ".join(s.name for s in model_inputs(model))
            raise InputDataError(
                f"Directory {path} holds no .npz files; put one sample per .npz file there, keyed by input name "
                f"({names})"
            )
        return files
    if path.is_file():
        if path.suffix != ".npz":
            raise InputDataError(f"{path} is not an .npz file; give an .npz keyed by input name or a directory of them")
        return [path]
    raise InputDataError(f"{path} does not exist; give an .npz file keyed by input name or a directory of them")


def iter_feeds(path: str | Path, model: onnx.ModelProto) -> Iterator[dict[str, np.ndarray]]:
    """Samples from disk, checked against the model, read one file at a time (calibration streams them).

    `path` is either one `.npz` whose keys are the input names, each array holding a whole batch (one feed dict),
    or a directory of `.npz` files, one sample each, taken in file-name order (one feed dict per file). Dynamic
    dimensions may differ between files (OCR lines of different widths). Floats are cast to the model's float
    dtype; integers of another width are cast when no value changes; any other dtype mismatch is an error.
    """
    specs = model_inputs(model)
    for file in sample_files(path, model):
        yield _check_sample(file, _read_npz(file), specs)


class Samples:
    """Model inputs, one feed dict per sample, iterable any number of times.

    Samples from a folder are read one file at a time on each pass (calibration streams them, so memory does not
    grow with their number); samples given in memory are checked once against the model and kept.
    """

    def __init__(self, source: str, count: int, reader: Callable[[], Iterator[dict[str, np.ndarray]]],
                 key: tuple = ()) -> None:
        self.source = source  # a path, "random", or "given samples"
        self.count = count
        self.key = key  # equal keys: the same samples (the files behind a path, or the very arrays given)
        self._reader = reader
        self._rows: int | None = None

    @classmethod
    def given(cls, feeds: Sequence[Mapping[str, np.ndarray]], source: str = "given samples") -> Samples:
        feeds = [dict(feed) for feed in feeds]
        key = ("memory", tuple(id(array) for feed in feeds for array in feed.values()))
        return cls(source, len(feeds), lambda: iter(feeds), key)

    @classmethod
    def from_path(cls, path: str | Path, model: onnx.ModelProto) -> Samples:
        files = sample_files(path, model)
        specs = model_inputs(model)
        key = ("files", tuple(str(f.resolve()) for f in files))
        return cls(str(path), len(files), lambda: (_check_sample(f, _read_npz(f), specs) for f in files), key)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self._reader()

    @property
    def rows(self) -> int:
        """Samples counted by row: a feed holding a batch of 6 (every input's first dimension 6) is 6 (`feed_rows`).
        Read once (a pass over the files, each dropped after use)."""
        if self._rows is None:
            self._rows = sum(feed_rows(feed) for feed in self)
        return self._rows

    def rows_where(self, keep: Callable[[int], bool], source: str | None = None, by_row: bool = True) -> Samples:
        """The samples made of the rows whose index (counted over all feeds in order, `rows`) `keep` accepts: each
        feed cut to those rows (a feed that is not a batch, `feed_rows` 1, is one row, kept or not whole). Without
        `by_row` (a model whose batch size is fixed), every feed is one unit, kept or not whole."""
        def units(feed) -> int:
            return feed_rows(feed) if by_row else 1

        def reader() -> Iterator[dict[str, np.ndarray]]:
            start = 0
            for feed in self:
                n = units(feed)
                kept = [i for i in range(n) if keep(start + i)]
                start += n
                if not kept:
                    continue
                yield feed if len(kept) == n else {name: array[kept] for name, array in feed.items()}
        total = self.rows if by_row else self.count
        kept = tuple(i for i in range(total) if keep(i))
        subset = Samples(source or self.source, len(kept), reader, ("rows", by_row, self.key, kept))
        if by_row:
            subset._rows = len(kept)
        return subset

    def __len__(self) -> int:
        return self.count

    def first_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the first sample's inputs."""
        first = next(iter(self))
        return {name: tuple(array.shape) for name, array in first.items()}


def feed_rows(feed: Mapping[str, np.ndarray]) -> int:
    """How many samples one feed holds: the common first dimension of its inputs when every input has rank >= 2
    and the same first dimension (a batch), else 1 (a lone sequence of token ids, inputs of different lengths)."""
    shapes = [np.shape(array) for array in feed.values()]
    if not shapes or any(len(shape) < 2 for shape in shapes) or len({shape[0] for shape in shapes}) != 1:
        return 1
    return max(int(shapes[0][0]), 1)


def batch_can_be_cut(model: onnx.ModelProto) -> bool:
    """Whether every input's first dimension is free, so a batch can be cut into its rows (`Samples.rows_where`)."""
    return all(spec.shape and spec.shape[0] is None for spec in model_inputs(model))


def sample_units(samples: Samples, model: onnx.ModelProto) -> int:
    """How many independent samples `samples` holds for `model`: its rows when a batch can be cut, else its feeds."""
    return samples.rows if batch_can_be_cut(model) else samples.count


def samples_from(source, model: onnx.ModelProto) -> Samples:
    """`source` as Samples: a path (.npz or folder of .npz), a list of feed dicts, or Samples already."""
    if isinstance(source, Samples):
        return source
    if isinstance(source, (str, PathLike)):
        return Samples.from_path(source, model)
    feeds = list(source)
    if not feeds:
        raise InputDataError("No samples given; give at least one feed dict (input name -> array)")
    specs = model_inputs(model)
    checked = [_check_sample(Path(f"sample {index}"), dict(feed), specs) for index, feed in enumerate(feeds)]
    return Samples.given(checked)


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    try:
        archive = np.load(file, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):  # a .npy saved under an .npz name
            raise ValueError("it holds a single array, not an .npz archive")
        with archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputDataError(
            f"Cannot read {file}: {reason}; save samples with numpy.savez(path, **{{input_name: array}})"
        ) from error


def _check_sample(file: Path, arrays: dict[str, np.ndarray], specs: list[InputSpec]) -> dict[str, np.ndarray]:
    names = [spec.name for spec in specs]
    listing = ", ".join(names)
    missing = [name for name in names if name not in arrays]
    if missing:
        raise InputDataError(
            f"{file} lacks input(s) {', '.join(map(repr, missing))}; the model's inputs are: {listing}"
        )
    extra = [key for key in arrays if key not in names]
    if extra:
        raise InputDataError(
            f"{file} has key(s) {', '.join(map(repr, extra))} that are not model inputs; "
            f"the model's inputs are: {listing}"
        )
    feed = {}
    for spec in specs:
        array = arrays[spec.name]
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise InputDataError(
                    f"{file}: input {spec.name!r} has shape {_format_dims(array.shape)} (rank {array.ndim}) but the "
                    f"model expects rank {len(spec.shape)} ({_declared(spec)})"
                )
            for i, (have, want) in enumerate(zip(array.shape, spec.shape)):
                if want is not None and have != want:
                    raise InputDataError(
                        f"{file}: input {spec.name!r} has shape {_format_dims(array.shape)} but the model fixes "
                        f"dimension {i} to {want} ({_declared(spec)})"
                    )
        feed[spec.name] = _cast(file, spec, array)
    return feed


def _cast(file: Path, spec: InputSpec, array: np.ndarray) -> np.ndarray:
    want, have = spec.dtype, array.dtype
    if have == want:
        return array
    if want.kind == "f" and have.kind == "f":
        return array.astype(want)
    if want.kind in "iu" and have.kind in "iu":
        cast = array.astype(want)
        if np.array_equal(cast, array):
            return cast
        raise InputDataError(
            f"{file}: input {spec.name!r} holds {have} values that do not fit the model's {want}; save it as {want}"
        )
    raise InputDataError(f"{file}: input {spec.name!r} holds {have} but the model expects {want}; save it as {want}")
