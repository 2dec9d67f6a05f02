"""The allocator is exactly optimal for the min-max objective, and the baselines mean what they say."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest

from onnx_lowrank.stages.cost_models import FlopsCost
import onnx
import onnx.numpy_helper
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_lowrank.stages.allocate import Option, allocate, minmax_select
from onnx_lowrank.stages.analyze import analyze_layers
from onnx_lowrank.ops.layer import Layer
from onnx_lowrank.stages.discover import Discovery
from onnx_lowrank.errors import BudgetError, InvalidOptionError


@st.composite
def instances(draw):
    """A few layers, each with a dense option (score 0) and a few random (score, cost) options, and a capacity."""
    layers = []
    for index in range(draw(st.integers(1, 4))):
        dense = draw(st.integers(5, 60))
        count = draw(st.integers(0, 4))
        options = [Option(0.0, dense, None)]
        for choice in range(count):
            score = draw(st.sampled_from([0.05, 0.1, 0.2, 0.3, 0.5, 0.8]))
            options.append(Option(score, draw(st.integers(1, dense)), (1, choice + 1)))
        layers.append(options)
    smallest = sum(min(o.cost for o in options) for options in layers)
    largest = sum(options[0].cost for options in layers)
    capacity = draw(st.integers(smallest, largest))
    return layers, capacity


@settings(max_examples=300, deadline=None)
@given(instances())
def test_bisection_matches_brute_force(instance):
    layers, capacity = instance
    chosen, threshold = minmax_select(layers, capacity)
    assert sum(o.cost for o in chosen) <= capacity
    assert max(o.score for o in chosen) == threshold
    best = min(
        max(o.score for o in combo)
        for combo in itertools.product(*layers)
        if sum(o.cost for o in combo) <= capacity
    )
    assert threshold == best
    # the unused capacity cannot pay for lowering any single layer's score any further
    leftover = capacity - sum(o.cost for o in chosen)
    for options, choice in zip(layers, chosen):
        cheaper_fix = [o for o in options if o.score < choice.score and o.cost - choice.cost <= leftover]
        assert not cheaper_fix


def test_capacity_below_every_allocation_is_refused():
    with pytest.raises(ValueError):
        minmax_select([[Option(0.0, 10, None), Option(0.5, 4, (1, 1))]], 3)


def _layer(name: str, matrix: np.ndarray, positions: int | None = 100) -> Layer:
    return Layer(
        name=name,
        op="Gemm",
        node_output=name + "_out",
        input_name=name + "_in",
        weight_name=name + "_w",
        weight_shape=matrix.shape,
        matrix_shape=matrix.shape,
        source=lambda: matrix,
        in_channels=matrix.shape[1],
        kernel_shape=(),
        dtype=np.dtype(np.float32),
        output_positions=positions,
        activation_rank=2,
    )


def _analysis(seed: int = 0, rank_multiple: int = 1, positions: int | None = 100):
    rng = np.random.default_rng(seed)
    # layers with different spectra: a decaying one, a flat one, a low-rank-plus-noise one
    decaying = rng.standard_normal((48, 64)) * (0.8 ** np.arange(64))
    flat = rng.standard_normal((32, 48))
    low_rank = rng.standard_normal((64, 6)) @ rng.standard_normal((6, 40)) + 0.05 * rng.standard_normal((64, 40))
    layers = tuple(_layer(n, m, positions) for n, m in [("a", decaying), ("b", flat), ("c", low_rank)])
    # analyze_layers counts the model's params: give it a model holding exactly these weights
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [],
            "g",
            [],
            [],
            initializer=[onnx.numpy_helper.from_array(l.read_matrix().astype(np.float32), l.weight_name) for l in layers],
        )
    )
    shapes = {} if positions is not None else None  # {}: FLOPs counted (the weight-only model has no nodes: 0)
    return analyze_layers(model, Discovery(layers=layers, skipped=()), shapes, max_groups=4, rank_multiple=rank_multiple)


@pytest.mark.parametrize("allocator", ["alds", "uniform", "energy"])
@pytest.mark.parametrize("budget", [0.9, 0.7, 0.5, 0.3])
def test_budget_is_met_and_nearly_used(allocator, budget):
    analysis = _analysis()
    plan = allocate(analysis, budget, metric="params", allocator=allocator)
    kept = analysis.total("params")
    for entry in analysis.layers:
        if entry.layer.name in plan.layers:
            k, rank = plan.layers[entry.layer.name]
            chosen = next(c for c in entry.candidates if (c.k, c.rank) == (k, rank))
            kept += chosen.costs["params"] - entry.dense["params"]
    assert kept <= budget * analysis.total("params")
    assert kept >= (budget - 0.05) * analysis.total("params")  # three small layers: steps of a few percent


def test_alds_min_max_error_is_optimal_against_brute_force_on_real_candidates():
    analysis = _analysis()
    capacity = 0.5 * analysis.total("params")
    plan = allocate(analysis, 0.5, metric="params", allocator="alds")
    errors = {
        a.layer.name: next(c.error for c in a.candidates if (c.k, c.rank) == plan.layers[a.layer.name])
        if a.layer.name in plan.layers
        else 0.0
        for a in analysis.layers
    }
    per_layer = [[(0.0, a.dense["params"])] + [(c.error, c.costs["params"]) for c in a.candidates] for a in analysis.layers]
    best = min(
        max(e for e, _ in combo)
        for combo in itertools.product(*per_layer)
        if sum(p for _, p in combo) <= capacity
    )
    assert max(errors.values()) == pytest.approx(best, abs=0)


def test_uniform_keeps_one_rank_ratio_and_k_1():
    analysis = _analysis()
    plan = allocate(analysis, 0.6, metric="params", allocator="uniform")
    assert all(k == 1 for k, _ in plan.layers.values())
    ratios = [rank / min(analysis.layer(name).layer.matrix_shape) for name, (_, rank) in plan.layers.items()]
    # the same target ratio rounded up to a whole rank: within one rank step of each other
    steps = [1 / min(analysis.layer(name).layer.matrix_shape) for name in plan.layers]
    assert max(ratios) - min(ratios) <= max(steps) + 1e-12


def test_energy_discards_the_same_energy_everywhere():
    analysis = _analysis()
    plan = allocate(analysis, 0.6, metric="params", allocator="energy")
    assert all(k == 1 for k, _ in plan.layers.values())
    for name, (_, rank) in plan.layers.items():
        values = analysis.layer(name).decompositions[1].spectrum.singular_values[0] ** 2
        dropped = values[rank:].sum() / values.sum()
        assert dropped <= plan.threshold + 1e-12
        # one rank less would drop more than the threshold, or would not be cheaper than what was chosen
        assert values[rank - 1 :].sum() / values.sum() > plan.threshold or rank == 1


def test_rank_multiple_restricts_ranks():
    analysis = _analysis(rank_multiple=8)
    assert all(c.rank % 8 == 0 for a in analysis.layers for c in a.candidates)
    plan = allocate(analysis, 0.5, metric="params", allocator="alds")
    assert plan.layers and all(rank % 8 == 0 for _, rank in plan.layers.values())


def test_candidates_are_smaller_than_dense_and_errors_fall_with_rank():
    for entry in _analysis().layers:
        assert all(c.costs["params"] < entry.dense["params"] for c in entry.candidates)
        for k in entry.decompositions:
            errors = [c.error for c in entry.candidates if c.k == k]
            assert errors == sorted(errors, reverse=True)


def test_unreachable_budget_names_the_reachable_range():
    with pytest.raises(BudgetError, match=r"can keep from 0\.\d+ to 1\.0"):
        allocate(_analysis(), 0.01)


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, float("nan"), True])
def test_budget_out_of_range_is_an_option_error(budget):
    """Checked once, at the public boundary (`plan`); `allocate` trusts its settings."""
    from onnx_lowrank import plan

    with pytest.raises(InvalidOptionError, match="budget"):
        plan(_analysis(), budget)


def test_flops_metric_without_shapes_asks_for_input_shapes():
    with pytest.raises(InvalidOptionError, match="--input-shape"):
        allocate(_analysis(positions=None), 0.5, metric="flops")


def test_flops_metric_uses_flop_costs():
    analysis = _analysis(positions=100)
    # the test model has no nodes to count FLOPs on: its FLOPs are exactly those of the three layers
    flops = FlopsCost(total=sum(a.dense["flops"] for a in analysis.layers))
    analysis = dataclasses.replace(analysis, costs={**analysis.costs, "flops": flops})
    plan = allocate(analysis, 0.5, metric="flops")
    kept = sum(
        next(c.costs["flops"] for c in a.candidates if (c.k, c.rank) == plan.layers[a.layer.name])
        if a.layer.name in plan.layers
        else a.dense["flops"]
        for a in analysis.layers
    )
    assert plan.metric == "flops" and plan.layers
    assert 0.45 * analysis.total("flops") <= kept <= 0.5 * analysis.total("flops")


def test_a_budget_no_candidate_can_serve_says_so():
    """Layers exist but none has a candidate: not 'can keep from 1.000 to 1.0', but why."""
    analysis = _analysis()
    bare = dataclasses.replace(analysis, layers=tuple(dataclasses.replace(a, candidates=()) for a in analysis.layers))
    with pytest.raises(BudgetError, match=r"none of the 3 factorizable layers has a factorization saving at least 10%"):
        allocate(bare, 0.5)


# ------------------------------------------------------------------------------ narrowing and factorizing together


@pytest.fixture(scope="module")
def narrowable():
    """The test CNN with enough samples that both of its chains are judged: conv1 -> conv2 -> conv3 share conv2
    (one unit of two chains), fc1 -> fc2 is a unit of its own."""
    from onnx_lowrank import analyze

    from helpers.builders import build_cnn

    model = build_cnn()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(130)]
    analysis = analyze(model, calibration=feeds, method="both", allow_slower=True)
    assert {c.chain.name for c in analysis.chains if c.candidates} == {"conv1", "conv2", "fc1"}
    return model, analysis


@pytest.mark.parametrize("metric", ["params", "flops"])
@pytest.mark.parametrize("budget", [0.9, 0.7, 0.5, 0.35])
def test_both_is_never_worse_than_either_method_alone_and_its_cost_is_exact(narrowable, metric, budget):
    """Every plan of one method alone is a plan `both` may choose, so its min-max threshold is at most theirs; and
    the written model keeps at most the budget (narrowed layers that touch each other are counted exactly)."""
    from onnx_lowrank import apply
    from onnx_lowrank.stages.costs import model_flops, model_params
    from onnx_lowrank.graph.shapes import tensor_shapes

    model, analysis = narrowable
    thresholds = {}
    for method in ("lowrank", "eliminate", "both"):
        try:
            plan = allocate(dataclasses.replace(analysis, method=method), budget, metric=metric)
        except BudgetError:
            continue
        thresholds[method] = plan.threshold
        if method == "both":
            written, _ = apply(model, plan, analysis=analysis, verify=False)
            count = model_params if metric == "params" else lambda m: model_flops(m, tensor_shapes(
                m, {"x": (1, 3, 16, 16)}, [name for node in m.graph.node for name in [*node.input, *node.output] if name]))
            assert count(written) <= budget * count(model) * (1 + 1e-9)
    assert "both" in thresholds
    assert all(thresholds["both"] <= t + 1e-12 for t in thresholds.values())


def test_a_unit_considers_every_subset_of_its_chains(narrowable):
    """At every threshold the unit of conv1, conv2 and conv3 costs the least over which chains are narrowed: checked
    against brute force over the chains' widths and the free layers' candidates."""
    import itertools

    from onnx_lowrank.stages.allocate import _unit_stair, _units
    from onnx_lowrank.stages.costs import narrowing_saving

    _, analysis = narrowable
    unit = next(u for u in _units(analysis) if len(u.chains) == 2)
    stair = _unit_stair(unit, "params", "alds", "both", analysis.costs["params"].narrowing_saving)
    for option in stair:
        t = option.score
        best = math.inf
        for subset in itertools.product(*[[None] + [c for c in e.candidates if c.error <= t] for e in unit.chains]):
            touched = {layer.name for e, c in zip(unit.chains, subset) if c is not None
                       for layer in e.chain.layers}
            cost = sum(a.dense["params"] if a.layer.name in touched else
                       min([a.dense["params"]] + [c.costs["params"] for c in a.candidates if c.error <= t])
                       for a in unit.layers)
            cuts = [(e.chain, c.width) for e, c in zip(unit.chains, subset) if c is not None]
            best = min(best, cost - (narrowing_saving(cuts, "params") if cuts else 0.0))
        assert option.cost == pytest.approx(best)


def test_widths_keep_the_channel_block_when_asked():
    from onnx_lowrank.math.elimination import widths

    assert widths(64, 0) == list(range(4, 64, 4))
    assert 21 in widths(64, 21) and widths(64, 21, align=8) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert widths(12, 0, align=8) == [8, 16]  # the caller drops widths not below the channel count


# ------------------------------------------------------------------------------ no silent overshoot


@st.composite
def stairs(draw):
    """A few layers, each dense (score 0) plus random float-scored, float-cost options (dominated ones too), and a
    capacity anywhere between the cheapest allocation and the dense model."""
    layers = []
    for index in range(draw(st.integers(1, 4))):
        dense = draw(st.floats(1.0, 50.0))
        options = [Option(0.0, dense, None)]
        for choice in range(draw(st.integers(0, 4))):
            score = draw(st.floats(0.001, 1.0))
            options.append(Option(score, draw(st.floats(0.0, dense)), (1, choice + 1)))
        layers.append(options)
    smallest = sum(min(o.cost for o in options) for options in layers)
    largest = sum(options[0].cost for options in layers)
    return layers, smallest + draw(st.floats(0.0, 1.0)) * (largest - smallest)


@settings(max_examples=400, deadline=None)
@given(stairs())
def test_no_feasible_allocation_nearer_the_budget_has_a_smaller_worst_score(instance):
    """Issue 19: landing far below the budget is only ever forced. Every allocation that fits and spends more of the
    capacity than the chosen one (lands nearer the budget) has a worst score at least the chosen one's."""
    layers, capacity = instance
    chosen, threshold = minmax_select(layers, capacity)
    spent = sum(o.cost for o in chosen)
    assert spent <= capacity + 1e-9
    for combo in itertools.product(*layers):
        cost = sum(o.cost for o in combo)
        if spent < cost <= capacity:
            assert max(o.score for o in combo) >= threshold


def _only_candidate(analysis, name: str, keep: float):
    """The analysis with layer `name` left one candidate: the smallest rank keeping at least `keep` of its params."""
    entry = analysis.layer(name)
    dense = entry.dense["params"]
    survivor = min((c for c in entry.candidates if c.k == 1 and c.costs["params"] >= keep * dense),
                   key=lambda c: c.costs["params"])
    layers = tuple(dataclasses.replace(a, candidates=(survivor,)) if a is entry else a for a in analysis.layers)
    return dataclasses.replace(analysis, layers=layers), survivor.costs["params"] / dense


def test_a_plan_far_below_its_budget_records_the_layers_without_a_candidate_between():
    """The issue's case: one surviving destructive candidate meets a 0.9 budget far below it. The plan says which
    layer had nothing between dense and the form chosen, and the record round-trips through the plan JSON."""
    from onnx_lowrank.plan import Plan

    analysis, fraction = _only_candidate(_analysis(), "a", 0.3)
    others = tuple(dataclasses.replace(a, candidates=()) if a.layer.name != "a" else a for a in analysis.layers)
    analysis = dataclasses.replace(analysis, layers=others)
    plan = allocate(analysis, 0.9)
    assert set(plan.layers) == {"a"}
    assert len(plan.gaps) == 1 and plan.gaps[0].layer == "a" and plan.gaps[0].only
    assert plan.gaps[0].kept == pytest.approx(fraction)
    assert plan.gaps[0].describe("params") == f"a: the only candidate keeps {fraction:.2f} of its params"
    assert Plan.from_dict(plan.to_dict()).gaps == plan.gaps
    assert "gaps" not in allocate(_analysis(), 0.9).to_dict()  # a plan near its budget records nothing


def test_gaps_name_the_next_candidate_when_there_is_one():
    analysis = _analysis()
    entry = analysis.layer("a")
    dense = entry.dense["params"]
    k1 = sorted((c for c in entry.candidates if c.k == 1), key=lambda c: c.costs["params"])
    pair = (k1[0], k1[-1])  # the most cut and the least cut: a big jump between them
    layers = tuple(dataclasses.replace(a, candidates=pair if a is entry else ()) for a in analysis.layers)
    analysis = dataclasses.replace(analysis, layers=layers)
    total = analysis.total("params")
    rest = total - dense
    budget = (rest + k1[-1].costs["params"]) / total - 0.001  # the least cut one just misses it
    plan = allocate(analysis, budget)
    assert plan.layers["a"] == (k1[0].k, k1[0].rank)
    (gap,) = plan.gaps
    assert not gap.only and gap.next_kept == pytest.approx(k1[-1].costs["params"] / dense)
    assert "the next candidate up keeps" in gap.describe("params")


def test_plan_json_without_gaps_and_bad_gaps():
    from onnx_lowrank.plan import Plan

    data = allocate(_analysis(), 0.5).to_dict()
    assert Plan.from_dict(data).gaps == ()  # plans written before gaps existed load as they were
    with pytest.raises(InvalidOptionError, match="gaps"):
        Plan.from_dict({**data, "gaps": [{"layer": "a"}]})
