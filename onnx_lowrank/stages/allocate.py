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

With `--method eliminate` or `both`, every narrowable layer (`chains`) is an option too: keep `width` of its
output channels, scored by its readers' relative output error (`uniform`: the fraction of channels dropped;
`energy`: the squared error). A layer is narrowed or factorized, never both, and two narrowed layers that touch each
other (one reads what the other produces) save less than the sum of their savings, so chains that share a layer
and the layers they touch form one unit (`_Unit`; a layer no chain touches is a unit of its own). At every
threshold a unit takes the cheapest of all its ways to stay under it: which of its chains are narrowed (every
subset, up to MAX_CHAINS_PER_UNIT chains), each to its smallest width scoring under it, and the other layers
factorized as they would be alone, counted exactly (each cost model's `narrowing_saving`). Units are independent,
so the bisection above stays exact, and `both` can always do what either method alone does: its largest score is never
above theirs.

The optimum can still land far below the budget when a unit's staircase jumps: its only candidates (or the only ones
the never-slower guard kept) cut much more than the budget asks. A plan more than SHORTFALL of the model below its
budget records, for every unit it changed, what it kept and what the next less-cut candidate would keep
(`plan.Gap`), so the report can say why.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from onnx_lowrank.stages.analyze import Analysis, Candidate, ChainAnalysis, LayerAnalysis
from onnx_lowrank.stages.costs import MIN_SAVING
from onnx_lowrank.options import ALLOCATORS
from onnx_lowrank.stages.cost_models import unavailable_reason
from onnx_lowrank.errors import BudgetError, InvalidOptionError
from onnx_lowrank.plan import Gap, Plan

__all__ = ["SCORES", "Option", "minmax_select", "allocate", "smallest_budget", "plan_cost", "SHORTFALL"]

SHORTFALL = 0.05
"""A plan keeping more than this fraction of the model's metric below its budget records why (`Plan.gaps`)."""

FLOAT_ROUNDING = 1e-6
"""A score (a relative error) at or below this is the float32 rounding of an exact form, not a loss: it ties with
keeping the layer, so the cheapest exact form wins (an exactly rank-4 conv is written at the smallest rank offered,
not at a grouped form whose rounding happens to be smaller and which runs slower)."""


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
    ordered = sorted(options, key=lambda o: (o.score, o.cost, _sort_key(o.choice)))
    if not ordered or ordered[0].score > 0:
        raise ValueError("every layer needs an option of score 0 (keeping it dense)")
    stair = [ordered[0]]
    for option in ordered[1:]:
        if option.cost < stair[-1].cost:
            stair.append(option)
    return stair


def _sort_key(choice):
    """Ties in score and cost go to keeping the layer (None), then to the smaller choice."""
    return () if choice is None else (choice,) if isinstance(choice, int) else choice


def _alds_scores(analysis: LayerAnalysis) -> list[tuple[Candidate, float]]:
    return [(c, c.error) for c in analysis.candidates]


def _uniform_scores(analysis: LayerAnalysis) -> list[tuple[Candidate, float]]:
    max_rank = analysis.decompositions[1].max_rank
    return [(c, 1.0 - c.rank / max_rank) for c in analysis.candidates if c.k == 1]


def _energy_scores(analysis: LayerAnalysis) -> list[tuple[Candidate, float]]:
    chosen = [c for c in analysis.candidates if c.k == 1]
    dropped = analysis.decompositions[1].dropped_energy(np.array([c.rank for c in chosen], dtype=int))
    return list(zip(chosen, (float(d) for d in np.atleast_1d(dropped))))


SCORES = {"alds": _alds_scores, "uniform": _uniform_scores, "energy": _energy_scores}
"""Each allocator's per-candidate planning score (the names are declared in `options.ALLOCATORS`)."""
assert tuple(SCORES) == ALLOCATORS


def _counted_total(analysis: Analysis, metric: str) -> float:
    total = analysis.total(metric)
    if total is None or any(a.dense.get(metric) is None for a in analysis.layers):
        raise InvalidOptionError(unavailable_reason(metric))
    return total


@dataclass(frozen=True, order=True)
class Choice:
    """What one unit does: its factorized layers (name, (k, rank)) and its narrowed chains (name, width)."""

    layers: tuple[tuple[str, tuple[int, int]], ...] = ()
    widths: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, eq=False)
class _Unit:
    """Layers and chains whose costs depend on each other: the layers the chains touch (a layer is narrowed or
    factorized, not both) and the chains that share a layer (their savings do not add up). A layer that no chain
    touches is a unit of its own."""

    layers: tuple[LayerAnalysis, ...]
    chains: tuple[ChainAnalysis, ...] = ()


def _units(analysis: Analysis) -> list[_Unit]:
    """The allocation units of the analysis' method, in model order of their first layer."""
    chains = [c for c in analysis.chains if c.candidates] if analysis.method != "lowrank" else []
    root = {a.layer.name: a.layer.name for a in analysis.layers}

    def find(name: str) -> str:
        while root[name] != name:
            root[name] = root[root[name]]
            name = root[name]
        return name

    for entry in chains:
        names = [layer.name for layer in entry.chain.layers]
        for name in names[1:]:
            root[find(name)] = find(names[0])
    layers: dict[str, list[LayerAnalysis]] = {}
    for a in analysis.layers:
        layers.setdefault(find(a.layer.name), []).append(a)
    grouped: dict[str, list[ChainAnalysis]] = {}
    for entry in chains:
        grouped.setdefault(find(entry.chain.name), []).append(entry)
    units = [_Unit(layers=tuple(members), chains=tuple(grouped.get(key, ()))) for key, members in layers.items()]
    if analysis.method == "eliminate":  # only narrowing: layers no chain touches have nothing to offer
        units = [unit for unit in units if unit.chains]
    return units


MAX_CHAINS_PER_UNIT = 10
"""A unit considers every subset of its chains (which to narrow) up to this many chains; beyond, only all or none."""


def _layer_stair(analysis: LayerAnalysis, metric: str, allocator: str, method: str) -> list[Option]:
    """The layer's staircase: dense (score 0), then each candidate with the allocator's score; dense only when the
    method factorizes nothing."""
    options = [Option(0.0, analysis.dense[metric], None)]
    if method != "eliminate":
        options += [Option(_exact(score), c.costs[metric], (c.k, c.rank)) for c, score in SCORES[allocator](analysis)]
    return _staircase(options)


def _chain_stair(entry: ChainAnalysis, metric: str, allocator: str) -> list[Option]:
    """The chain's staircase: keep every channel (score 0), then each width the metric prices, by what it saves
    alone (exact costs are counted per unit: the saving falls with the width however the other chains are cut)."""
    options = [Option(0.0, 0.0, None)]
    for c in (c for c in entry.candidates if metric in c.savings):
        score = {"uniform": 1.0 - c.width / entry.chain.channels, "energy": c.error ** 2}.get(allocator, c.error)
        options.append(Option(_exact(score), -c.savings[metric], c.width))
    return _staircase(options)


def _exact(score: float) -> float:
    """0 for a score within float rounding of it (`FLOAT_ROUNDING`), else the score."""
    return 0.0 if score <= FLOAT_ROUNDING else score


def _unit_stair(unit: _Unit, metric: str, allocator: str, method: str, saving: Callable) -> list[Option]:
    """The unit's options at every threshold t: the cheapest way to keep every member's score <= t, over which of
    its chains are narrowed (each to its smallest width scoring <= t; the layers it touches stay dense) and how the
    other layers are factorized. Costs are exact, so the min-max over units stays exact."""
    layer_stairs = [_layer_stair(a, metric, allocator, method) for a in unit.layers]
    if not unit.chains and len(layer_stairs) == 1:
        return [replace(o, choice=Choice(layers=((unit.layers[0].layer.name, o.choice),) if o.choice else ()))
                for o in layer_stairs[0]]
    chain_stairs = [_chain_stair(entry, metric, allocator) for entry in unit.chains]
    thresholds = np.array(sorted({o.score for stair in layer_stairs + chain_stairs for o in stair}))

    def steps(stair: list[Option]) -> np.ndarray:  # the stair's option index in force at every threshold
        return np.searchsorted([o.score for o in stair], thresholds, side="right") - 1

    layer_steps = [steps(stair) for stair in layer_stairs]
    chain_steps = [steps(stair) for stair in chain_stairs]
    layer_costs = np.array([[stair[i].cost for i in at] for stair, at in zip(layer_stairs, layer_steps)])
    dense = np.array([a.dense[metric] for a in unit.layers])
    position = {a.layer.name: index for index, a in enumerate(unit.layers)}
    best_cost = np.full(len(thresholds), np.inf)
    best_subset: list[tuple[int, ...]] = [()] * len(thresholds)
    for subset in _subsets(len(unit.chains)):
        touched = sorted(position[name] for name in _touched(unit, subset))
        free = np.ones(len(unit.layers), dtype=bool)
        free[touched] = False
        costs = layer_costs[free].sum(axis=0) + dense[touched].sum()
        savings: dict[tuple[int, ...], float] = {}
        for t in range(len(thresholds)):
            widths = tuple(chain_steps[i][t] for i in subset)
            if widths not in savings:
                cuts = [(unit.chains[i].chain, chain_stairs[i][w].choice) for i, w in zip(subset, widths) if w > 0]
                savings[widths] = saving(cuts) if cuts else 0.0
            cost = costs[t] - savings[widths]
            if cost < best_cost[t]:
                best_cost[t], best_subset[t] = cost, subset
    stair: list[Option] = []
    for t in range(len(thresholds)):
        if stair and best_cost[t] >= stair[-1].cost:
            continue
        subset = best_subset[t]
        touched = _touched(unit, subset)
        members = [(a.layer.name, steps_of[at[t]]) for a, steps_of, at in zip(unit.layers, layer_stairs, layer_steps)
                   if a.layer.name not in touched]
        cuts = [(unit.chains[i].chain.name, chain_stairs[i][chain_steps[i][t]]) for i in subset]
        score = max([o.score for _, o in members + cuts], default=0.0)
        choice = Choice(layers=tuple((name, o.choice) for name, o in members if o.choice is not None),
                        widths=tuple((name, o.choice) for name, o in cuts if o.choice is not None))
        stair.append(Option(score, float(best_cost[t]), choice))
    return stair


def _touched(unit: _Unit, subset: tuple[int, ...]) -> set[str]:
    """The layers that narrowing the chains `subset` of the unit changes: their producers and readers."""
    return {layer.name for i in subset for layer in unit.chains[i].chain.layers}


def _subsets(count: int) -> list[tuple[int, ...]]:
    """Every subset of `count` chains, or only none and all past MAX_CHAINS_PER_UNIT."""
    if count > MAX_CHAINS_PER_UNIT:
        return [(), tuple(range(count))]
    return [s for size in range(count + 1) for s in itertools.combinations(range(count), size)]


def _stairs(analysis: Analysis, metric: str, allocator: str) -> tuple[list[list[Option]], float]:
    """Every unit's staircase, and what all their layers cost as they are."""
    units = _units(analysis)
    dense = sum(a.dense[metric] for unit in units for a in unit.layers)
    saving = analysis.costs[metric].narrowing_saving
    return [_unit_stair(unit, metric, allocator, analysis.method, saving) for unit in units], dense


def _has_units(analysis: Analysis) -> bool:
    """Whether the method has anything it may change: a layer to factorize or a chain to narrow."""
    return bool(_units(analysis))


def smallest_budget(analysis: Analysis, metric: str = "params", allocator: str = "alds") -> float:
    """The smallest budget `allocate` can meet: every unit at its cheapest option."""
    if not _has_units(analysis):
        return 1.0
    total = _counted_total(analysis, metric)
    stairs, dense = _stairs(analysis, metric, allocator)
    fixed = total - dense
    smallest = fixed + sum(stair[-1].cost for stair in stairs)
    if not total:
        return 1.0
    fraction = max(smallest, 0.0) / total
    while fraction * total < smallest:  # float round-off: the fraction must give back at least `smallest`
        fraction = float(np.nextafter(fraction, 2.0))
    return min(fraction, 1.0)


def allocate(analysis: Analysis, budget: float, metric: str = "params", allocator: str = "alds") -> Plan:
    """The plan that keeps `budget` (a fraction in (0, 1]) of the model's `metric`, per `allocator`."""
    if not _has_units(analysis):
        if budget < 1 and analysis.method != "lowrank" and (analysis.layers or analysis.chains):
            raise BudgetError(f"A budget of {budget:g} of the {metric} cannot be reached with --method "
                              f"{analysis.method}: no layer of this model can be narrowed (see analyze --method "
                              f"{analysis.method} for why).")
        # nothing to change, whatever can be counted: the empty plan, and the report says why
        return Plan(layers={}, allocator=allocator, metric=metric, budget=float(budget), threshold=0.0)
    total = _counted_total(analysis, metric)
    stairs, dense = _stairs(analysis, metric, allocator)
    fixed = total - dense
    smallest = fixed + sum(stair[-1].cost for stair in stairs)
    if budget * total < smallest:
        forms = "factorizations" if analysis.method == "lowrank" else "factorized and narrowed layers"
        guard = (f" (only {forms} measured faster than their dense layers count; --allow-slower lifts that)"
                 if analysis.guarded else "")
        if smallest >= total:
            raise BudgetError(
                f"A budget of {budget:g} of the {metric} cannot be reached: none of the {len(analysis.layers)} "
                f"factorizable layers has a factorization saving at least {MIN_SAVING:.0%} of it{guard}, so the "
                "model can only stay as it is."
            )
        method = "" if analysis.method == "lowrank" else f" and --method {analysis.method}"
        raise BudgetError(
            f"A budget of {budget:g} of the {metric} cannot be reached with the {allocator} allocator{method}: "
            f"this model can keep from {smallest / total:.3f} to 1.0 of its {metric}{guard}."
        )
    chosen, threshold = minmax_select(stairs, budget * total - fixed)
    units = _units(analysis)
    kept = (fixed + sum(option.cost for option in chosen)) / total if total else 1.0
    gaps = _gaps(units, stairs, chosen, metric) if budget - kept > SHORTFALL else ()
    layers = dict(item for option in chosen for item in option.choice.layers)
    widths = dict(item for option in chosen for item in option.choice.widths)
    order = {a.layer.name: index for index, a in enumerate(analysis.layers)}
    return Plan(layers=dict(sorted(layers.items(), key=lambda item: order[item[0]])), allocator=allocator,
                metric=metric, budget=float(budget), threshold=threshold,
                widths=dict(sorted(widths.items(), key=lambda item: order[item[0]])), gaps=gaps)


def _gaps(units: list[_Unit], stairs: list[list[Option]], chosen: list[Option], metric: str) -> tuple[Gap, ...]:
    """Every changed unit's form and its next less-cut candidate, as fractions of the unit's dense cost: those with
    nothing between dense and their form first, then by how much more the next candidate would have cost."""
    found = []
    for unit, stair, option in zip(units, stairs, chosen):
        stair = _staircase(stair)
        at = stair.index(option)
        if at == 0:
            continue
        dense = sum(a.dense[metric] for a in unit.layers) or 1.0
        names = [name for name, _ in option.choice.layers + option.choice.widths]
        label = names[0] if len(names) == 1 else ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
        up = None if at == 1 else stair[at - 1].cost
        gap = Gap(layer=label, kept=option.cost / dense, next_kept=None if up is None else up / dense,
                  only=len(stair) == 2)
        found.append((up is not None, -(stair[at - 1].cost - option.cost), gap))
    return tuple(gap for *_, gap in sorted(found, key=lambda item: item[:2]))


def plan_cost(analysis: Analysis, plan: Plan, metric: str) -> float | None:
    """The whole model's `metric` with `plan` written, as the analysis' cost models price it: the original total,
    plus every factorized layer's change, minus what the narrowed layers save together. None when a cost model
    cannot price the plan (or the analysis has no such model)."""
    model = analysis.costs.get(metric)
    if model is None:
        return None
    total = model.total
    for entry in analysis.layers:
        choice = plan.layers.get(entry.layer.name)
        if choice is not None:
            priced = model.factorized(entry.layer, *choice)
            if priced is None:
                return None
            total += priced - entry.dense[metric]
    if plan.widths:
        chains = {entry.chain.name: entry.chain for entry in analysis.chains}
        saved = model.narrowing_saving([(chains[name], width) for name, width in plan.widths.items()])
        if saved is None:
            return None
        total -= saved
    return total
