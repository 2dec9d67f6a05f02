"""Compress one model at several budgets and allocators, and measure each result: the fidelity/size/speed frontier.

The model is analysed once; every (allocator, budget) cell is planned, applied, verified on the same samples, and
timed against the original interleaved in one process (see `latency`), so the cells are comparable with each other.
An optional `evaluate` hook adds task metrics (the benchmark runner scores detections or recognised text with it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from . import api
from .errors import BudgetError, InvalidOptionError
from .inputs import load_feeds, random_feeds, resolve_shapes
from .latency import measure_latency_ratio
from .load import load_model
from .verify import verify

__all__ = ["SweepPoint", "Sweep", "sweep", "parse_budgets"]


@dataclass(frozen=True)
class SweepPoint:
    allocator: str
    budget: float
    params_ratio: float
    flops_ratio: float | None
    latency_ratio: float | None  # compressed / original median time; None when not measured
    output_error: float  # worst relative L2 over the model's outputs
    top1_agreement: float | None  # lowest over outputs that are score vectors
    max_layer_error: float  # measured relative spectral error of the worst factorized layer
    layers_factorized: int
    tool_seconds: float  # analyze + plan + apply: what one `compress --no-verify` costs
    task: Mapping[str, float] = field(default_factory=dict)  # from the evaluate hook

    def to_dict(self) -> dict:
        return {**asdict(self), "task": dict(self.task)}


@dataclass(frozen=True)
class Sweep:
    points: tuple[SweepPoint, ...]
    unreachable: tuple[tuple[str, float, str], ...]  # (allocator, budget, why)
    analysis_seconds: float
    samples: str  # where the samples came from: an --inputs path or "random"

    def to_dict(self) -> dict:
        return {
            "points": [p.to_dict() for p in self.points],
            "unreachable": [list(u) for u in self.unreachable],
            "analysis_seconds": self.analysis_seconds,
            "samples": self.samples,
        }


def parse_budgets(text: str) -> list[float]:
    """'0.9,0.8,0.7' -> [0.9, 0.8, 0.7], each in (0, 1]."""
    try:
        budgets = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidOptionError(f"--budgets takes fractions separated by commas, like 0.9,0.7,0.5. Got {text!r}.") from None
    if not budgets or any(not 0 < b <= 1 for b in budgets):
        raise InvalidOptionError(f"--budgets takes fractions in (0, 1] separated by commas. Got {text!r}.")
    return budgets


def sweep(
    model: str | os.PathLike | onnx.ModelProto,
    budgets: Sequence[float],
    *,
    allocators: Sequence[str] = ("alds",),
    metric: str = "params",
    inputs: str | os.PathLike | Sequence[Mapping[str, np.ndarray]] | None = None,
    input_shapes: Sequence[str] | Mapping[str, Sequence[int]] | None = None,
    rank_multiple: int = 1,
    max_groups: int = 8,
    exclude: str | None = None,
    latency: bool = True,
    latency_repeats: int = 20,
    evaluate: Callable[[onnx.ModelProto], Mapping[str, float]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Sweep:
    """Measure every (allocator, budget) cell. `inputs` may also be a list of feed dicts (the benchmark's samples)."""
    proto = load_model(model)
    if inputs is None:
        shapes = resolve_shapes(proto, api._parse_shapes(input_shapes))
        feeds, samples = random_feeds(proto, shapes, count=2, seed=0), "random"
    elif isinstance(inputs, (str, os.PathLike)):
        feeds, samples = load_feeds(inputs, proto), str(inputs)
    else:
        feeds, samples = [dict(feed) for feed in inputs], "given samples"
    first_shapes = {name: tuple(array.shape) for name, array in feeds[0].items()}

    start = time.perf_counter()
    analysis = api.analyze(proto, input_shapes=first_shapes, exclude=exclude, max_groups=max_groups,
                           rank_multiple=rank_multiple)
    analysis_seconds = time.perf_counter() - start

    points, unreachable = [], []
    for allocator in allocators:
        for budget in budgets:
            if progress is not None:
                progress(f"{allocator} {budget:g}")
            start = time.perf_counter()
            try:
                plan = api.plan(analysis, budget, metric=metric, allocator=allocator)
            except BudgetError as exc:
                unreachable.append((allocator, float(budget), str(exc)))
                continue
            compressed, report = api.apply(proto, plan, input_shapes=first_shapes, verify=False, analysis=analysis)
            tool_seconds = analysis_seconds + time.perf_counter() - start
            check = verify(proto, compressed, feeds)
            agreements = [o.top1_agreement for o in check.outputs if o.top1_agreement is not None]
            timing = measure_latency_ratio(proto, compressed, feeds[:1], repeats=latency_repeats) if latency else None
            points.append(
                SweepPoint(
                    allocator=allocator,
                    budget=float(budget),
                    params_ratio=report.params_ratio,
                    flops_ratio=report.flops_ratio,
                    latency_ratio=None if timing is None else timing.ratio,
                    output_error=check.worst_relative_l2,
                    top1_agreement=min(agreements) if agreements else None,
                    max_layer_error=max((r.error for r in report.factorized), default=0.0),
                    layers_factorized=len(report.factorized),
                    tool_seconds=tool_seconds,
                    task=dict(evaluate(compressed)) if evaluate is not None else {},
                )
            )
    return Sweep(points=tuple(points), unreachable=tuple(unreachable), analysis_seconds=analysis_seconds,
                 samples=samples)
