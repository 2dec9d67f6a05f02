"""The user's options as frozen settings objects, built once from the keywords, which are validated once.

Every public function (`api`, `sweep`) checks its keywords at the boundary (`options.checked`: their declarations in
`options.OPTIONS`, one message template) and builds these objects from them; the stages then read their fields and
never validate again. A plan records the settings that shape the model it writes
(`AnalysisSettings` and `refit`, see `plan.Plan.settings`), so applying it later reproduces the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.graph.runtime import RuntimeSettings
from onnx_lowrank.math.projection import DEFAULT_SHRINKAGE
from onnx_lowrank.options import METHODS, check

__all__ = ["AnalysisSettings", "SpeedSettings", "CachePath", "default_method"]

CachePath = str | os.PathLike | bool
"""Where measured latencies are cached: True for the default file (see `latency_cache`), False for none, or a path."""


def default_method(calibrated: bool) -> str:
    """The method when none is given, for every metric: `both` with calibration data (narrowing needs it), else
    `lowrank`. The benchmark chose it (README, Neuron elimination): on the calibration samples `both` never does
    worse than low rank alone, whose plans are among those it judges."""
    return "both" if calibrated else "lowrank"


@dataclass(frozen=True)
class AnalysisSettings:
    """What decides each layer's candidates and factors: recorded in a plan, since the written model depends on it."""

    method: str | None = None  # None: `default_method` once it is known whether there is calibration data
    shrinkage: float | None = DEFAULT_SHRINKAGE  # None: adaptive per layer (`math.projection.oas_intensity`)
    exclude: str | None = None
    max_groups: int = 8
    rank_multiple: int = 1
    weight_only: bool = False
    int8: bool = False  # planned for an int8 deployment (--quantize): narrowing counts the activations' rounding noise

    def resolved(self, calibrated: bool) -> AnalysisSettings:
        """These settings with the method settled (`default_method` when none was given)."""
        method = self.method or default_method(calibrated)
        return AnalysisSettings(method, None if self.shrinkage is None else float(self.shrinkage), self.exclude,
                                int(self.max_groups), int(self.rank_multiple), bool(self.weight_only), bool(self.int8))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> AnalysisSettings:
        """The settings a plan recorded (unknown keys ignored, missing ones at their defaults), checked like
        keywords: a hand-edited plan gets the same messages."""
        names = {f.name for f in fields(cls)}
        values = {name: value for name, value in data.items() if name in names}
        check(values, "plan")
        if not isinstance(values.get("int8", False), bool):
            raise InvalidOptionError(f"The plan's int8 must be true or false. Got {values['int8']!r} instead.")
        if values.get("method") is not None and values["method"] not in METHODS:
            raise InvalidOptionError(f"The plan's method must be one of {', '.join(METHODS)}. "
                                     f"Got {values['method']!r} instead.")
        return cls(**values)


@dataclass(frozen=True)
class SpeedSettings:
    """How latency enters: the deployment's session settings, the cache, whether layers are timed at all and whether
    the never-slower guard filters candidates. One rule for every caller (compress, analyze, sweep): layers are timed
    unless `allow_slower`, and always for a latency budget; the guard is on unless `allow_slower`."""

    runtime: RuntimeSettings = RuntimeSettings()
    cache: CachePath = True
    measure: bool = False
    guard: bool = False
    timer: object | None = None  # a `stages.timing.Timer`; None: onnxruntime on this machine
    deployed: object | None = None  # a `stages.quantize.Quantization`: everything is timed in that int8 form

    @classmethod
    def of(cls, allow_slower: bool, metric: str | None, threads: int | None, provider: str, cache: CachePath,
           timer: object | None = None) -> SpeedSettings:
        return cls(RuntimeSettings(threads=threads, provider=provider), cache,
                   measure=not allow_slower or metric == "latency", guard=not allow_slower, timer=timer)
