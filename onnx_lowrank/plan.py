"""A plan: which layers to factorize and how (k groups, rank r), and which to narrow to how many output channels.
Layers not named stay as they are.

Plans are plain JSON so they can be reviewed, edited and re-applied (`onnx-lowrank apply --plan`):

    {"format": "onnx-lowrank-plan", "version": 2, "allocator": "alds", "metric": "params", "budget": 0.7,
     "method": "both", "model": "sha256:...", "refit": false,
     "settings": {"method": "both", "shrinkage": 0.01, "exclude": null, "max_groups": 8, "rank_multiple": 1,
                  "weight_only": false, "int8": false},
     "layers": {"/model.0/conv/Conv": {"k": 1, "rank": 8}, ...}, "widths": {"/model.1/conv/Conv": 24, ...}}

Version 2 records what the written model depends on besides the choices: the analysis settings, refit, and the
fingerprint of the model the plan was made for (`graph.load.fingerprint`), so `apply` analyses again exactly as the
plan was made and refuses another model. Version 1 plans (no settings, no fingerprint) still load and apply as
before: analysed with the defaults. A plan kept well below its budget lists why under "gaps" (`Gap`; optional, and
`apply` ignores it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.settings import AnalysisSettings

__all__ = ["Plan", "Gap"]

_FORMAT = "onnx-lowrank-plan"
_VERSION = 2


@dataclass(frozen=True)
class Gap:
    """Why a plan keeps much less than its budget, for one layer (or unit of coupled layers) it changed: the form
    chosen keeps `kept` of the layer's cost, and the next less-cut candidate (`next_kept`; None: nothing between that
    form and the dense layer) costs more than the budget leaves. `only`: the chosen form is the layer's only one."""

    layer: str
    kept: float
    next_kept: float | None = None
    only: bool = False

    def describe(self, metric: str) -> str:
        if self.only:
            return f"{self.layer}: the only candidate keeps {self.kept:.2f} of its {metric}"
        if self.next_kept is None:
            return (f"{self.layer}: no candidate between dense and the one chosen, which keeps {self.kept:.2f} of its "
                    f"{metric}")
        return (f"{self.layer}: keeps {self.kept:.2f} of its {metric}; the next candidate up keeps "
                f"{self.next_kept:.2f}, more than the budget leaves")

    @classmethod
    def from_dict(cls, data: object, source: str) -> Gap:
        valid = isinstance(data, dict) and isinstance(data.get("layer"), str)
        kept, next_kept = (data.get("kept"), data.get("next_kept")) if valid else (None, None)
        if not (valid and _number(kept) and (next_kept is None or _number(next_kept))
                and isinstance(data.get("only", False), bool)):
            raise InvalidOptionError(f"{source}: each of 'gaps' needs a layer name and the fraction it keeps, like "
                                     f'{{"layer": "fc1", "kept": 0.12, "next_kept": null}}. Got {data!r} instead.')
        return cls(data["layer"], float(kept), None if next_kept is None else float(next_kept),
                   data.get("only", False))


@dataclass(frozen=True)
class Plan:
    layers: Mapping[str, tuple[int, int]]  # layer name -> (k, rank)
    allocator: str | None = None
    metric: str | None = None
    budget: float | None = None
    threshold: float | None = None  # the largest per-layer planning score the allocator allowed
    notes: tuple[str, ...] = field(default=())
    widths: Mapping[str, int] = field(default_factory=dict)  # narrowed layer (a chain's producer) -> channels kept
    method: str | None = None  # lowrank, eliminate or both; None: a version 1 plan
    settings: AnalysisSettings | None = None  # what the layers were analysed with; None: a version 1 plan
    refit: bool | None = None  # decoders refit on the calibration samples
    model: str | None = None  # fingerprint of the model the plan was made for
    gaps: tuple[Gap, ...] = ()  # when it keeps over `allocate.SHORTFALL` below its budget: the layers that could not
    # take more of it, least alternative first (see `Gap`)

    def to_dict(self) -> dict:
        recorded = {"method": self.method, "model": self.model, "refit": self.refit,
                    "settings": None if self.settings is None else self.settings.to_dict()}
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "allocator": self.allocator,
            "metric": self.metric,
            "budget": self.budget,
            "threshold": self.threshold,
            **{key: value for key, value in recorded.items() if value is not None},
            "layers": {name: {"k": k, "rank": r} for name, (k, r) in self.layers.items()},
            **({"widths": dict(self.widths)} if self.widths else {}),
            **({"gaps": [gap.__dict__ for gap in self.gaps]} if self.gaps else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: object, source: str = "plan") -> Plan:
        if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
            raise InvalidOptionError(f"{source} is not an onnx-lowrank plan: expected a JSON object with 'layers'.")
        layers: dict[str, tuple[int, int]] = {}
        for name, entry in data["layers"].items():
            k = entry.get("k") if isinstance(entry, dict) else None
            rank = entry.get("rank") if isinstance(entry, dict) else None
            if not (_whole(k) and _whole(rank) and k >= 1 and rank >= 1):
                raise InvalidOptionError(
                    f"{source}: layer {name!r} needs whole numbers k >= 1 and rank >= 1, like "
                    f'{{"k": 1, "rank": 16}}. Got {entry!r} instead.'
                )
            layers[name] = (k, rank)
        widths = data.get("widths", {})
        if not isinstance(widths, dict) or not all(_whole(w) and w >= 1 for w in widths.values()):
            raise InvalidOptionError(f"{source}: 'widths' must map layer names to whole numbers of channels >= 1, "
                                     f'like {{"conv1": 24}}. Got {widths!r} instead.')
        budget = data.get("budget")
        threshold = data.get("threshold")
        version = data.get("version", 1)
        if not _whole(version) or not 1 <= version <= _VERSION:
            raise InvalidOptionError(f"{source} is a version {version!r} plan; this onnx-lowrank reads versions 1 to "
                                     f"{_VERSION}: upgrade onnx-lowrank, or plan again.")
        settings = data.get("settings")
        if settings is not None and not isinstance(settings, dict):
            raise InvalidOptionError(f"{source}: 'settings' must be a JSON object. Got {settings!r} instead.")
        model, refit = data.get("model"), data.get("refit")
        if model is not None and not isinstance(model, str):
            raise InvalidOptionError(f"{source}: 'model' must be a fingerprint string. Got {model!r} instead.")
        if refit is not None and not isinstance(refit, bool):
            raise InvalidOptionError(f"{source}: 'refit' must be true or false. Got {refit!r} instead.")
        gaps = data.get("gaps", [])
        if not isinstance(gaps, list):
            raise InvalidOptionError(f"{source}: 'gaps' must be a list. Got {gaps!r} instead.")
        recorded = None if settings is None else AnalysisSettings.from_dict(settings)
        if data.get("method") is not None:
            AnalysisSettings.from_dict({"method": data["method"]})  # the same check as the recorded settings
        return cls(
            layers=layers,
            allocator=data.get("allocator"),
            metric=data.get("metric"),
            budget=float(budget) if isinstance(budget, (int, float)) else None,
            threshold=float(threshold) if isinstance(threshold, (int, float)) else None,
            widths=dict(widths),
            method=data.get("method", None if recorded is None else recorded.method),
            settings=recorded,
            refit=refit,
            model=model,
            gaps=tuple(Gap.from_dict(gap, source) for gap in gaps),
        )

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidOptionError(f"plan file {str(path)!r} does not exist.") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidOptionError(f"cannot read plan file {str(path)!r}: {exc}.") from None
        return cls.from_dict(data, source=f"plan file {str(path)!r}")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
