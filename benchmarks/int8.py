"""int8 deployment: low rank + onnxruntime's int8 against int8 alone, side by side in one run.

    python benchmarks/int8.py --results benchmarks/RESULTS.md   # every benchmark model; INT8.md and RESULTS.md
    python benchmarks/int8.py --models yolov8n-320 --budgets 0.8,latency:0.8
    python benchmarks/int8.py --models ppocrv4-rec --budgets 0.7 --evaluation 192 --out /tmp/rec.md  # more lines
    python benchmarks/int8.py --models ppocrv4-rec,ppocrv4-det --calibration ppocrv4-rec=64,ppocrv4-det=16

For each benchmark model: the original; int8 alone, static QDQ (the tool's recipe: `stages.quantize`, activation
type measured, activation ranges chosen by output error) and dynamic; and, at each budget (`0.7`: params; `latency:0.8`: of int8 alone's measured time, since the layers are
timed in their int8 form), `onnx_lowrank.compress(..., quantize=...)` with the defaults (calibrated on the
workload's calibration split, the never-slower guard on), with `--upgrade-opset` (per-channel weights for
the models below opset 13: PP-OCRv4's recogniser lost all its accuracy per tensor, char accuracy 0.017, and kept
0.957 per channel). Every model is scored with the workload's task
metric on the disjoint evaluation split, its file size counted, and timed against int8 alone (`compare_models`,
5 measurements with fresh sessions, 2 threads, interleaved; in brackets the bounds of that ratio from the spread
of the measurements, at the level the never-slower check uses) and int8 alone against the original. A row meets the
issue's goal when its task metric is within 0.01 of int8 alone's and it is at most 0.75x int8 alone's size and
0.85x its measured time. "size vs int8 alone" is against the static int8 model in every row, "time vs int8 alone"
against the int8 alone of the row's own mode. Models without a Conv (transformers, MLPs) get ours + dynamic int8
rows too. Tool seconds are the compress call's, with the latency cache the earlier cells of the run filled.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import onnx
import onnxruntime

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import onnx_lowrank  # noqa: E402
from onnx_lowrank.graph import runtime  # noqa: E402
from onnx_lowrank.graph.inputs import Samples  # noqa: E402
from onnx_lowrank.graph.runtime import RuntimeSettings  # noqa: E402
from onnx_lowrank.settings import SpeedSettings  # noqa: E402
from onnx_lowrank.stages.deployment import choose_activations, choose_ranges  # noqa: E402
from onnx_lowrank.stages.quantize import plan_quantization  # noqa: E402
from onnx_lowrank.stages.timing import compare_models  # noqa: E402

from benchmarks.workloads import model_path, workloads  # noqa: E402

MODELS = tuple(workloads())  # every benchmark model
BUDGETS = ("0.9", "0.8", "0.7", "0.6", "latency:0.9", "latency:0.8", "latency:0.75", "latency:0.7")
THREADS = 2
SIZE_GOAL, TIME_GOAL, METRIC_SLACK = 0.75, 0.85, 0.01


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--out", default=str(HERE / "INT8.md"))
    parser.add_argument("--plots", default=str(HERE / "plots"), help="folder of the int8-<model>.png plots")
    parser.add_argument("--results", default=None,
                        help="also write the tables into this RESULTS.md (its int8 section, replaced)")
    parser.add_argument("--evaluation", type=_counts, default={},
                        help="score on at least this many evaluation samples: N for every model, or "
                             "MODEL=N,... (default: each workload's own split)")
    parser.add_argument("--calibration", type=_counts, default={},
                        help="calibrate int8 alone and ours on at least this many samples: N or MODEL=N,... "
                             "(default: each workload's own split)")
    args = parser.parse_args(argv)
    budgets = [_budget(b) for b in args.budgets.split(",")]
    started = time.perf_counter()
    sections = []
    for name in args.models.split(","):
        section, rows = _model(name, budgets, _count(args.evaluation, name), _count(args.calibration, name))
        plot = Path(args.plots) / f"int8-{name}.png"
        _plot(name, rows, plot)
        sections.append(section + f"\n![{name}: size and time against the task metric](plots/{plot.name})\n")
    more = "".join(f" --{flag} {','.join(f'{m}={n}' if m else str(n) for m, n in counts.items())}"
                   for flag, counts in (("evaluation", args.evaluation), ("calibration", args.calibration)) if counts)
    header = (f"Produced by `python benchmarks/int8.py --models {args.models} --budgets {args.budgets}{more}` on "
              f"{datetime.date.today()} in {(time.perf_counter() - started) / 60:.1f} minutes: onnx-lowrank "
              f"{onnx_lowrank.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, Python "
              f"{platform.python_version()}, {THREADS} threads. See the script's docstring for what each row is. "
              f"**goal**: task metric within {METRIC_SLACK} of int8 alone (static), size <= {SIZE_GOAL}x and time "
              f"<= {TIME_GOAL}x of it.\n")
    body = header + "\n".join(sections)
    Path(args.out).write_text("# int8 deployment: low rank + int8 against int8 alone\n\n" + body)
    if args.results:
        _into_results(Path(args.results), body)
    print(body)
    return 0


RESULTS_START, RESULTS_END = "<!-- int8: benchmarks/int8.py -->", "<!-- /int8 -->"


def _into_results(path: Path, body: str) -> None:
    """RESULTS.md with its int8 section (between the markers) replaced by `body`, or appended."""
    text = path.read_text() if path.exists() else ""
    section = f"{RESULTS_START}\n## int8 deployment: ours + int8 against int8 alone\n\n{body}\n{RESULTS_END}\n"
    if RESULTS_START in text and RESULTS_END in text:
        before, rest = text.split(RESULTS_START, 1)
        text = before + section + rest.split(RESULTS_END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def _plot(name: str, rows: list[tuple], path: Path) -> None:
    """Task metric against size and against time, both as fractions of int8 alone: ours + int8 per budget kind,
    int8 alone (static) marked with a star, dynamic int8 alone with a cross."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    static_size = rows[1][1]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, column, label in ((axes[0], 1, "file size / int8 alone's"), (axes[1], 3, "time / int8 alone's")):
        for kind, marker in (("ours 0", "o"), ("ours latency", "s")):
            for mode in ("int8", "int8-dynamic"):
                points = sorted((r[column] / (static_size if column == 1 else 1), r[4]) for r in rows
                                if r[0].startswith(kind) and r[0].endswith(f"+ {mode}") and r[1] is not None
                                and r[column] is not None)
                if points:
                    axis.plot(*zip(*points), marker=marker, linestyle="-" if mode == "int8" else ":",
                              label=f"{kind} budgets + {mode}".replace("ours 0", "ours params"))
        axis.scatter([1.0], [rows[1][4]], marker="*", s=180, color="black", label="int8 alone (static)", zorder=3)
        if column == 1:
            axis.scatter([rows[2][1] / static_size], [rows[2][4]], marker="x", s=80, color="grey",
                         label="int8 alone (dynamic)", zorder=3)
        axis.set_xlabel(label)
        axis.set_ylabel("task metric")
        axis.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"{name}: ours + int8 against int8 alone (times measured interleaved, same run)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _counts(text: str) -> dict[str, int]:
    """'64' -> {"": 64} (every model); 'ppocrv4-rec=64,ppocrv4-det=16' -> {model: count}."""
    counts = {}
    for part in text.split(","):
        model, _, count = part.rpartition("=")
        if model and model not in MODELS:
            raise argparse.ArgumentTypeError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
        counts[model] = int(count)
    return counts


def _count(counts: dict[str, int], model: str) -> int:
    """The count `counts` gives `model` (its own, else the one for every model, else 0: the workload's split)."""
    return counts.get(model, counts.get("", 0))


def _budget(text: str) -> tuple[str, float]:
    """'0.7' -> ("params", 0.7); 'latency:0.8' -> ("latency", 0.8)."""
    metric, _, fraction = text.rpartition(":")
    return metric or "params", float(fraction)


def _model(name: str, budgets: list[tuple[str, float]], evaluation: int = 0, calibration: int = 0
           ) -> tuple[str, list[tuple]]:
    workload = workloads()[name].with_evaluation(evaluation).with_calibration(calibration)
    path = model_path(workload.model)
    original = onnx.load(path)
    calibration, evaluation = workload.calibration_feeds(), workload.evaluation_feeds()
    speed = SpeedSettings(runtime=RuntimeSettings(threads=THREADS))
    reference = workload.outputs(runtime.session(original))
    feed = evaluation[0]
    rows = []

    def row(label, model, against, seconds=None, note=""):
        score = workload.compare(workload.outputs(runtime.session(model)), reference)["metric"]
        size = len(model.SerializeToString())
        vs_original = compare_models(original, model, [feed], speed, stop_early=False).ratio
        timed = None if against is None else compare_models(against, model, [feed], speed, stop_early=False)
        vs_alone = None if timed is None else timed.ratio
        rows.append((label, size, vs_original, vs_alone, score, seconds, note, timed and timed.bounds))
        return score, size, vs_alone

    row("original (float)", original, None)
    alone = {}
    for mode in ("int8", "int8-dynamic"):
        recipe, _ = plan_quantization(original, mode, True, upgrade=True)
        recipe, model, _ = choose_activations(original, recipe, Samples.given(calibration), feed, speed)
        recipe, model, _ = choose_ranges(original, recipe, Samples.given(calibration), model)
        alone[mode] = model
        row(f"int8 alone ({recipe.describe()})", model, None)
    alone_score, alone_size = rows[1][4], rows[1][1]
    # dynamic int8 too where onnxruntime advises it: models without a Conv (transformers, MLPs)
    modes = ("int8", "int8-dynamic") if not any(n.op_type == "Conv" for n in original.graph.node) else ("int8",)
    for mode in modes:
        for metric, budget in budgets:
            start = time.perf_counter()
            label = f"ours {'' if metric == 'params' else metric + ' '}{budget:g} + {mode}"
            try:
                model, report = onnx_lowrank.compress(path, budget, metric=metric, calibration=calibration,
                                                      quantize=mode, verify=False, threads=THREADS,
                                                      upgrade_opset=True)
            except onnx_lowrank.LowRankError as exc:
                rows.append((label, None, None, None, None, None, str(exc)[:80], None))
                continue
            seconds = time.perf_counter() - start
            score, size, vs_alone = row(label, model, alone[mode], seconds, report.plan.allocator or "")
            goal = (mode == "int8" and score >= alone_score - METRIC_SLACK and size <= SIZE_GOAL * alone_size
                    and vs_alone is not None and vs_alone <= TIME_GOAL)
            rows[-1] = rows[-1][:6] + (("**goal** " if goal else "") + rows[-1][6], rows[-1][7])
    lines = [f"\n## {name} ({workload.metric}; {len(calibration)} calibration and {len(evaluation)} evaluation "
             "samples)\n",
             "| model | file MB | size vs int8 alone | time vs original | time vs int8 alone | task metric | tool s | |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for label, size, vs_original, vs_alone, score, seconds, note, bounds in rows:
        spread = "" if bounds is None else f" ({bounds[0]:.2f}-{bounds[1]:.2f})"
        lines.append(f"| {label} | {_f(size and size / 1e6, 2)} | {_f(size and size / alone_size, 2, 'x')} | "
                     f"{_f(vs_original, 3, 'x')} | {_f(vs_alone, 3, 'x')}{spread} | {_f(score, 3)} | "
                     f"{_f(seconds, 1)} | {note} |")
    print("\n".join(lines), flush=True)
    return "\n".join(lines) + "\n", rows


def _f(value, digits, suffix=""):
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


if __name__ == "__main__":
    sys.exit(main())
