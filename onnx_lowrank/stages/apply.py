"""Write a plan into a model: the one plan writer (compress, apply, the auto judge and the search all use it).

Narrowed and factorized layers are distinct; narrowing is written first, then every factorized layer's factors go
into the model as they are computed (`analyze.factors_of`) and are not kept. With calibration samples given, every
decoder is refit on what the compressed network really feeds it (`refit`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.graph.inputs import Samples
from onnx_lowrank.math.elimination import Folded
from onnx_lowrank.ops.base import family_for
from onnx_lowrank.passes import eliminate_channels, factorize_layers
from onnx_lowrank.plan import Plan
from onnx_lowrank.stages.analyze import Analysis, cuts_of, factors_of
from onnx_lowrank.stages.refit import refit_factors

__all__ = ["Written", "write_plan", "check_plan"]


@dataclass(frozen=True, eq=False)
class Written:
    """The model a plan wrote, with each factorized layer's measured error and each narrowed set's cut."""

    model: onnx.ModelProto
    errors: dict[str, float] = field(default_factory=dict)  # factorized layer -> error of its written factors
    cuts: tuple = ()  # (chain, Folded) of every narrowed set, in the analysis' order


def write_plan(model: onnx.ModelProto, analysis: Analysis, plan: Plan, calibration: Samples | None = None,
               progress: Callable[[int, int], None] | None = None) -> Written:
    """The model with `plan` written into it (the input is not modified); refit on `calibration` when given."""
    chosen = factors_of(analysis, plan.layers, progress)
    errors: dict[str, float] = {}

    def written():  # each layer's factors go into the model as they come, and are not kept
        for layer, factors, error in chosen:
            errors[layer.name] = error
            yield layer, factors

    rewrites = written()
    cuts: list[tuple[object, Folded]] = cuts_of(analysis, plan.widths)
    narrowed = eliminate_channels(model, cuts)[0] if cuts else model
    if calibration is not None and plan.layers:
        rewrites = refit_factors(model, list(rewrites), calibration, base=narrowed)  # needs every layer
    compressed = factorize_layers(narrowed, rewrites)[0] if plan.layers else narrowed
    return Written(model=compressed, errors=errors, cuts=tuple(cuts))


def check_plan(plan: Plan, analysis: Analysis) -> None:
    """Refuse, in one line, a plan that names a layer this analysis cannot write as asked (a hand-edited plan, or
    one made for another model)."""
    layers = {a.layer.name: a for a in analysis.layers}
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
        problem = family_for(layer.op).plan_problem(layer, k)
        if problem:
            raise InvalidOptionError(f"Layer {name!r} {problem}.")
        largest = min(layer.out_channels, layer.columns // k)
        if not 1 <= rank <= largest:
            raise InvalidOptionError(f"The plan gives layer {name!r} rank {rank}; with k={k} it must be 1 to {largest}.")
