"""A disk cache of measured latencies, so a second run on the same machine measures nothing again.

One JSON file maps a key to milliseconds: a number, or (version 2) the list of a variant's per-round times, whose
median is its time and whose spread the never-slower guard judges noise by. Version 1 files (numbers only) still
load; a layer whose entries lack per-round times is timed again. A key names everything the time depends on: the op and its attributes,
input and weight shapes, dtype, k and rank (or "dense"), and the environment — execution provider, optimization
level, threads, onnxruntime version and the CPU. Change any of them and the key changes, so stale entries are never
read (they are simply not found). A cache file that cannot be read or parsed is ignored with a warning and replaced
on the next write; writes go through a temporary file renamed into place, so a crash never leaves half a file.

The file is `$ONNX_LOWRANK_CACHE/latency.json`, else `$XDG_CACHE_HOME/onnx-lowrank/latency.json`, else
`~/.cache/onnx-lowrank/latency.json`.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import os
import platform
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import onnxruntime

from onnx_lowrank.graph.runtime import PROTOBUF_LIMIT, RuntimeSettings, model_size

__all__ = ["LatencyCache", "default_cache_path", "environment_key", "variant_key", "model_key"]

_FORMAT = "onnx-lowrank-latency-cache"
_VERSION = 2
_READABLE = (1, 2)


def default_cache_path() -> Path:
    if os.environ.get("ONNX_LOWRANK_CACHE"):
        return Path(os.environ["ONNX_LOWRANK_CACHE"]) / "latency.json"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "onnx-lowrank" / "latency.json"


@lru_cache(maxsize=1)
def _cpu() -> str:
    """The CPU model and the number of logical cores (platform.processor() is empty on most Linux systems)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} x{os.cpu_count()}"


def environment_key(settings: RuntimeSettings) -> dict:
    """What a measurement depends on besides the layer: where and how it ran."""
    return {
        "provider": settings.provider,
        "optimization": settings.optimization,
        "threads": settings.threads,
        "onnxruntime": onnxruntime.__version__,
        "cpu": _cpu(),
    }


def variant_key(layer_key: Mapping, form: tuple[int, int] | None, settings: RuntimeSettings,
                deployed: str | None = None) -> str:
    """A stable text key for one timed variant: the layer's description, (k, rank) or None for dense, the
    environment, and the int8 form it was timed in (`Quantization.key`; None: float). Hashed so keys stay short
    whatever the shapes."""
    text = json.dumps({"layer": layer_key, "form": list(form) if form else "dense",
                       "environment": environment_key(settings), **_deployed(deployed)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def model_key(model, input_shapes: Mapping[str, tuple[int, ...]], settings: RuntimeSettings,
              deployed: str | None = None) -> str | None:
    """A key for a whole model's time: the digest of its bytes, its input shapes, the environment and the int8
    form it was timed in (None: float); None for a model too large to serialize in one message (it is then timed
    every run)."""
    if model_size(model) > PROTOBUF_LIMIT:
        return None
    digest = hashlib.sha256(model.SerializeToString()).hexdigest()
    text = json.dumps({"model": digest, "inputs": {k: list(map(int, v)) for k, v in sorted(input_shapes.items())},
                       "environment": environment_key(settings), **_deployed(deployed)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _deployed(deployed: str | None) -> dict:
    """The key's entry for the int8 form; none for float, so float keys are those older caches hold."""
    return {} if deployed is None else {"deployed": deployed}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


class LatencyCache:
    """Milliseconds by key, loaded from and saved to one JSON file. `path=None` keeps it in memory only."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else Path(path)
        self._entries: dict[str, float | tuple[float, ...]] = {}
        self._dirty = False
        if self.path is not None:
            self._entries = self._load(self.path)

    @staticmethod
    def _load(path: Path) -> dict[str, float | tuple[float, ...]]:
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != _FORMAT or data.get("version") not in _READABLE:
                raise ValueError(f"not a version {' or '.join(map(str, _READABLE))} onnx-lowrank latency cache")
            entries = data["entries"]
            if not isinstance(entries, dict) or not all(
                _positive(v) or (isinstance(v, list) and v and all(map(_positive, v))) for v in entries.values()
            ):
                raise ValueError("entries are not positive numbers or lists of them")
            return {str(k): tuple(map(float, v)) if isinstance(v, list) else float(v) for k, v in entries.items()}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, AttributeError, TypeError) as error:
            warnings.warn(f"ignoring the latency cache {path} ({error}); it will be measured again and rewritten",
                          stacklevel=3)
            return {}

    def get(self, key: str) -> float | None:
        """Milliseconds: the median of the per-round times when they were stored."""
        value = self._entries.get(key)
        return statistics.median(value) if isinstance(value, tuple) else value

    def rounds(self, key: str) -> tuple[float, ...] | None:
        """The per-round times stored under `key`, or None (a bare number, or nothing)."""
        value = self._entries.get(key)
        return value if isinstance(value, tuple) else None

    def put(self, key: str, ms: float | Sequence[float]) -> None:
        """Store milliseconds, or the per-round times of one measurement (their median is then `get`)."""
        self._entries[key] = float(ms) if isinstance(ms, (int, float)) else tuple(map(float, ms))
        self._dirty = True

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def changed(self) -> bool:
        """Whether anything was added since the file was loaded or last saved."""
        return self._dirty

    def save(self) -> None:
        """Write the file if anything was added (atomically); an unwritable cache folder only warns."""
        if self.path is None or not self._dirty:
            return
        entries = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(self._entries.items())}
        text = json.dumps({"format": _FORMAT, "version": _VERSION, "entries": entries})
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".latency-", suffix=".tmp")
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as stream:
                    stream.write(text)
                os.replace(temporary, self.path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as error:
            warnings.warn(f"cannot write the latency cache {self.path} ({error}); the next run measures again",
                          stacklevel=2)
            return
        self._dirty = False
