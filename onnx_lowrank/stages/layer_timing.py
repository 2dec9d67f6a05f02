"""Measure, in onnxruntime, what each layer costs dense and factorized: the data behind the latency cost model.

Every layer is cut out of the model (`passes.isolate_layer`: its node alone on an input of its real shape) and its
factorized forms are written from that by the real rewrite passes, for every group count k and a grid of ranks:

- ranks up to the largest candidate (one saving at least `cost.MIN_SAVING`; larger ones are never candidates);
- for a 2-D Conv, which onnxruntime runs in its blocked NCHWc layout (channel block: 16 with AVX-512 or on ARM64,
  else 8), only forms that keep that layout at full efficiency: ranks on multiples of the block (a rank off it is
  padded up to the next multiple, so it costs as much and keeps less) and, for k > 1, input channels per group on
  the block too (onnxruntime's rule for grouped convs, nchwc_transformer.cc). A grouped form off the block falls
  back to plain NCHW kernels and forces layout conversions around it in the real model, which a layer timed alone
  does not show (measured on YOLOv8n: such layers predicted at 0.7x dense ran at 1.0-1.5x in the model). Forms off
  the block are therefore not offered (`FormTiming.aligned_to`): this is the automatic rank rounding.
  Other layers (Gemm/MatMul gain nothing from alignment) get evenly spaced ranks.

A layer timed alone is not a layer inside a model: the extra node, the hidden tensor and the neighbours' layouts
change what a factorization saves (measured on YOLOv8n's head: a rank-16 form ran at 0.48x of dense alone and
0.93x inside the model). So the savings are calibrated once per model (`realized_fraction`): a probe model with
every layer factorized at its smallest timed rank is timed against the original, interleaved, and the fraction of
the predicted saving it really delivered scales every layer's saving.

Deployed as int8 (`--quantize`), every variant, probe and whole model is timed in its int8 form
(`quantize.QuantizedTimer`, under keys of their own): a quantized factorized pair gains over the quantized dense
layer other than what it gains in float32, and a latency budget is then a fraction of int8 alone's time.

All variants of one layer are timed interleaved, round after round, in sessions made with the deployment's settings
(threads, provider, optimization level) whose threads stop spinning after each run, so no variant steals a core
from the next; the median per variant is kept. Results go to the `LatencyCache`, so a second run only looks them up.
"""

from __future__ import annotations

import os
from dataclasses import replace
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from onnx_lowrank.stages import costs as cost

from onnx_lowrank.stages.cost_models import FormTiming, LatencyCost, LayerTiming
from onnx_lowrank.math.elimination import Folded, widths
from onnx_lowrank.ops.base import family_for, group_counts, width_alignment
from onnx_lowrank.ops.layer import Chain, Layer
from onnx_lowrank.stages.discover import discover
from onnx_lowrank.stages.timing import OnnxruntimeTimer, Timer, measure_latency_ratio, model_latency, timer_of
from onnx_lowrank.stages.latency_cache import LatencyCache, default_cache_path, model_key, variant_key
from onnx_lowrank.passes import eliminate_channels, factorize_layers
from onnx_lowrank.passes.isolate import ISOLATED_INPUT, isolate_layer
from onnx_lowrank.graph.runtime import RuntimeSettings
from onnx_lowrank.math.svd import Factors

__all__ = ["block_size", "blocked", "rank_grid", "largest_candidate_rank", "layer_key", "measure_layers",
           "narrowing_grid", "realized_fraction", "realized_narrowing", "MIN_REALIZED",
           "MAX_REALIZED", "latency_cost", "open_cache", "overhead_model", "per_node_overhead"]

ROUNDS = 7
"""Interleaved rounds per variant; the median is kept."""
BLOCK_SECONDS = 0.0005
"""A tiny layer is run several times per round so that each timed block lasts about this long."""
GRID_POINTS = {1: 5}
"""Ranks timed per k (k = 1 gets more: it is the most common choice); other k get DEFAULT_POINTS."""
DEFAULT_POINTS = 4


def block_size() -> int:
    """onnxruntime's NCHWc channel block on this CPU: 16 with AVX-512 or on ARM64, else 8."""
    machine = os.uname().machine.lower() if hasattr(os, "uname") else ""
    if machine in ("aarch64", "arm64"):
        return 16
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as stream:
            return 16 if " avx512f" in stream.read() else 8
    except OSError:
        return 8


def _spread(values: Sequence[int], count: int) -> list[int]:
    """At most `count` of the sorted `values`, evenly spaced, always keeping the first and the last."""
    if len(values) <= count:
        return list(values)
    picks = np.linspace(0, len(values) - 1, count).round().astype(int)
    return sorted({values[i] for i in picks})


def rank_grid(largest: int, block: int, points: int) -> list[int]:
    """At most `points` ranks to time for a form whose candidate ranks run from 1 to `largest`: multiples of
    `block` (none if `largest` < `block`), evenly spread, always including the smallest and the largest."""
    return _spread(list(range(block, largest + 1, block)), points) if largest >= 1 else []


def blocked(layer: Layer, block: int) -> bool:
    """Whether onnxruntime runs this layer in its blocked NCHWc layout (`OpFamily.blocked`: every 2-D Conv with
    group 1), whatever the block."""
    return family_for(layer.op).blocked(layer)


def largest_candidate_rank(layer: Layer, k: int) -> int:
    """The largest rank at which the factorized layer is a candidate (`cost.is_smaller`; 0 if none is). Without a
    bias correction, which only lowers it: one grid serves weight-only and data-aware analyses alike."""
    top = min(layer.out_channels, layer.columns // k)
    for rank in range(top, 0, -1):
        if cost.is_smaller(layer, k, rank):
            return rank
    return 0


def layer_key(model: onnx.ModelProto, layer: Layer, input_shape: Sequence[int]) -> dict:
    """What a layer's time depends on: op, attributes, shapes, dtype and whether it has a bias."""
    node = next(n for n in model.graph.node if n.output and n.output[0] == layer.node_output)
    attributes = sorted(str(onnx.helper.get_attribute_value(a)) + a.name for a in node.attribute)
    return {
        "op": layer.op,
        "attributes": attributes,
        "input": list(map(int, input_shape)),
        "weight": list(layer.weight_shape),
        "dtype": str(np.dtype(layer.dtype)),
        "bias": len(node.input) > 2 and bool(node.input[2]),
    }


def _random_factors(layer: Layer, k: int, rank: int, rng: np.random.Generator) -> Factors:
    """Random factors of the timed shapes, scaled to keep the activations' size (1 / sqrt of the sum's length):
    a probe model of many such layers must not overflow, since its int8 form is calibrated on its own outputs."""
    cols = layer.columns
    return Factors(k=k, rank=rank, encoder=rng.standard_normal((k, rank, cols // k)) / np.sqrt(cols // k),
                   decoder=rng.standard_normal((layer.out_channels, k * rank)) / np.sqrt(k * rank))


def _forms(layer: Layer, max_groups: int, block: int) -> dict[int, tuple[list[int], int]]:
    """k -> (grid ranks, rank alignment) for every k with at least one candidate rank worth timing."""
    forms = {}
    align = block if blocked(layer, block) else 1
    for k in group_counts(layer, max_groups):
        if k > 1 and (layer.in_channels // k) % align:
            continue  # a grouped conv with input channels per group off the block loses the blocked kernels
        grid = rank_grid(largest_candidate_rank(layer, k), align, GRID_POINTS.get(k, DEFAULT_POINTS))
        if grid:
            forms[k] = (grid, align)
    return forms


NARROWED_POINTS = 4
"""Widths timed per narrowed role of a layer (fewer output channels, fewer input channels)."""


def narrowing_grid(channels: int, align: int) -> list[int]:
    """The widths to time a layer at when `channels` of its output (or input) channels may be cut: at most
    NARROWED_POINTS of the widths a chain may keep (`analyze.widths`, on the channel block `align`), evenly spread."""
    return _spread([w for w in widths(channels, 0, align) if w < channels], NARROWED_POINTS)


def measure_layers(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    shapes: Mapping[str, tuple[int, ...]],
    settings: RuntimeSettings,
    cache: LatencyCache,
    max_groups: int = 8,
    progress: Callable[[int, int], None] | None = None,
    narrowing: Mapping[str, tuple[Sequence[int], Sequence[int]]] | None = None,
    timer: Timer | None = None,
    deployed: str | None = None,
) -> dict[str, LayerTiming]:
    """Dense and factorized timings of every layer (layer name -> LayerTiming), from the cache where it has them;
    new timings are put in the cache, which the caller saves. `narrowing`: layer name -> (the output channel counts,
    the input channel counts) to time it narrowed at (`narrowing_grid`). `timer`: default onnxruntime with
    `settings` (which also key the cache). `deployed`: the int8 form `timer` times in (`Quantization.key`, part of
    the keys; None: float)."""
    timer = timer or OnnxruntimeTimer(settings)
    block = block_size()
    narrowing = narrowing or {}
    timings = {}
    for index, layer in enumerate(layers, 1):
        forms = _forms(layer, max_groups, block)
        # A shared weight: every node reading it is timed (each at its own input shape; equal ones come from the
        # cache) and the times add up, since every node runs. Chains never narrow one.
        grids = narrowing.get(layer.name, ((), ())) if not layer.shared else ((), ())
        timings[layer.name] = _summed([_measure_layer(model, view, tuple(shapes[view.input_name]), settings, cache,
                                                      forms, grids, timer, deployed)
                                        for view in layer.views()])
        if progress is not None:
            progress(index, len(layers))
    return timings


def _measure_layer(model, layer, input_shape, settings, cache, forms, narrowing, timer, deployed) -> LayerTiming:
    description = layer_key(model, layer, input_shape)
    variants: list[tuple | None] = [None]
    for k, (grid, _) in forms.items():
        variants += [(k, r) for r in grid]
    variants += [("rows", w) for w in narrowing[0]] + [("columns", w) for w in narrowing[1]]
    keys = [variant_key(description, variant, settings, deployed) for variant in variants]
    # Any variant missing: time them all again, together, so a layer's times all come from one period (a layer's
    # dense time cached minutes ago against variants timed now would carry the machine's drift into the ratio).
    # Entries without per-round times (a version 1 cache) count as missing: the guard judges noise by the rounds.
    missing = list(zip(variants, keys)) if any(cache.rounds(key) is None for key in keys) else []
    if missing:
        isolated = isolate_layer(model, layer, input_shape)
        (alone,) = discover(isolated, shapes={ISOLATED_INPUT: input_shape}).layers
        rng = np.random.default_rng(0)
        models, feeds = [], []
        for variant, _ in missing:
            shape = list(input_shape)
            if variant is None:
                models.append(isolated)
            elif variant[0] == "rows":
                models.append(isolate_layer(model, layer, input_shape, rows=variant[1]))
            elif variant[0] == "columns":
                models.append(isolate_layer(model, layer, input_shape, columns=variant[1]))
                shape[family_for(layer.op).channel_axis] = variant[1]
            else:
                models.append(factorize_layers(isolated, [(alone, _random_factors(alone, *variant, rng))])[0])
            feeds.append(shape)
        data = {}
        feeds = [[{ISOLATED_INPUT: data.setdefault(tuple(shape), rng.standard_normal(shape).astype(layer.dtype))}]
                 for shape in feeds]
        for (_, key), rounds in zip(missing, timer.time(models, feeds, ROUNDS, block_s=BLOCK_SECONDS).samples):
            cache.put(key, rounds)
    measured = {variant: cache.get(key) for variant, key in zip(variants, keys)}
    rounds = {variant: cache.rounds(key) for variant, key in zip(variants, keys)}
    result = {k: FormTiming(points=tuple((r, measured[(k, r)]) for r in grid), aligned_to=align,
                            rounds=tuple(rounds[(k, r)] for r in grid))
              for k, (grid, align) in forms.items()}
    narrowed = [FormTiming(points=tuple((w, measured[(role, w)]) for w in grid),
                           rounds=tuple(rounds[(role, w)] for w in grid)) if grid else None
                for role, grid in zip(("rows", "columns"), narrowing)]
    return LayerTiming(dense_ms=measured[None], forms=result, rows=narrowed[0], columns=narrowed[1],
                       dense_rounds=rounds[None])


def _summed(parts: Sequence[LayerTiming]) -> LayerTiming:
    """The timing of several nodes that all run, with the same forms and grids (the nodes reading one weight)."""
    if len(parts) == 1:
        return parts[0]
    def summed(series):  # per-round times of the parts, added round by round
        return tuple(map(sum, zip(*series))) if all(series) else ()

    forms = {k: FormTiming(points=tuple((rank, sum(p.forms[k].points[i][1] for p in parts))
                                        for i, (rank, _) in enumerate(form.points)), aligned_to=form.aligned_to,
                           rounds=tuple(summed([p.forms[k].rounds[i] if p.forms[k].rounds else () for p in parts])
                                        for i in range(len(form.points))) if all(p.forms[k].rounds for p in parts)
                           else ())
             for k, form in parts[0].forms.items()}
    return LayerTiming(dense_ms=sum(p.dense_ms for p in parts), forms=forms,
                       dense_rounds=summed([p.dense_rounds for p in parts]))


MIN_REALIZED, MAX_REALIZED = 0.1, 1.5
"""Bounds on the realized fraction: a probe measured within noise of the original must not erase or invert every
saving, nor inflate them."""


def realized_fraction(
    model: onnx.ModelProto,
    layers: Sequence[Layer],
    timings: Mapping[str, LayerTiming],
    feed: Mapping[str, np.ndarray],
    settings: RuntimeSettings,
    rounds: int = 20,
    timer: Timer | None = None,
) -> tuple[float, float]:
    """(the original model's median milliseconds, the fraction of the layers' predicted savings that a probe model
    — every layer with a k = 1 form factorized at its smallest timed rank — really delivers), both from one
    interleaved measurement of the two models. The fraction is 1.0 when no layer has a form."""
    rng = np.random.default_rng(0)
    rewrites, predicted = [], 0.0
    for layer in layers:
        form = timings[layer.name].forms.get(1)
        if form is None:
            continue
        rank, ms = form.points[0]
        rewrites.append((layer, _random_factors(layer, 1, rank, rng)))
        predicted += timings[layer.name].dense_ms - ms
    if not rewrites:
        return model_latency(model, feed, settings, timer=timer), 1.0
    probe, _ = factorize_layers(model, rewrites)
    comparison = measure_latency_ratio(model, probe, [feed], repeats=rounds, settings=settings, timer=timer)
    saved = comparison.original_ms - comparison.compressed_ms
    fraction = saved / predicted if predicted > 0 else 1.0
    return comparison.original_ms, float(min(max(fraction, MIN_REALIZED), MAX_REALIZED))


def realized_narrowing(
    model: onnx.ModelProto,
    chains: Sequence[Chain],
    latency: LatencyCost,
    feed: Mapping[str, np.ndarray],
    settings: RuntimeSettings,
    rounds: int = 20,
    timer: Timer | None = None,
) -> float:
    """The fraction of the narrowed layers' predicted savings that a probe model — every chain narrowed to its
    smallest timed width, with random folds — really delivers, timed interleaved against the original. More than
    1 where the per-channel ops and depthwise convs between shrink too, which no layer timing shows. 1.0 when no
    chain could be priced."""
    rng = np.random.default_rng(0)
    cuts, widths_of = [], []
    for chain in chains:
        timing = latency.timings.get(chain.producers[0].name)
        if timing is None or timing.rows is None:
            continue
        width = timing.rows.points[0][0]
        folded = Folded(kept=np.arange(width),
                        matrices=tuple(rng.standard_normal((r.out_channels, width * r.taps)) / np.sqrt(width * r.taps)
                                       for r in chain.readers),
                        biases=tuple(np.zeros(r.out_channels) for r in chain.readers))
        cuts.append((chain, folded))
        widths_of.append((chain, width))
    predicted = replace(latency, realized_narrowing=1.0).narrowing_saving(widths_of) if cuts else None
    if not predicted or predicted <= 0:
        return 1.0
    probe, _ = eliminate_channels(model, cuts)
    comparison = measure_latency_ratio(model, probe, [feed], repeats=rounds, settings=settings, timer=timer)
    fraction = (comparison.original_ms - comparison.compressed_ms) / predicted
    return float(min(max(fraction, MIN_REALIZED), MAX_REALIZED))


def latency_cost(model: onnx.ModelProto, layers: Sequence[Layer], shapes, speed, feed: Mapping[str, np.ndarray],
                 max_groups: int, progress: Callable[[int, int], None] | None = None,
                 chains: Sequence[Chain] = ()) -> LatencyCost:
    """Time every layer's dense and factorized forms, and the narrowed forms of the layers `chains` may cut (or
    read them from the cache), the whole original model, and the fractions of the layers' savings a factorized and
    a narrowed model really deliver (`realized_fraction`, `realized_narrowing`). `speed`: `settings.SpeedSettings`.

    The whole-model numbers are cached with the layers' and measured again whenever a layer was: every part of the
    prediction then comes from the same period of this machine's speed.
    """
    cache, timer = open_cache(speed.cache), timer_of(speed)
    block = block_size()
    narrowing: dict[str, tuple[list[int], list[int]]] = {}
    for chain in chains:
        grid = narrowing_grid(chain.channels, width_alignment(chain, block))
        for layer in chain.producers:
            narrowing[layer.name] = (grid, narrowing.get(layer.name, ([], []))[1])
        for layer in chain.readers:
            narrowing[layer.name] = (narrowing.get(layer.name, ([], []))[0], grid)
    deployed = None if speed.deployed is None else speed.deployed.key
    timings = measure_layers(model, layers, shapes, speed.runtime, cache, max_groups=max_groups, progress=progress,
                             narrowing=narrowing, timer=timer, deployed=deployed)
    overhead = per_node_overhead(cache, speed.runtime, timer)
    key = model_key(model, {name: value.shape for name, value in feed.items()}, speed.runtime, deployed)
    keys = (None, None, None) if key is None else (key + "/total", key + "/realized", key + "/narrowed")
    cached = (None, None, None) if key is None or cache.changed else tuple(cache.get(k) for k in keys)
    total, realized, narrowed = cached
    if total is None or realized is None:
        total, realized = realized_fraction(model, layers, timings, feed, speed.runtime, timer=timer)
    latency = LatencyCost(total=total, timings=timings, realized=realized, settings=speed.runtime,
                          overhead_ms=overhead)
    if chains and narrowed is None:
        narrowed = realized_narrowing(model, chains, latency, feed, speed.runtime, timer=timer)
    latency = replace(latency, realized_narrowing=1.0 if narrowed is None else narrowed)
    if key is not None:
        for name, value in zip(keys, (total, realized, narrowed)):
            if value is not None:
                cache.put(name, value)
    cache.save()
    return latency


def overhead_model() -> onnx.ModelProto:
    """One Identity node on a 16-float tensor: what onnxruntime spends on a run and a node, whatever the node does."""
    value = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1, 16]) for name in ("x", "y")]
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "overhead", value[:1], value[1:])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])


def per_node_overhead(cache: LatencyCache, settings: RuntimeSettings, timer: Timer) -> float:
    """Milliseconds of `overhead_model` (the median of ROUNDS, timed as the layers are), cached with them and
    measured again whenever a layer was, so it comes from the same period as the layers it is compared with."""
    key = variant_key({"op": "per-node overhead", "model": "Identity 1x16"}, None, settings)
    ms = None if cache.changed else cache.get(key)
    if ms is None:
        feed = [[{"x": np.zeros((1, 16), np.float32)}]]
        ms = timer.time([overhead_model()], feed, ROUNDS, block_s=BLOCK_SECONDS).medians[0]
        cache.put(key, ms)
    return float(ms)


def open_cache(cache) -> LatencyCache:
    """The latency cache `cache` names: True for the default file, False for none, or a path."""
    if cache is True:
        return LatencyCache(default_cache_path())
    return LatencyCache(None if cache is False else cache)
