"""Global allocation: pick (k, r) for every layer so the whole model meets one budget.

All three allocators solve the same problem with a different per-candidate score: minimise the largest score over
the layers, subject to the total cost staying within the budget. The cost is whichever of the analysis' cost models
the metric names (params, flops, latency; see `cost_models`): the model's total is the cost of its factorizable
layers as chosen plus the fixed rest (the total minus their dense costs). Keeping a layer dense is always
an option (score 0); factorizations saving less than `cost.MIN_SAVING` of the dense layer are never candidates.

For a threshold t, every layer takes its cheapest option whose score is <= t. The total cost falls monotonically
as t grows, so the smallest feasible t, found by bisection over the sorted distinct scores, is exactly the optimum
of the min-max problem over the whole candidate set (no random seeds, no iterations to tune). The capacity that
optimum leaves unused is then spent, worst layer first, on lowering individual scores: this never raises the
maximum, so the result stays optimal, and the model uses its budget instead of stopping a few percent short.

- `alds`: score = the (k, r) candidate's error, every k (the ALDS objective): the relative spectral error bound
  without data, the exact relative output error on the calibration data with it.
- `uniform`: k = 1, score = 1 - r / max_rank: the same rank ratio in every layer (the classic SVD baseline).
- `energy`: k = 1, score = fraction of the layer's energy dropped (squared singular values of the weight, or of
  its output on the calibration data): the same discarded energy everywhere.

With `--method eliminate` or `both`, every narrowable layer (`chains`) is a unit too: its options are widths,
scored by its readers' relative output error (`uniform`: the fraction of channels dropped; `energy`: the squared
error) and priced as the change of the model's cost. With `both` a layer is narrowed or factorized, never both:
the layers a narrowable chain touches are left to it. Two narrowed layers that touch each other (one reads what the
other produces) save less than the sum of their savings, so the exact count of the chosen widths is checked, and
the capacity lowered by bisection until it fits.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .analyze import Analysis, Candidate, ChainAnalysis, LayerAnalysis
from .cost import MIN_SAVING, narrowing_saving
from .cost_models import METRICS, unavailable_reason
from .errors import BudgetError, InvalidOptionError, invalid
from .plan import Plan

__all__ = ["ALLOCATORS", "METRICS", "Option", "minmax_select", "allocate", "smallest_budget"]


@dataclass(frozen=True)
class Option:
    """One choice for one layer: its score, its cost, and (k, rank), or None for keeping the layer dense."""

    score: float
    cost: float
    choice: tuple[int, int] | None


def minmax_select(options: Sequence[Sequence[Option]], capacity: float) -> tuple[list[Option], float]:
    """Pick one option per layer minimising the largest score, with the sum of costs <= capacity.

    Every layer's options must include one of score 0 (the dense layer). Returns the choices and the threshold.
    Ties go to the cheaper option, then to the lower score, then to the first listed.
    """
    stairs = [_staircase(layer_options) for layer_options in options]
    stair_scores = [[step.score for step in stair] for stair in stairs]
    thresholds = sorted({score for scores in stair_scores for score in scores})

    def pick(t: float) -> list[Option]:
        return [stair[bisect.bisect_right(scores, t) - 1] for stair, scores in zip(stairs, stair_scores)]

    def total(t: float) -> int:
        return sum(o.cost for o in pick(t))

    low, high = 0, len(thresholds) - 1
    if total(thresholds[high]) > capacity:
        raise ValueError("capacity is below the cheapest allocation")
    while low < high:  # smallest index whose total fits
        middle = (low + high) // 2
        if total(thresholds[middle]) <= capacity:
            high = middle
        else:
            low = middle + 1
    return _spend_leftover(stairs, pick(thresholds[low]), capacity), thresholds[low]


def _spend_leftover(stairs: list[list[Option]], chosen: list[Option], capacity: float) -> list[Option]:
    """Upgrade layers, highest score first, to their lowest-score option the unused capacity still pays for."""
    chosen = list(chosen)
    leftover = capacity - sum(o.cost for o in chosen)
    for index in sorted(range(len(chosen)), key=lambda i: (-chosen[i].score, i)):
        current = chosen[index]
        affordable = [o for o in stairs[index] if o.score < current.score and o.cost - current.cost <= leftover]
        if affordable:
            best = affordable[0]  # stairs rise in score, so the first affordable one has the lowest score
            leftover -= best.cost - current.cost
            chosen[index] = best
    return chosen


def _staircase(options: Sequence[Option]) -> list[Option]:
    """Options by rising score, keeping only those cheaper than every option of lower score."""
    ordered = sorted(options, key=lambda o: (o.score, o.cost, o.choice or (0, 0)))
    if not ordered or ordered[0].score > 0:
        raise ValueError("every layer needs an option of score 0 (keeping it dense)")
    stair = [ordered[0]]
    for option in ordered[1:]:
        if option.cost < stair[-1].cost:
            stair.append(option)
    return stair


def _alds_scores(analysis: LayerAnalysis) -> list[tuple[Candidate, float]]:
    return [(c, c.error) for c in analysis.candidates]


def _uniform_scores(analysis: LayerAnalysis) -> list[tuple[Candidate, float]]:
    max_rank = analysis.decompositions[1].max_rank
    return [(c, 1.0 - c.rank / max_rank) for c in analysis.candidates if c.k == 1]


def _energy_scores(analysis: LayerAnalysis) -> list[tuple[Candidate, float]]:
    chosen = [c for c in analysis.candidates if c.k == 1]
    dropped = analysis.decompositions[1].dropped_energy(np.array([c.rank for c in chosen], dtype=int))
    return list(zip(chosen, (float(d) for d in np.atleast_1d(dropped))))


ALLOCATORS = {"alds": _alds_scores, "uniform": _uniform_scores, "energy": _energy_scores}


def _check_arguments(budget: float, metric: str, allocator: str) -> None:
    if metric not in METRICS:
        raise invalid("The 'metric' parameter of allocate", f"one of {', '.join(METRICS)}", metric)
    if allocator not in ALLOCATORS:
        raise invalid("The 'allocator' parameter of allocate", f"one of {', '.join(ALLOCATORS)}", allocator)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise invalid("The 'budget' parameter of allocate", "a fraction in (0, 1]", budget)


def _counted_total(analysis: Analysis, metric: str) -> float:
    total = analysis.total(metric)
    if total is None or any(a.dense.get(metric) is None for a in analysis.layers):
        raise InvalidOptionError(unavailable_reason(metric))
    return total


def _options(analysis: Analysis, metric: str, allocator: str) -> list[list[Option]]:
    """Every factorizable layer's options: dense first (score 0), then each candidate with the allocator's score."""
    return [
        [Option(0.0, a.dense[metric], None)]
        + [Option(score, c.costs[metric], (c.k, c.rank)) for c, score in ALLOCATORS[allocator](a)]
        for a in _factorizable(analysis)
    ]


def _factorizable(analysis: Analysis) -> list[LayerAnalysis]:
    """The layers the method lets the allocator factorize: none for `eliminate`; for `both`, those no narrowable
    chain touches (a layer is narrowed or factorized, not both)."""
    if analysis.method == "eliminate":
        return []
    touched = {layer.name for c in _narrowable(analysis) for layer in (c.chain.producer, *c.chain.readers)}
    return [a for a in analysis.layers if a.layer.name not in touched]


def _narrowable(analysis: Analysis) -> list[ChainAnalysis]:
    return [c for c in analysis.chains if c.candidates] if analysis.method != "lowrank" else []


def _chain_options(analysis: Analysis, metric: str, allocator: str) -> list[list[Option]]:
    """Every narrowable chain's options as changes of the model's cost: 0 to keep it, minus what a width saves."""
    if metric not in ("params", "flops") and _narrowable(analysis):
        raise InvalidOptionError(f"Narrowed layers are priced in params and FLOPs, not in {metric}: give --metric "
                                 "params or flops with --method eliminate or both.")
    options = []
    for entry in _narrowable(analysis):
        scored = []
        for c in entry.candidates:
            score = {"uniform": 1.0 - c.width / entry.chain.channels, "energy": c.error ** 2}.get(allocator, c.error)
            scored.append(Option(score, -c.savings[metric], (0, c.width)))
        options.append([Option(0.0, 0.0, None)] + scored)
    return options


def _has_units(analysis: Analysis) -> bool:
    return bool(_factorizable(analysis) or _narrowable(analysis))


def smallest_budget(analysis: Analysis, metric: str = "params", allocator: str = "alds") -> float:
    """The smallest budget `allocate` can meet: every layer at its cheapest candidate."""
    _check_arguments(1.0, metric, allocator)
    if not _has_units(analysis):
        return 1.0
    total = _counted_total(analysis, metric)
    options = _options(analysis, metric, allocator) + _chain_options(analysis, metric, allocator)
    fixed = total - sum(o[0].cost for o in options)
    smallest = fixed + sum(min(o.cost for o in layer_options) for layer_options in options)
    if not total:
        return 1.0
    fraction = max(smallest, 0.0) / total
    while fraction * total < smallest:  # float round-off: the fraction must give back at least `smallest`
        fraction = float(np.nextafter(fraction, 2.0))
    return min(fraction, 1.0)


def allocate(analysis: Analysis, budget: float, metric: str = "params", allocator: str = "alds") -> Plan:
    """The plan that keeps `budget` (a fraction in (0, 1]) of the model's `metric`, per `allocator`."""
    _check_arguments(budget, metric, allocator)
    if not _has_units(analysis):
        if budget < 1 and analysis.method != "lowrank" and (analysis.layers or analysis.chains):
            raise BudgetError(f"A budget of {budget:g} of the {metric} cannot be reached with --method "
                              f"{analysis.method}: no layer of this model can be narrowed (see analyze --method "
                              f"{analysis.method} for why).")
        # nothing to change, whatever can be counted: the empty plan, and the report says why
        return Plan(layers={}, allocator=allocator, metric=metric, budget=float(budget), threshold=0.0)
    total = _counted_total(analysis, metric)

    layer_options = _options(analysis, metric, allocator)
    chain_options = _chain_options(analysis, metric, allocator)
    options = layer_options + chain_options
    fixed = total - sum(o[0].cost for o in options)
    smallest = fixed + sum(min(o.cost for o in unit) for unit in options)
    capacity = budget * total - fixed
    if budget * total < smallest:
        guard = (" (only factorizations measured faster than their dense layer count; --allow-slower lifts that)"
                 if analysis.guarded else "")
        if smallest >= total:
            raise BudgetError(
                f"A budget of {budget:g} of the {metric} cannot be reached: none of the {len(options)} factorizable "
                f"layers has a factorization saving at least {MIN_SAVING:.0%} of it{guard}, so the model can only "
                "stay as it is."
            )
        method = "" if analysis.method == "lowrank" else f" and --method {analysis.method}"
        raise BudgetError(
            f"A budget of {budget:g} of the {metric} cannot be reached with the {allocator} allocator{method}: "
            f"this model can keep from {smallest / total:.3f} to 1.0 of its {metric}{guard}."
        )
    chains = _narrowable(analysis)

    def select(limit: float):
        """The min-max choice within `limit`, and whether its exact cost fits the budget: narrowed layers that
        touch each other (one reads what the other produces) save less than the sum of their savings."""
        picked, level = minmax_select(options, limit)
        cuts = [(c.chain, o.choice[1]) for c, o in zip(chains, picked[len(layer_options):]) if o.choice is not None]
        layer_cost = sum(o.cost for o in picked[: len(layer_options)])
        exact = fixed + layer_cost - (narrowing_saving(cuts, metric) or 0.0)
        return picked, level, exact <= budget * total * (1 + 1e-12)

    chosen, threshold, fits = select(capacity)
    if not fits:  # the largest capacity whose exact cost fits, by bisection
        low, high = smallest - fixed, capacity
        for _ in range(30):
            middle = (low + high) / 2
            if select(middle)[2]:
                low = middle
            else:
                high = middle
        chosen, threshold, _ = select(low)
    factorizable = _factorizable(analysis)
    layers = {a.layer.name: o.choice for a, o in zip(factorizable, chosen) if o.choice is not None}
    widths = {c.chain.name: o.choice[1] for c, o in zip(chains, chosen[len(layer_options):]) if o.choice is not None}
    return Plan(layers=layers, allocator=allocator, metric=metric, budget=float(budget), threshold=threshold,
                widths=widths)
