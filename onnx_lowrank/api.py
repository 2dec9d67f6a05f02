"""The Python API: `analyze`, `plan`, `apply`, and `compress`, which runs the three in turn.

Each stage is a module (discover, analyze, allocate, passes, verify, report); this one only wires them together
and times them.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from . import cost
from .allocate import allocate
from .analyze import Analysis, analyze_layers
from .discover import Layer, discover
from .error import measured_error
from .errors import InvalidOptionError
from .inputs import load_feeds, parse_input_shapes, random_feeds, resolve_shapes
from .load import load_model
from .passes import factorize_layers
from .plan import Plan
from .report import LayerRow, Report, Totals
from .shapes import tensor_shapes
from .svd import factorize
from .verify import verify

__all__ = ["analyze", "plan", "apply", "compress"]

ModelLike = str | os.PathLike | onnx.ModelProto
ShapeSpecs = Mapping[str, Sequence[int]] | Sequence[str] | None

_COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization")
_RANDOM_SAMPLES = 2


@dataclass(frozen=True, eq=False)
class _Workspace:
    """A loaded model with what every stage may need: concrete shapes and the samples to verify on."""

    model: onnx.ModelProto
    input_shapes: dict[str, tuple[int, ...]] | None  # None when some input dimension is unknown
    feeds: list[dict[str, np.ndarray]] | None
    feeds_source: str | None = None  # the --inputs path, or "random" when samples were generated

    def shapes_of(self, model: onnx.ModelProto) -> dict[str, tuple[int, ...]] | None:
        """Concrete shapes of every tensor the cost model reads, or None when the input shapes are unknown."""
        if self.input_shapes is None:
            return None
        names = {t for n in model.graph.node if n.op_type in _COUNTED_OPS for t in list(n.input[:2]) + list(n.output[:1])}
        constants = {t.name for t in model.graph.initializer}
        constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
        return tensor_shapes(model, self.input_shapes, sorted(names - constants - {""}))


def _prepare(model: ModelLike, inputs: str | os.PathLike | None, input_shapes: ShapeSpecs, need_feeds: bool) -> _Workspace:
    proto = load_model(model)
    overrides = _parse_shapes(input_shapes)
    feeds = load_feeds(inputs, proto) if inputs is not None else None
    if feeds is not None:
        # the first sample fixes the shapes FLOPs are counted at
        resolved = {name: tuple(array.shape) for name, array in feeds[0].items()}
    else:
        try:
            resolved = resolve_shapes(proto, overrides)
        except InvalidOptionError:
            if need_feeds:
                raise
            resolved = None
        if need_feeds:
            feeds = random_feeds(proto, resolved, count=_RANDOM_SAMPLES, seed=0)
    source = None if feeds is None else str(inputs) if inputs is not None else "random"
    return _Workspace(model=proto, input_shapes=resolved, feeds=feeds, feeds_source=source)


def _parse_shapes(input_shapes: ShapeSpecs) -> dict[str, tuple[int, ...]]:
    if not input_shapes:
        return {}
    if isinstance(input_shapes, Mapping):
        return {name: tuple(int(d) for d in dims) for name, dims in input_shapes.items()}
    return parse_input_shapes(list(input_shapes))


def analyze(
    model: ModelLike,
    *,
    input_shapes: ShapeSpecs = None,
    inputs: str | os.PathLike | None = None,
    exclude: str | None = None,
    max_groups: int = 8,
    rank_multiple: int = 1,
    progress: Callable[[Layer], None] | None = None,
) -> Analysis:
    """Find the factorizable layers and every candidate (k, rank) with its error and cost.

    FLOPs are counted when every input shape is known (static in the model, from `input_shapes` such as
    ``{"images": (1, 3, 320, 320)}`` or ``["images:1x3x320x320"]``, or from the first sample of `inputs`).
    """
    return _analyze(_prepare(model, inputs, input_shapes, need_feeds=False), exclude, max_groups, rank_multiple, progress)


def _analyze(workspace: _Workspace, exclude, max_groups, rank_multiple, progress) -> Analysis:
    _check_exclude(exclude)
    shapes = workspace.shapes_of(workspace.model)
    discovery = discover(workspace.model, shapes=shapes, exclude=exclude)
    return analyze_layers(workspace.model, discovery, shapes, max_groups=max_groups, rank_multiple=rank_multiple,
                          progress=progress)


def plan(analysis: Analysis, budget: float, *, metric: str = "params", allocator: str = "alds") -> Plan:
    """Choose (k, rank) per layer so the model keeps `budget` of its params or FLOPs; see `allocate`."""
    return allocate(analysis, budget, metric=metric, allocator=allocator)


def apply(
    model: ModelLike,
    plan: Plan,
    *,
    inputs: str | os.PathLike | None = None,
    input_shapes: ShapeSpecs = None,
    verify: bool = True,
    analysis: Analysis | None = None,
) -> tuple[onnx.ModelProto, Report]:
    """Rewrite the layers `plan` names into their factorized form; check the result in onnxruntime unless told not to.

    Returns the new ModelProto (the input is not modified) and a Report. Pass the `analysis` the plan came from to
    skip re-discovery and to report the planned error bounds.
    """
    start = time.perf_counter()
    workspace = _prepare(model, inputs, input_shapes, need_feeds=verify)
    seconds = {"load": time.perf_counter() - start}
    return _apply(workspace, plan, verify, analysis, seconds)


def _apply(workspace: _Workspace, plan: Plan, run_verify: bool, analysis: Analysis | None, seconds: dict) -> tuple[onnx.ModelProto, Report]:
    start = time.perf_counter()
    model = workspace.model
    if analysis is None:  # analysing up to the plan's largest k also gives the planned error of every choice
        analysis = _analyze(workspace, None, max((k for k, _ in plan.layers.values()), default=1), 1, None)
    layers = {a.layer.name: a for a in analysis.layers}
    _check_plan(plan, layers, analysis)

    rewrites = []
    rows = []
    for entry in analysis.layers:
        choice = plan.layers.get(entry.layer.name)
        if choice is None:
            rows.append(_row(entry))
            continue
        factors = factorize(entry.layer.matrix, *choice)
        rewrites.append((entry.layer, factors))
        norm = entry.spectra[1].reference_norm  # k = 1 is always analysed: its top singular value is ||W||_2
        rows.append(_row(entry, choice, measured_error(entry.layer.matrix, factors, norm)))
    compressed, _ = factorize_layers(model, rewrites) if rewrites else (model, 0)
    seconds["apply"] = time.perf_counter() - start

    verification = None
    if run_verify and rewrites:
        start = time.perf_counter()
        onnx.checker.check_model(compressed, full_check=True)
        verification = verify(model, compressed, workspace.feeds)
        seconds["verify"] = time.perf_counter() - start

    after_shapes = workspace.shapes_of(compressed) if rewrites else None
    before = Totals(params=analysis.total_params, flops=analysis.total_flops)
    after = before if not rewrites else Totals(
        params=cost.model_params(compressed),
        flops=cost.model_flops(compressed, after_shapes) if after_shapes is not None else None,
    )
    message = None
    if not rewrites:
        message = _nothing_to_do(analysis, plan)
    report = Report(
        layers=tuple(rows),
        skipped=analysis.skipped,
        before=before,
        after=after,
        plan=plan,
        verification=verification,
        verified_on=workspace.feeds_source if verification is not None else None,
        seconds=seconds,
        message=message,
    )
    return compressed, report


def compress(
    model: ModelLike,
    budget: float = 0.5,
    *,
    metric: str = "params",
    allocator: str = "alds",
    rank_multiple: int = 1,
    max_groups: int = 8,
    exclude: str | None = None,
    inputs: str | os.PathLike | None = None,
    input_shapes: ShapeSpecs = None,
    verify: bool = True,
    progress: Callable[[Layer], None] | None = None,
) -> tuple[onnx.ModelProto, Report]:
    """Compress `model` to `budget` (a fraction in (0, 1]) of its params or FLOPs: analyze, plan, apply, verify.

    Returns the compressed ModelProto and a Report (per-layer ranks, errors and costs, verification, timings).
    """
    total_start = time.perf_counter()
    start = time.perf_counter()
    workspace = _prepare(model, inputs, input_shapes, need_feeds=verify)
    seconds = {"load": time.perf_counter() - start}
    start = time.perf_counter()
    analysis = _analyze(workspace, exclude, max_groups, rank_multiple, progress)
    seconds["analyze"] = time.perf_counter() - start
    start = time.perf_counter()
    chosen = allocate(analysis, budget, metric=metric, allocator=allocator)
    seconds["plan"] = time.perf_counter() - start
    compressed, report = _apply(workspace, chosen, verify, analysis, seconds)
    seconds["total"] = time.perf_counter() - total_start
    return compressed, report


def _check_exclude(exclude: str | None) -> None:
    if exclude is None:
        return
    try:
        re.compile(exclude)
    except re.error as exc:
        raise InvalidOptionError(f"The exclude pattern {exclude!r} is not a valid regular expression: {exc}.") from None


def _check_plan(plan: Plan, layers: Mapping[str, object], analysis: Analysis) -> None:
    skipped = {s.name: s.reason for s in analysis.skipped}
    for name, (k, rank) in plan.layers.items():
        if name not in layers:
            why = f" (skipped: {skipped[name]})" if name in skipped else ""
            raise InvalidOptionError(f"The plan names layer {name!r}, which is not a factorizable layer of this model{why}.")
        layer = layers[name].layer
        if layer.in_channels % k:
            raise InvalidOptionError(
                f"The plan splits layer {name!r} into k={k} groups, but its {layer.in_channels} input channels "
                f"do not divide by {k}."
            )
        if k > 1 and layer.op == "MatMul" and layer.activation_rank is None:
            raise InvalidOptionError(
                f"Layer {name!r} can only take k=1: the rank of its input is unknown (give --input-shape)."
            )
        largest = min(layer.out_channels, layer.matrix.shape[1] // k)
        if not 1 <= rank <= largest:
            raise InvalidOptionError(f"The plan gives layer {name!r} rank {rank}; with k={k} it must be 1 to {largest}.")


def _row(entry, choice: tuple[int, int] | None = None, error: float | None = None) -> LayerRow:
    """The report row of one layer: kept dense when `choice` is None, else factorized as (k, rank)."""
    layer = entry.layer
    k, rank = choice if choice is not None else (None, None)
    dense = choice is None
    return LayerRow(
        name=layer.name,
        op=layer.op,
        weight_shape=layer.weight_shape,
        k=k,
        rank=rank,
        params_before=entry.dense_params,
        params_after=entry.dense_params if dense else cost.factorized_params(layer, k, rank),
        flops_before=entry.dense_flops,
        flops_after=entry.dense_flops if dense else cost.factorized_flops(layer, k, rank),
        error=error,
        planned_error=None if dense else next((c.error for c in entry.candidates if (c.k, c.rank) == choice), None),
    )


def _nothing_to_do(analysis: Analysis, plan: Plan) -> str:
    if not analysis.layers:
        reasons = sorted({s.reason for s in analysis.skipped})
        detail = f": every candidate was skipped ({'; '.join(reasons)})" if reasons else ": it has no Conv, Gemm or MatMul"
        return f"Nothing to compress in this model{detail}. The model is unchanged."
    return "The plan factorizes no layer (the budget keeps every layer dense). The model is unchanged."
