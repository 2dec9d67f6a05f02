"""The `auto` allocator: build the plans of several allocators and keep the one whose outputs move least.

Min-max over data-aware layer errors is usually best, but a per-layer error does not say how much that layer's error
moves the model's outputs, and a non-uniform allocation can lose to the uniform one. So every allocator's plan for
the budget is written and run on the calibration samples next to the original, and the plan with the smallest
worst relative output error wins. The uniform baseline is always among them, so the default never loses to it on
the calibration data. With `--method both` the plans of each method alone (only factorized, only narrowed) are
among them too, so `both` never loses to either on the calibration data. Costs one extra pass over the calibration
samples per plan.
"""

from __future__ import annotations

import math
from dataclasses import replace

import onnx

from .allocate import allocate
from .analyze import Analysis, cuts_of, factors_of
from .errors import BudgetError
from .inputs import Samples
from .passes import eliminate_channels, factorize_layers
from .plan import Plan
from .verify import verify_many

__all__ = ["CANDIDATE_ALLOCATORS", "choose_plan"]

CANDIDATE_ALLOCATORS = ("alds", "uniform", "energy")


def choose_plan(model: onnx.ModelProto, analysis: Analysis, budget: float, metric: str, samples: Samples) -> Plan:
    """The best plan for `budget` among the candidate allocators, judged end to end on `samples`."""
    plans: dict[str, Plan] = {}
    first_error = None
    methods = (analysis.method, "lowrank", "eliminate") if analysis.method == "both" else (analysis.method,)
    for method, name in ((method, name) for method in methods for name in CANDIDATE_ALLOCATORS):
        label = name if method == analysis.method else f"{name} ({method} only)"
        try:
            candidate = allocate(replace(analysis, method=method), budget, metric=metric, allocator=name)
        except BudgetError as error:
            first_error = first_error or error
            continue
        if all((dict(candidate.layers), dict(candidate.widths)) != (dict(p.layers), dict(p.widths))
               for p in plans.values()):  # identical plans: judge once
            plans[label] = candidate
    if not plans:
        raise first_error
    if len(plans) == 1 or not analysis.layers:
        name, only = next(iter(plans.items()))
        return replace(only, allocator=name, notes=(f"auto: {name} (the only distinct plan)",))
    models = (factorize_layers(eliminate_channels(model, cuts_of(analysis, p.widths))[0],
                               ((layer, f) for layer, f, _ in factors_of(analysis, p.layers)))[0]
              for p in plans.values())  # each written when its session is made, then let go
    checks = verify_many(model, models, samples)
    errors = {name: _score(check.worst_relative_l2) for name, check in zip(plans, checks)}
    best = min(plans, key=lambda name: errors[name])  # ties: the first listed (alds)
    scores = ", ".join(f"{name} {errors[name]:.4g}" for name in plans)
    note = f"auto: {best} (output error on {samples.count} calibration samples: {scores})"
    return replace(plans[best], allocator=best, notes=(note,))


def _score(error: float) -> float:
    return math.inf if math.isnan(error) else error
