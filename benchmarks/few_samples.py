"""The few-samples study: how the default compression does when it is calibrated on 1 to 64 samples.

    python benchmarks/few_samples.py                                   # every benchmark model, 1 2 4 8 16 64
    python benchmarks/few_samples.py --models ppocr-cls,bytes-classifier --counts 1,4     # a piece of it

For each benchmark model (the workloads of benchmarks/workloads whose model is fetched or built) and each count N,
`onnx_lowrank.compress(model, budget, allow_slower=True)`, the default options but for the never-slower guard, is
calibrated on the first N samples of the workload's calibration split and scored on the workload's evaluation split,
which is disjoint from it: the worst relative L2 error of the model's outputs (pooled over samples) and the
workload's task metric. The weight-only compression at the same budget (`weight_only=True`, no data) is scored the
same way as the reference. Budget 0.8 of the params unless `--budget`. The guard is lifted because this study is
about what the samples do to the plan: the guard decides from timings which layers may be compressed at all, and
with it a model whose compressed forms are not faster (bytes-classifier) is refused at every count.

Every cell (a model and a count, or a model's weight-only reference) is stored as JSON in the cache folder
(`--cache`, default ~/.cache/onnx-lowrank/few-samples) under a key of the model file's sha256, the budget and a
fingerprint of the library's source (onnx_lowrank/**/*.py): a cell already computed for the same library is read,
not run again, so the study can run in pieces (`--models`, `--counts`) and be resumed; `--fresh` recomputes. Nothing
is timed (the guard is lifted), so a cell is the same on any machine. After the cells asked for, the
markdown (`--out`, default benchmarks/FEW_SAMPLES.md) and the plot (benchmarks/plots/few_samples.png) are written
from every cached cell of this library fingerprint, so the pieces add up to one report.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import onnx_lowrank  # noqa: E402

from benchmarks.workloads import model_path, workloads  # noqa: E402
from benchmarks.workloads.base import _fetch_module  # noqa: E402

COUNTS = (1, 2, 4, 8, 16, 64)
BUDGET = 0.8
THREADS = 2  # onnxruntime intra-op threads, as benchmarks/run.py
FOUR = ("yolov8n-320", "ppocrv4-det", "ppocrv4-rec", "ppocr-cls")  # the models the defaults were tuned on
WEIGHT = "weight"  # the cell name of the weight-only reference


def library_fingerprint() -> str:
    """sha256 (first 12 hex digits) of the library's Python sources: cells of another library are not reused."""
    digest = hashlib.sha256()
    package = ROOT / "onnx_lowrank"
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def benchmark_models() -> list[str]:
    """Every workload whose model is there (fetched, or built by its script); a built model not built is left out."""
    available = []
    for name, workload in workloads().items():
        try:
            model_path(workload.model)
        except _fetch_module().FetchError as error:
            print(f"[{name}] left out: {error}", file=sys.stderr)
            continue
        available.append(name)
    return available


def _session(model: onnx.ModelProto):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = THREADS
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _all_outputs(session, feeds) -> list[list[np.ndarray]]:
    """Every output of `session` on every feed: [feed][output]."""
    return [session.run(None, feed) for feed in feeds]


def relative_l2(candidate: list[list[np.ndarray]], reference: list[list[np.ndarray]]) -> float:
    """The worst relative L2 error over outputs, each pooled over every feed: ||a - b|| / ||a|| of the original a."""
    worst = 0.0
    for index in range(len(reference[0])):
        diff = sum(float(np.sum((np.asarray(c[index], np.float64) - np.asarray(r[index], np.float64)) ** 2))
                   for c, r in zip(candidate, reference))
        norm = sum(float(np.sum(np.asarray(r[index], np.float64) ** 2)) for r in reference)
        worst = max(worst, math.sqrt(diff / norm) if norm else (0.0 if diff == 0 else math.inf))
    return worst


def squares(candidate: list[list[np.ndarray]], reference: list[list[np.ndarray]]) -> list[list[list[float]]]:
    """Per output, per feed: [||a - b||^2, ||a||^2] of the original a: what `relative_l2` pools, kept per feed so a
    difference between two cells can be bootstrapped over the feeds."""
    return [[[float(np.sum((np.asarray(c[i], np.float64) - np.asarray(r[i], np.float64)) ** 2)),
              float(np.sum(np.asarray(r[i], np.float64) ** 2))] for c, r in zip(candidate, reference)]
            for i in range(len(reference[0]))]


def error_difference(cell: dict, other: dict, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95% bootstrap interval of cell's output error minus other's (the worst relative L2 over outputs, pooled
    over the feeds), both on the same resampled feeds (the evaluation split, paired)."""
    a, b = np.asarray(cell["squares"]), np.asarray(other["squares"])  # (outputs, feeds, 2)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, a.shape[1], size=(draws, a.shape[1]))

    def worst(values):
        sums = values[:, picks].sum(axis=2)  # (outputs, draws, 2)
        return np.sqrt(sums[..., 0] / np.maximum(sums[..., 1], 1e-300)).max(axis=0)

    low, high = np.percentile(worst(a) - worst(b), [2.5, 97.5])
    return float(low), float(high)


class Study:
    """One model's cells: the original and its evaluation outputs, loaded once; `cell(count)` runs or reads one."""

    def __init__(self, name: str, cache: Path, budget: float, fingerprint: str, fresh: bool) -> None:
        self.name, self.budget, self.fresh = name, budget, fresh
        self.workload = workloads()[name]
        self.path = model_path(self.workload.model)
        self.original = onnx.load(str(self.path))
        self.feeds = self.workload.evaluation_feeds()
        self.reference = _all_outputs(_session(self.original), self.feeds)
        self.folder = cache / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key = f"{_sha256(self.path)[:12]}-{budget:g}-{fingerprint}"

    def cell_path(self, count: int | None) -> Path:
        return self.folder / f"{WEIGHT if count is None else count}-{self.key}.json"

    def cell(self, count: int | None) -> dict:
        """The result of calibrating on the first `count` samples (None: weight-only), read from the cache when it
        is there."""
        path = self.cell_path(count)
        if path.is_file() and not self.fresh:
            return json.loads(path.read_text())
        started = time.perf_counter()
        if count is None:
            options = dict(weight_only=True, inputs=self.feeds[:1])
        else:
            calibration = self.workload.with_calibration(count).calibration_feeds()[:count]
            options = dict(calibration=calibration)
        result = {"model": self.name, "samples": count, "budget": self.budget}
        try:
            compressed, report = onnx_lowrank.compress(self.original, self.budget, verify=False, threads=THREADS,
                                                       allow_slower=True, **options)
        except onnx_lowrank.LowRankError as error:  # recorded, so the study says which cells the tool refused
            result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        else:
            tool_seconds = time.perf_counter() - started
            outputs = _all_outputs(_session(compressed), self.feeds)
            task = self.workload.compare([o[0] for o in outputs], [r[0] for r in self.reference])
            result.update(
                params=report.params_ratio,
                flops=report.flops_ratio,
                output_error=relative_l2(outputs, self.reference),
                squares=squares(outputs, self.reference),
                task=task,
                factorized=len(report.factorized),
                narrowed=len(report.narrowed),
                message=report.message,
                tool_seconds=tool_seconds,
            )
        result["seconds"] = time.perf_counter() - started
        temporary = path.with_suffix(".part")
        temporary.write_text(json.dumps(result, indent=1, default=float))
        os.replace(temporary, path)
        return result


def cached_cells(cache: Path, budget: float, fingerprint: str) -> dict[str, dict]:
    """model -> {count or "weight": cell} of every cached cell of this budget and library fingerprint."""
    table: dict[str, dict] = {}
    for path in sorted(cache.glob(f"*/*-{budget:g}-{fingerprint}.json")):
        cell = json.loads(path.read_text())
        table.setdefault(cell["model"], {})[WEIGHT if cell["samples"] is None else cell["samples"]] = cell
    return table


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _verdict(cell: dict, weight: dict | None, margin: float) -> str:
    """The cell against weight-only, beyond noise: worse if its task metric is lower by more than `margin` or its
    output error higher beyond the bootstrap interval (`error_difference`); better if the task metric is higher by
    more than `margin` or the output error lower beyond it; else same."""
    if "error" in cell or weight is None or "error" in weight:
        return "-"
    delta = cell["task"]["metric"] - weight["task"]["metric"]
    low, high = error_difference(cell, weight)
    if delta < -margin or low > 0:
        return "worse"
    return "better" if delta > margin or high < 0 else "same"


def _margin(name: str) -> float:
    """The task-metric difference read as noise: one evaluation sample's worth, at least 0.01."""
    return max(1.0 / len(workloads()[name].evaluation_feeds()), 0.01)


def markdown(table: dict[str, dict], budget: float, fingerprint: str, command: str, plot: Path, out: Path) -> str:
    order = [n for n in workloads() if n in table]
    lines = [
        "# Few calibration samples\n",
        f"Produced by `{command}` (cells cached per model and count; this file gathers every cached cell) on "
        f"{datetime.date.today().isoformat()}. Library fingerprint {fingerprint} (sha256 of onnx_lowrank/**/*.py), "
        f"onnx-lowrank {onnx_lowrank.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"numpy {np.__version__}, Python {platform.python_version()}, {os.cpu_count()} cores.\n",
        f"Each model is compressed to **{budget:g} of its params** by `onnx_lowrank.compress` with the default "
        "options (method, allocator) but `allow_slower=True` (the never-slower guard decides from timings which "
        "layers may be compressed at all, not from the samples; with it, bytes-classifier is refused at every count; "
        "onnxruntime with "
        f"{THREADS} threads), calibrated on the first N samples of its workload's calibration split (one sample = "
        "one feed of batch 1), and scored on the workload's evaluation split, disjoint from it. `weight-only` is "
        "`weight_only=True` at the same budget (no data): the dashed line of the plot. Columns: `params`: fraction "
        "kept; `task`: the workload's metric (see benchmarks/RESULTS.md; `accuracy` is against the true labels "
        "where the workload has them); `out err`: worst relative L2 error of the outputs on the evaluation split; "
        "`n`: layers factorized + narrowed; `tool s`: seconds of `compress` (the first cell of a model also times "
        "its layers); `vs weight-only`: `worse` when the task metric is lower than weight-only's by more than one "
        "evaluation sample's worth (at least 0.01) or the output error higher beyond noise (a 95% bootstrap "
        "interval of the difference over the evaluation samples, paired, excludes 0), `better` the other way round, "
        "else `same`; `err diff`: that interval.\n",
        "| model | samples | params | task | accuracy | out err | err diff | n | tool s | vs weight-only |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    notes = []
    for name in order:
        cells = table[name]
        weight = cells.get(WEIGHT)
        for key in [WEIGHT] + sorted(k for k in cells if k != WEIGHT):
            cell = cells.get(key)
            if cell is None:
                continue
            label = "weight-only" if key == WEIGHT else str(key)
            if "error" in cell:
                lines.append(f"| {name} | {label} | - | - | - | - | - | - | - | refused |")
                notes.append(f"- {name}, {label}: {cell['error']}")
                continue
            task = cell["task"]
            lines.append(
                f"| {name} | {label} | {_fmt(cell['params'])} | {_fmt(task['metric'])} | "
                f"{_fmt(task.get('accuracy'))} | {_fmt(cell['output_error'])} | {_interval(cell, weight, key)} | "
                f"{cell['factorized'] + cell['narrowed']} | {cell['tool_seconds']:.1f} | "
                f"{'reference' if key == WEIGHT else _verdict(cell, weight, _margin(name))} |")
            if cell.get("message"):
                notes.append(f"- {name}, {label}: {cell['message'].splitlines()[0]}")
    if notes:
        lines += ["\nWhat the tool said:\n"] + notes
    summary = _summary(table, order)
    if summary:
        lines += ["", summary]
    lines.append(f"\n![few samples]({Path(os.path.relpath(plot, out.parent)).as_posix()})\n")
    return "\n".join(lines) + "\n"


def _interval(cell: dict, weight: dict | None, key) -> str:
    if key == WEIGHT or weight is None or "error" in weight:
        return "-"
    low, high = error_difference(cell, weight)
    return f"{low:+.3f} .. {high:+.3f}"


def _summary(table: dict[str, dict], order: list[str]) -> str:
    """Per model: the counts at which the default was worse than weight-only, and whether it was better from 4 on."""
    parts = []
    for name in order:
        cells = table[name]
        weight = cells.get(WEIGHT)
        counts = sorted(k for k in cells if k != WEIGHT)
        if weight is None or not counts:
            continue
        verdicts = {k: _verdict(cells[k], weight, _margin(name)) for k in counts}
        worse = [str(k) for k, v in verdicts.items() if v == "worse"]
        from_four = [v for k, v in verdicts.items() if k >= 4]
        original = weight.get("task", {}).get("accuracy_original")
        parts.append(f"{name}{'' if original is None else f' (original accuracy {original:.3f})'}: worse than "
                     f"weight-only at {', '.join(worse) if worse else 'no count'}"
                     + (f"; better at every count from 4 on: {'yes' if all(v == 'better' for v in from_four) else 'no'}"
                        if from_four else ""))
    return ("Against weight-only (task metric and output error, beyond noise): " + "; ".join(parts) + ".") if parts else ""


def plot(table: dict[str, dict], path: Path, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, name in enumerate(n for n in workloads() if n in table):
        cells, color = table[name], colors[index % len(colors)]
        counts = sorted(k for k in cells if k != WEIGHT and "error" not in cells[k])
        weight = cells.get(WEIGHT)
        for axis, value in zip(axes, (lambda c: c["task"]["metric"], lambda c: c["output_error"])):
            if counts:
                axis.plot(counts, [value(cells[k]) for k in counts], marker="o", color=color, label=name)
            if weight is not None and "error" not in weight:
                axis.axhline(value(weight), color=color, linestyle="--", linewidth=1)
    for axis, label in zip(axes, ("task metric (higher is better)", "output relative L2 error")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("calibration samples")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    figure.suptitle(f"default compression at {budget:g} of the params, calibrated on N samples "
                    "(dashed: weight-only)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="workload names, comma-separated (default: every benchmark model there)")
    parser.add_argument("--counts", default=",".join(map(str, COUNTS)), help="calibration sample counts")
    parser.add_argument("--budget", type=float, default=BUDGET, help="fraction of the params kept")
    parser.add_argument("--cache", default=str(Path("~/.cache/onnx-lowrank/few-samples").expanduser()),
                        help="folder of the cached cells")
    parser.add_argument("--fresh", action="store_true", help="recompute the cells asked for even when cached")
    parser.add_argument("--out", default=str(HERE / "FEW_SAMPLES.md"))
    parser.add_argument("--plot", default=str(HERE / "plots" / "few_samples.png"))
    args = parser.parse_args(argv)
    if args.models:
        models = [m for m in args.models.split(",") if m]
        unknown = [m for m in models if m not in workloads()]
        if unknown:
            print(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(workloads())}", file=sys.stderr)
            return 2
    else:
        models = benchmark_models()
    counts = [int(c) for c in args.counts.split(",") if c]
    cache, fingerprint = Path(args.cache).expanduser(), library_fingerprint()
    for name in models:
        study = Study(name, cache, args.budget, fingerprint, args.fresh)
        for count in [None] + counts:
            cached = study.cell_path(count).is_file() and not args.fresh
            cell = study.cell(count)
            outcome = cell.get("error") or (f"params {cell['params']:.3f}, task {cell['task']['metric']:.3f}, "
                                            f"out err {cell['output_error']:.3f}")
            took = "cached" if cached else f"{cell['seconds']:.1f} s"
            print(f"[{name}] {WEIGHT if count is None else f'{count} samples'}: {outcome} ({took})",
                  file=sys.stderr, flush=True)
    command = "python benchmarks/few_samples.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(
        sys.argv[1:] if argv is None else argv))
    table = cached_cells(cache, args.budget, fingerprint)
    out, picture = Path(args.out), Path(args.plot)
    plot(table, picture, args.budget)
    out.write_text(markdown(table, args.budget, fingerprint, command, picture, out))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
