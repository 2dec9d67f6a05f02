"""Where the tool's own time goes: the default compression of every benchmark model, profiled.

    python benchmarks/profile.py                              # every benchmark model there; writes PROFILE.md
    python benchmarks/profile.py --models yolov8n-320 --verify

For each model: `onnx_lowrank.compress(model, 0.8, calibration=<the workload's calibration split>)` with the
default options (method, allocator, never-slower guard; onnxruntime with 2 threads), `verify=False` unless
`--verify`, three times in one process:

0. cold, into an empty temporary latency cache (every form the run times);
1. warm, unprofiled, for the wall time and the report's own stage times;
2. warm, under cProfile, for the attribution: the pipeline stages (the functions of `STAGES`, cumulative time) and the
   functions that took the most time themselves. cProfile sees only the thread it runs on, so in this run the
   per-layer work that normally runs on both cores (`stages.parallel`) runs on one thread: its attribution is
   right, its total is a serial one.

Writes benchmarks/PROFILE.md (`--out`); keep it current, as RESULTS.md is.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, this file's folder comes first on sys.path, and this file would shadow the standard library's
# `profile`, which cProfile imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import cProfile  # noqa: E402
import datetime  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import onnx  # noqa: E402
import onnxruntime  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import onnx_lowrank  # noqa: E402
from onnx_lowrank.stages import analyze as analyze_module, calibrate as calibrate_module  # noqa: E402

from benchmarks.few_samples import benchmark_models  # noqa: E402
from benchmarks.workloads import model_path, workloads  # noqa: E402

BUDGET = 0.8
THREADS = 2
TOP = 15
STAGES = (
    ("load and settle samples", "pipeline.py", "prepare"),
    ("calibration pass", "calibrate.py", "calibrate"),
    ("layer timing (cached)", "layer_timing.py", "latency_cost"),
    ("decompositions", "analyze.py", "analyze_layers"),
    ("narrowing analysis", "analyze.py", "analyze_chains"),
    ("judge (auto)", "judge.py", "choose_plan"),
    ("  judge: folds (calibrate + decompose again)", "judge.py", "_made_folds"),
    ("  judge: weight-only decompositions", "analyze.py", "weight_only"),
    ("  judge: plans run on held-out rows", "verify.py", "verify_many"),
    ("  judge: plans timed", "judge.py", "measured_times"),
    ("allocation", "allocate.py", "allocate"),
    ("writing plans (factors + graph)", "apply.py", "write_plan"),
    ("whole-model timing", "timing.py", "compare_models"),
    ("verification", "verify.py", "verify"),
)
"""(label, file, function): the pipeline stages, read off the profile as the cumulative time of one function.
Nested ones are indented; a function reached from several stages (write_plan: by the judge and the final apply)
counts everywhere it runs."""


def _serial(function, items, workers=None):
    yield from map(function, items)


def _serial_all(function, items, workers=None):
    return tuple(map(function, items))


def profile_model(name: str, verify: bool, cache: Path) -> dict:
    workload = workloads()[name]
    original = onnx.load(str(model_path(workload.model)))
    calibration = workload.calibration_feeds()
    options = dict(calibration=calibration, verify=verify, threads=THREADS, latency_cache=cache)
    if verify:
        options["inputs"] = workload.evaluation_feeds()
    start = time.perf_counter()
    onnx_lowrank.compress(original, BUDGET, **options)  # cold: every form it times goes into the cache
    cold = time.perf_counter() - start
    start = time.perf_counter()
    _, report = onnx_lowrank.compress(original, BUDGET, **options)
    wall = time.perf_counter() - start
    profiler = cProfile.Profile()
    patched = [(module, function, getattr(module, function)) for module in (analyze_module, calibrate_module)
               for function in ("map_all", "map_in_order") if hasattr(module, function)]
    for module, function, _ in patched:
        setattr(module, function, _serial_all if function == "map_all" else _serial)
    try:
        profiler.enable()
        start = time.perf_counter()
        onnx_lowrank.compress(original, BUDGET, **options)
        profiled = time.perf_counter() - start
        profiler.disable()
    finally:
        for module, function, real in patched:
            setattr(module, function, real)
    stats = pstats.Stats(profiler)
    return {"name": name, "wall": wall, "profiled": profiled, "cold": cold,
            "report_seconds": dict(report.seconds), "samples": len(calibration), "stats": stats,
            "params": report.params_ratio, "plan_note": report.plan.notes[0] if report.plan.notes else ""}


def _cumulative(stats: pstats.Stats, file: str, function: str) -> float:
    return sum(entry[3] for (path, _, name), entry in stats.stats.items()
               if name == function and path.endswith(os.sep + file))


def _top(stats: pstats.Stats, key: int, count: int, ours_only: bool) -> list[tuple[str, float, int]]:
    rows = []
    for (path, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        if ours_only and "onnx_lowrank" not in path:
            continue
        where = f"{Path(path).parent.name}/{Path(path).name}:{line}" if path not in ("~", "") else "built-in"
        rows.append((f"{name} ({where})", own if key == 2 else cumulative, calls))
    return sorted(rows, key=lambda row: -row[1])[:count]


def markdown(results: list[dict], command: str, verify: bool) -> str:
    lines = [
        "# Profile of the default compression\n",
        f"Produced by `{command}` on {datetime.date.today().isoformat()}: onnx-lowrank {onnx_lowrank.__version__}, "
        f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} cores.\n",
        f"Each model: `compress(model, {BUDGET}, calibration=<its calibration split>, verify={verify})` with the "
        f"default options, run three times in one process: `cold` with an empty latency cache (every layer's forms "
        f"timed), `wall` again with that cache warm (the report's own stage times are this run's), `profiled` the "
        "same call under cProfile with the per-layer work on one thread (so cProfile sees it: its total is a serial "
        "one). Stage times below are from the profiled run.\n",
        "| model | samples | cold s | wall s (warm) | profiled s | report stages of the warm run (s) |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for result in results:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in result["report_seconds"].items())
        lines.append(f"| {result['name']} | {result['samples']} | {result['cold']:.1f} | {result['wall']:.1f} | "
                     f"{result['profiled']:.1f} | {stages} |")
    for result in results:
        stats = result["stats"]
        lines += [f"\n## {result['name']}\n", f"Plan: params {result['params']:.3f}; {result['plan_note']}\n",
                  "| stage (profiled, cumulative) | s | share |", "| --- | ---: | ---: |"]
        for label, file, function in STAGES:
            seconds = _cumulative(stats, file, function)
            if seconds > 0:
                lines.append(f"| {label} | {seconds:.2f} | {seconds / result['profiled']:.0%} |")
        for title, key, ours in (("Most time in the function itself (any code)", 2, False),
                                 ("Most cumulative time (onnx_lowrank's functions)", 3, True)):
            lines += [f"\n{title}:\n", "| function | s | calls |", "| --- | ---: | ---: |"]
            lines += [f"| `{name}` | {seconds:.2f} | {calls} |" for name, seconds, calls in _top(stats, key, TOP, ours)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="workload names, comma-separated (default: every benchmark model there)")
    parser.add_argument("--verify", action="store_true", help="verify on the evaluation split too")
    parser.add_argument("--out", default=str(HERE / "PROFILE.md"))
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m] if args.models else benchmark_models()
    unknown = [m for m in models if m not in workloads()]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(workloads())}", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-profile-") as folder:
        for name in models:
            result = profile_model(name, args.verify, Path(folder) / f"{name}.json")
            print(f"[{name}] wall {result['wall']:.1f} s, profiled {result['profiled']:.1f} s", file=sys.stderr,
                  flush=True)
            results.append(result)
    command = "python benchmarks/profile.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(
        sys.argv[1:] if argv is None else argv))
    Path(args.out).write_text(markdown(results, command, args.verify))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
