"""The benchmark: every real model, every allocator, several budgets, measured side by side in one run.

    python benchmarks/run.py                      # writes benchmarks/RESULTS.md and benchmarks/plots/*.png

For each model of models/manifest.json (fetched from PyPI on first use) and its workload (benchmarks/workloads):
each method (weight-only or calibrated on the workload's calibration split, an allocator, with or without refit)
at each budget is compressed, verified on the disjoint evaluation split (output error), scored with the task
metric against the original model and/or ground truth, and timed against the original in onnxruntime,
interleaved in this one process (medians). Nothing is tuned per method or per model.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `benchmarks.workloads` when run as a script from anywhere

import onnx_lowrank  # noqa: E402
from onnx_lowrank.graph import runtime  # noqa: E402
from onnx_lowrank.settings import SpeedSettings  # noqa: E402
from onnx_lowrank.stages.timing import MEASUREMENT_ROUNDS, compare_models  # noqa: E402
from onnx_lowrank.cli.plot import plot_frontier  # noqa: E402
from onnx_lowrank.graph.runtime import RuntimeSettings  # noqa: E402
from onnx_lowrank.sweep import sweep  # noqa: E402

from benchmarks.workloads import model_path, workloads  # noqa: E402
from benchmarks.workloads.base import _fetch_module  # noqa: E402

BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)
THREADS = 2  # onnxruntime intra-op threads for every timing: the deployment this machine stands for


@dataclass(frozen=True)
class Method:
    """One way to compress: which data the decomposition sees, the allocator, whether decoders are refit, what the
    budget counts, and whether the never-slower guard is on (the default) or lifted (`--allow-slower`)."""

    name: str
    allocator: str
    data: str  # "weight" (no data) or "calibration" (the workload's calibration split)
    refit: bool = False
    metric: str = "params"
    guard: bool = True
    method: str = "lowrank"  # lowrank, eliminate (narrow layers) or both


METHODS = {
    m.name: m
    for m in (
        Method("weight uniform", "uniform", "weight"),
        Method("weight energy", "energy", "weight"),
        Method("weight alds", "alds", "weight"),
        Method("data auto", "auto", "calibration"),  # low rank alone: the default before issue 10
        Method("data alds", "alds", "calibration"),
        Method("data uniform", "uniform", "calibration"),
        Method("data auto --allow-slower", "auto", "calibration", guard=False),
        Method("data eliminate", "auto", "calibration", method="eliminate"),
        Method("data both", "auto", "calibration", method="both"),  # the default with calibration data
        Method("data auto+refit", "auto", "calibration", refit=True),
        Method("data alds+refit", "alds", "calibration", refit=True),
        Method("flops: weight alds", "alds", "weight", metric="flops"),
        Method("flops: data auto", "auto", "calibration", metric="flops"),
        Method("flops: data auto --allow-slower", "auto", "calibration", metric="flops", guard=False),
        Method("flops: data eliminate", "auto", "calibration", metric="flops", method="eliminate"),
        Method("flops: data both", "auto", "calibration", metric="flops", method="both"),
        Method("latency: weight alds", "alds", "weight", metric="latency"),
        Method("latency: data auto", "auto", "calibration", metric="latency"),
        Method("latency: data both", "auto", "calibration", metric="latency", method="both"),
    )
}
PAIRS = (("data both", "data auto"), ("flops: data both", "flops: data auto"),
         ("latency: data both", "latency: data auto"))
"""`both` (the default) and low rank alone at the same budgets: their models are kept and timed against each other."""
DEFAULT_METHODS = tuple(name for name, m in METHODS.items() if not m.refit)  # refit lost everywhere (issue 6)
DEFAULT = "data both"  # the default with calibration data since issue 10
BASELINE = "weight alds"
WEIGHT_ONLY = ("weight uniform", "weight energy", "weight alds")


def _sweep_methods(original, workload, methods, budgets, feeds, latency_repeats, reference, cache) -> tuple:
    """Every method's points (named after the method), grouped into one sweep per (data, refit, metric, guard)
    setting so each analysis runs once; the seconds of each analysis (calibration + timing + decompositions); and
    the compressed models of the methods in PAIRS, by (method name, budget)."""
    points, unreachable, analysis_seconds, kept = [], [], {}, {}
    paired = {name for pair in PAIRS for name in pair}
    groups: dict[tuple, list[Method]] = {}
    for method in methods:
        groups.setdefault((method.data, method.refit, method.metric, method.guard, method.method), []).append(method)
    speed = SpeedSettings(runtime=RuntimeSettings(threads=THREADS))
    for (data, refit, metric, guard, narrowing), group in groups.items():
        written = []  # every scored model in point order, for the paired methods
        retimed = []  # every scored model's latency ratio, measured again after the tool wrote it, in point order

        def evaluate(model, keep=any(m.name in paired for m in group)):
            if keep:
                written.append(model)
            retimed.append(compare_models(original, model, [feeds[0]], speed, rounds=latency_repeats,
                                          stop_early=False).ratio)
            return workload.score(runtime.session(model), reference)

        result = sweep(
            original,
            budgets,
            allocators=[m.allocator for m in group],
            metric=metric,
            inputs=feeds,
            calibration=workload.calibration_feeds() if data == "calibration" else None,
            weight_only=data == "weight",
            refit=refit,
            latency_repeats=latency_repeats,
            allow_slower=not guard,
            method=narrowing,
            threads=THREADS,
            latency_cache=cache,
            evaluate=evaluate,
            progress=lambda cell, g=group: print(f"  {g[0].name.rsplit(' ', 1)[0]}.. {cell}", file=sys.stderr,
                                                 flush=True),
        )
        analysis_seconds[(data, refit, metric, guard, narrowing)] = result.analysis_seconds
        by_allocator = {m.allocator: m for m in group}
        scored = iter(written)
        for point, ratio in zip(result.points, retimed):
            if point.latency_ratio is not None:  # the guard decided on its own measurement: report a fresh one
                point = replace(point, latency_ratio=ratio)
            method = by_allocator[point.allocator.split(":")[0]]
            chosen = point.allocator.split(":")[1] if ":" in point.allocator else None
            points.append((method, chosen, point))
            if written:  # the hook scored every point's model, in order
                model = next(scored)
                if method.name in paired:
                    kept[(method.name, point.budget)] = model
        unreachable += [(by_allocator[a].name, b, why) for a, b, why in result.unreachable]
    order = {name: i for i, name in enumerate(METHODS)}
    points.sort(key=lambda item: (order[item[0].name], -item[2].budget))
    return points, unreachable, analysis_seconds, kept


def _noise(original, feeds, repeats: int) -> float:
    """How far the original timed against itself strays from 1.0, measured as every cell is (`compare_models`: several
    measurements with fresh sessions), five times: the noise of a latency ratio."""
    speed = SpeedSettings(runtime=RuntimeSettings(threads=THREADS))
    ratios = [compare_models(original, original, [feeds[0]], speed, rounds=repeats, stop_early=False).ratio
              for _ in range(5)]
    return max(abs(r - 1.0) for r in ratios)


def run(models, budgets, methods, out_dir: Path, latency_repeats: int, command: str) -> Path:
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-bench-") as folder:
        return _run(models, budgets, methods, out_dir, latency_repeats, command, Path(folder) / "latency.json")


def _run(models, budgets, methods, out_dir: Path, latency_repeats: int, command: str, cache: Path) -> Path:
    """Every model in turn, with its own fresh latency cache file `cache` shared by its sweeps."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plots").mkdir(exist_ok=True)
    started = time.perf_counter()
    sections = []
    for name in models:
        workload = workloads()[name]
        path = model_path(workload.model)
        original = onnx.load(str(path))
        feeds = workload.evaluation_feeds()
        reference = workload.outputs(runtime.session(original))
        model_start = time.perf_counter()
        print(f"[{name}] {len(methods)} methods x {len(budgets)} budgets", file=sys.stderr, flush=True)
        noise = _noise(original, feeds, latency_repeats)
        start = time.perf_counter()  # the first analysis times every layer (cold cache); the sweeps reuse it
        timed = onnx_lowrank.analyze(original, inputs=feeds, weight_only=True, threads=THREADS, latency_cache=cache)
        timing_seconds = time.perf_counter() - start
        realized = timed.costs["latency"].realized if "latency" in timed.costs else None
        points, unreachable, analysis_seconds, kept = _sweep_methods(original, workload, methods, budgets, feeds,
                                                                     latency_repeats, reference, cache)
        pairs = _pairs_timed(kept, feeds[0], 2 * latency_repeats)
        named = [replace(p, allocator=m.name) for m, _, p in points]
        plot = out_dir / "plots" / f"{name}.png"
        plot_frontier(
            named,
            plot,
            title=f"{name}: evaluation split of {len(feeds)} samples",
            panels=(("metric", workload.metric), ("output_error", "output relative L2 error"),
                    ("latency_ratio", "latency / original (lower is faster)")),
            x=("params_ratio", "fraction of params kept"),
        )
        speed_plot = out_dir / "plots" / f"{name}-latency.png"
        plot_frontier(
            named,
            speed_plot,
            title=f"{name}: latency against the budget ({THREADS} threads)",
            panels=(("latency_ratio", "measured latency / original"),
                    ("predicted_latency_ratio", "predicted latency / original")),
            x=("budget", "budget (fraction of the method's metric kept)"),
        )
        sections.append(_section(name, workload, path, points, unreachable, analysis_seconds, noise,
                                 (timing_seconds, realized), pairs,
                                 {"frontier": plot.relative_to(out_dir), "latency": speed_plot.relative_to(out_dir)},
                                 time.perf_counter() - model_start))
    results = out_dir / "RESULTS.md"
    names = [m.name for m in methods]
    results.write_text(_header(command, budgets, names, time.perf_counter() - started) + "\n".join(sections))
    return results


def _header(command: str, budgets, methods, seconds: float) -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        "# Benchmark results\n\n"
        f"Produced by `{command}` on {datetime.date.today().isoformat()} in {seconds / 60:.1f} minutes.\n\n"
        f"- Machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}.\n"
        f"- Versions: Python {platform.python_version()}, onnx-lowrank {onnx_lowrank.__version__}, onnx {onnx.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, numpy {np.__version__}.\n"
        f"- Budgets {', '.join(map(str, budgets))}; methods {', '.join(methods)}.\n"
        "- Methods: the budget counts **params** unless the method says `flops:` (2 x MACs) or `latency:` (the "
        "model's time in onnxruntime, predicted from measured layer timings). `weight *` decompose the weights alone "
        "(SVD; no data). `data *` decompose every layer on its inputs from the workload's **calibration split** "
        "(output-optimal projection with bias correction; the evaluation split is disjoint) and rank candidates by "
        "their relative output error; `auto` is the allocator by default with calibration data (the best of the "
        "alds/uniform/energy plans by output error on the calibration split; the allocator it chose is in "
        "brackets). Every method runs with the default **never-slower guard** (a layer is only factorized into a "
        "form measured faster than it) except those marked `--allow-slower`. `data eliminate` narrows layers "
        "instead (`--method eliminate`: drops output channels the others reproduce, see the README's Neuron "
        "elimination) and `data both` allocates over both kinds (`--method both`): it is the default with calibration "
        "data, and `data auto` is low rank alone (`--method lowrank`). Refit methods are "
        "left out by default: they lost in every cell of the previous run (git history of this file).\n"
        f"- Columns: `params`, `FLOPs`: fraction of the original model kept (counted on the compressed model). "
        f"`latency`: median onnxruntime time ({THREADS} threads, batch 1) of the compressed model over the "
        "original's, measured interleaved in one process (the noise of this ratio is measured per model: the "
        "original timed against itself). `pred`: the latency ratio the cost model predicted before writing the "
        "model. The `latency` of every cell is measured again after the tool wrote the model (5 measurements with "
        "fresh sessions, as the tool measures), so the guard's decision and the figure that checks it are not the "
        "same measurement. `task`: the workload's metric (see each model). `out err`: worst relative L2 error of the model's "
        "outputs on the evaluation split. `layer err`: error of the worst factorized layer: relative spectral error "
        "of the weight (weight) or relative output error on the calibration split (data). `n`: layers factorized "
        "or narrowed. "
        "`tool s`: seconds of analyze + plan + apply (what one `compress --no-verify` takes, with a warm latency "
        "cache; for data-aware methods it includes the calibration pass).\n\n"
    )


def _pairs_timed(kept, feed, repeats: int) -> dict:
    """(both method, budget) -> its model's latency over low rank alone's at the same budget, the two timed against
    each other interleaved (so the ratio carries no noise of two separate measurements against the original), or
    None when the two methods wrote the same model."""
    ratios = {}
    speed = SpeedSettings(runtime=RuntimeSettings(threads=THREADS))
    for both, lowrank in PAIRS:
        for (name, budget), model in kept.items():
            other = kept.get((lowrank, budget))
            if name != both or other is None:
                continue
            same = model.SerializeToString() == other.SerializeToString()
            ratios[(both, budget)] = None if same else compare_models(other, model, [feed], speed,
                                                                      rounds=repeats, stop_early=False).ratio
    return ratios


def _section(name, workload, path, points, unreachable, analysis_seconds, noise, timing, pairs, plots,
             seconds: float) -> str:
    timing_seconds, realized = timing
    calibration = analysis_seconds.get(("calibration", False, "params", True, "lowrank"))
    lines = [
        f"## {name}\n",
        f"Model `{path.name}` ({workload.model} in models/manifest.json). Task metric: **{workload.metric}** "
        f"(higher is better). Evaluation samples: {len(workload.evaluation_feeds())}; calibration samples: "
        f"{len(workload.calibration_feeds())}. Weight-only analysis: "
        f"{analysis_seconds.get(('weight', False, 'params', True, 'lowrank'), 0):.1f} s"
        + (f"; data-aware analysis (calibration pass + decompositions): {calibration:.1f} s" if calibration else "")
        + f". Timing every layer's forms (cold cache, once per model): {timing_seconds:.1f} s; the probe model "
        f"delivered {realized:.2f} of the savings its layers showed alone (every layer saving is scaled by that). "
        f"Latency noise: the original against itself strays up to {noise:.3f} from 1.0. "
        f"Whole sweep: {seconds:.0f} s.\n",
        "| method | budget | params | FLOPs | latency | pred | task | out err | layer err | n | tool s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, chosen, p in points:
        label = method.name + (f" ({chosen})" if chosen else "")
        lines.append(
            f"| {label} | {p.budget:g} | {p.params_ratio:.3f} | {_ratio(p.flops_ratio)} | {_ratio(p.latency_ratio)} "
            f"| {_ratio(p.predicted_latency_ratio)} | {p.task.get('metric', float('nan')):.3f} | {p.output_error:.3f} "
            f"| {p.max_layer_error:.3f} | {p.layers_factorized} | {p.tool_seconds:.1f} |"
        )
    for method, budget, why in unreachable:
        lines.append(f"\n{method} at {budget:g}: not reachable ({why})")
    lines.append("\n" + _winners(points) + "\n")
    for check in (_acceptance(points), _both_against_lowrank(points, pairs), _speed(points, noise)):
        if check:
            lines.append(check + "\n")
    lines += [f"![{name} {label}]({plot.as_posix()})\n" for label, plot in plots.items()]
    return "\n".join(lines) + "\n"


def _winners(points) -> str:
    """Which method scored best on the task metric at each params budget (ties listed together)."""
    parts = []
    params = [(m, c, p) for m, c, p in points if m.metric == "params"]
    for budget in dict.fromkeys(p.budget for _, _, p in params):
        cells = [(m, p) for m, _, p in params if p.budget == budget]
        best = max(p.task.get("metric", float("-inf")) for _, p in cells)
        names = [m.name for m, p in cells if p.task.get("metric", float("-inf")) >= best - 1e-9]
        parts.append(f"{budget:g}: {'/'.join(names)} ({best:.3f})")
    return "Best task metric per params budget: " + "; ".join(parts) + "." if parts else ""


def _both_against_lowrank(points, pairs) -> str:
    """`both` (the default) against low rank alone, budget by budget: output error, and latency timed against each
    other (`_pairs_timed`), at each metric's equal budgets."""
    def table(method: str) -> dict:
        return {p.budget: p for m, _, p in points if m.name == method}

    parts = []
    for both, lowrank in PAIRS:
        mixed, alone = table(both), table(lowrank)
        cells = []
        for budget in (b for b in mixed if b in alone):
            ratio = pairs.get((both, budget), "missing")
            timed = ("same model" if ratio is None else "not timed" if ratio == "missing"
                     else f"latency {ratio:.3f}x of low rank's")
            cells.append(f"{budget:g}: out err {mixed[budget].output_error:.3f} vs {alone[budget].output_error:.3f}, "
                         f"{timed}")
        if cells:
            parts.append(f"{both} vs {lowrank}: " + "; ".join(cells))
    return ("`both` against low rank alone at equal budgets (both timed against each other, interleaved): "
            + ". ".join(parts) + ".") if parts else ""


def _acceptance(points) -> str:
    """The default against the weight-only baselines at each budget: output error ratio to weight alds, and task
    metric against the best weight-only method."""
    parts = []
    for budget in dict.fromkeys(p.budget for _, _, p in points):
        cells = {m.name: p for m, _, p in points if p.budget == budget}
        if DEFAULT not in cells or BASELINE not in cells:
            continue
        default, baseline = cells[DEFAULT], cells[BASELINE]
        weight_best = max((cells[n].task.get("metric", float("-inf")) for n in WEIGHT_ONLY if n in cells))
        ratio = default.output_error / baseline.output_error if baseline.output_error else float("nan")
        task = default.task.get("metric", float("nan"))
        verdict = "ok" if ratio <= 0.5 and task >= weight_best - 1e-9 else "MISSED"
        parts.append(f"{budget:g}: out err {ratio:.2f}x of weight alds, task {task:.3f} vs best weight-only "
                     f"{weight_best:.3f} ({verdict})")
    return (f"Default (`{DEFAULT}`) against weight-only: " + "; ".join(parts) + ".") if parts else ""


def _speed(points, noise: float) -> str:
    """Speed checks: guarded cells slower than the original beyond the noise, and how far predictions missed."""
    guarded = [(m, p) for m, _, p in points if m.guard and p.latency_ratio is not None]
    slower = [f"{m.name} at {p.budget:g} ({p.latency_ratio:.3f})" for m, p in guarded
              if p.latency_ratio > 1.0 + noise]
    misses = [abs(p.predicted_latency_ratio / p.latency_ratio - 1.0) for _, p in guarded
              if p.predicted_latency_ratio is not None and p.latency_ratio]
    fastest = {m.name: min(p.latency_ratio for n, p in guarded if n.name == m.name) for m, _ in guarded}
    parts = [f"guarded cells slower than the original beyond the noise: {', '.join(slower) if slower else 'none'}"]
    unshown = [f"{m.name} at {p.budget:g} ({p.latency_ratio:.3f})" for m, p in guarded if p.never_slower is False]
    parts.append("cells where the whole-model check said the never-slower promise was not shown (the report says "
                 f"so): {', '.join(unshown) if unshown else 'none'}")
    if misses:
        parts.append(f"prediction off by {np.median(misses):.1%} (median) and {max(misses):.1%} (worst) over "
                     f"{len(misses)} cells")
    for label in ("flops: data auto", "flops: weight alds", "latency: data auto", "latency: weight alds"):
        cells = {p.budget: p.latency_ratio for m, p in guarded if m.name == label}
        budget = 0.5 if label.startswith("flops") else 0.6
        if budget in cells:
            parts.append(f"{label} at {budget:g}: measured latency {cells[budget]:.3f}x")
    return "Speed: " + "; ".join(parts) + "." if fastest else ""


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(workloads()), help="workload names, comma-separated")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--repeats", type=int, default=MEASUREMENT_ROUNDS,
                        help="timed rounds in each of the measurements of a latency ratio")
    parser.add_argument("--out", default=str(HERE), help="folder for RESULTS.md and plots/ (default benchmarks/)")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in workloads()]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(workloads())}", file=sys.stderr)
        return 2
    try:  # every model now, not after an hour of the others (a built model may not be built yet)
        for name in models:
            model_path(workloads()[name].model)
    except _fetch_module().FetchError as error:
        print(f"error: {error} (or leave it out with --models)", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        print(f"error: unknown method(s) in {args.methods!r}; known: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    command = "python benchmarks/run.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv))
    path = run(models, [float(b) for b in args.budgets.split(",")], [METHODS[m] for m in methods],
               Path(args.out), args.repeats, command)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
