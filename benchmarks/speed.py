"""The tool's own speed, side by side in one run with what it is judged against (issue 20).

    python benchmarks/speed.py                 # writes benchmarks/SPEED.md (about 10 minutes on 2 cores)
    python benchmarks/speed.py --repeats 1     # quicker, noisier

1. The README's first command, its compress step as a user types it (`python -m onnx_lowrank compress ...` in a
   child process): cold (an empty latency cache: every layer timed) and warm (the cache of the cold run), and
   whether two warm runs wrote the same bytes; with `--before CHECKOUT` (say `git worktree add /tmp/base <commit>`)
   that commit's package runs the same commands, alternating with this one.
2. YOLOv8n and the PP-OCRv4 recogniser calibrated on their calibration split, `--budget 0.8`, no verification, warm
   cache (each run once untimed first): the default (`both`, `auto` judge, guard), `data alds` (`--method lowrank
   --allocator alds`), and `baselines.plain_calibrated` (capture, whitened SVD with k = 1, min-max), in this
   process, interleaved.
3. YOLOv8n weight-only at params 0.7 with verification on its evaluation split, warm cache, against
   `baselines.bare_svd` (an SVD per layer, min-max).

Every figure is the median of `--repeats` runs (the spread in brackets); the runs of one comparison are interleaved.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import onnx_lowrank  # noqa: E402

from benchmarks.baselines import bare_svd, plain_calibrated  # noqa: E402
from benchmarks.workloads import model_path, workloads  # noqa: E402

THREADS = 2
FIRST = "yolov8n-320"


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _summary(seconds: list[float]) -> str:
    return f"{statistics.median(seconds):.1f} s" + (f" ({min(seconds):.1f}-{max(seconds):.1f})" if len(seconds) > 1
                                                     else "")


def first_command(folder: Path, repeats: int, before: Path | None) -> list[str]:
    """The README's compress step, cold then warm, in child processes with a latency cache of their own; with
    `before` (a checkout of an earlier commit), that commit's package runs the same command, interleaved."""
    workload = workloads()[FIRST]
    for split, feeds in (("calib", workload.calibration_feeds()), ("held_out", workload.evaluation_feeds())):
        (folder / split).mkdir()
        for index, feed in enumerate(feeds):
            np.savez(folder / split / f"sample_{index:04d}.npz", **feed)
    versions = {"this commit": None} if before is None else {f"before ({_commit(before)})": before, "this commit": None}
    cold = {version: [] for version in versions}
    warm = {version: [] for version in versions}
    same = {version: True for version in versions}
    for attempt in range(repeats):
        for number, (version, source) in enumerate(versions.items()):
            env = {**os.environ, "ONNX_LOWRANK_CACHE": str(folder / f"cache-{attempt}-{number}")}
            outputs = []
            for kind in ("cold", "warm", "warm"):
                output = folder / "out.onnx"
                command = [sys.executable, *_entry(source), "compress", str(model_path(workload.model)),
                           str(output), "--budget", "0.8", "--calibration", str(folder / "calib"), "--inputs",
                           str(folder / "held_out"), "--quiet"]
                seconds = _timed(lambda: subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL))
                (cold if kind == "cold" else warm)[version].append(seconds)
                outputs.append(output.read_bytes())
                output.unlink()
            same[version] &= outputs[1] == outputs[2]
    lines = ["## 1. The README's first command\n",
             "`onnx-lowrank compress yolov8n-320.onnx out.onnx --budget 0.8 --calibration calib --inputs held_out` "
             f"(16 calibration and 16 held-out images), a child process each (interpreter start included): per "
             f"attempt ({repeats}), a cold run (empty latency cache: every layer timed) then two warm runs on its "
             "cache; the versions alternate.\n",
             "| version | cold | warm | two warm runs wrote identical bytes |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {version} | {_summary(cold[version])} | {_summary(warm[version])} | "
              f"{'yes' if same[version] else 'NO'} |" for version in versions]
    return lines + [""]


def _entry(source: Path | None) -> list[str]:
    """How the child runs the CLI: `-m onnx_lowrank` as installed, or the package of `source` (an editable install's
    import hook comes before PYTHONPATH, so it is taken out first; the interpreter starts the same way)."""
    if source is None:
        return ["-m", "onnx_lowrank"]
    prelude = ("import runpy, sys; "
               "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]; "
               f"sys.path.insert(0, {str(source)!r}); sys.argv[0] = 'onnx-lowrank'; "
               "runpy.run_module('onnx_lowrank', run_name='__main__', alter_sys=True)")
    return ["-c", prelude]


def _commit(checkout: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], check=True,
                              capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(checkout)


def calibrated(name: str, repeats: int, cache: Path) -> list[str]:
    workload = workloads()[name]
    original = onnx.load(str(model_path(workload.model)))
    calibration = workload.calibration_feeds()
    common = dict(calibration=calibration, verify=False, threads=THREADS, latency_cache=cache)
    runs = {
        "default (both, auto judge, guard)": lambda: onnx_lowrank.compress(original, 0.8, **common),
        "data alds (--method lowrank --allocator alds)": lambda: onnx_lowrank.compress(
            original, 0.8, method="lowrank", allocator="alds", **common),
        "plain calibrated k = 1 script": lambda: plain_calibrated(original, calibration, 0.8),
    }
    return ([f"### {name} ({len(calibration)} calibration samples, params 0.8, no verification, warm cache)\n"]
            + _side_by_side(runs, repeats, "plain calibrated k = 1 script", "the plain script"))


def weight_only(repeats: int, cache: Path) -> list[str]:
    workload = workloads()[FIRST]
    original = onnx.load(str(model_path(workload.model)))
    held_out = workload.evaluation_feeds()
    runs = {"onnx-lowrank weight-only, verified": lambda: onnx_lowrank.compress(
                original, 0.7, weight_only=True, inputs=held_out, threads=THREADS, latency_cache=cache),
            "bare per-layer SVD script": lambda: bare_svd(original, 0.7)}
    return (["## 3. Weight-only\n", f"{FIRST} at params 0.7 (the tool verifies on {len(held_out)} held-out images; "
             "warm cache).\n"] + _side_by_side(runs, repeats, "bare per-layer SVD script", "the bare script"))


def _side_by_side(runs: dict, repeats: int, reference: str, named: str) -> list[str]:
    """Every run once untimed (it fills the latency cache, every form any of them times, and warms up), then
    `repeats` interleaved rounds; a table of medians against `reference`'s."""
    for run in runs.values():
        run()
    seconds = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            seconds[label].append(_timed(run))
    base = statistics.median(seconds[reference])
    lines = [f"| run | seconds | against {named} |", "| --- | ---: | ---: |"]
    lines += [f"| {label} | {_summary(values)} | {statistics.median(values) / base:.2f}x |"
              for label, values in seconds.items()]
    return lines + [""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", default=None, help="a checkout of an earlier commit: section 1 runs it too")
    parser.add_argument("--out", default=str(HERE / "SPEED.md"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnx-lowrank-speed-") as folder:
        folder = Path(folder)
        lines = first_command(folder, args.repeats, Path(args.before) if args.before else None)
        lines += ["## 2. Calibrated compression against a plain script\n"]
        for name in (FIRST, "ppocrv4-rec"):
            lines += calibrated(name, args.repeats, folder / f"{name}.json")
        lines += weight_only(args.repeats, folder / f"{FIRST}.json")
    command = "python benchmarks/speed.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(
        sys.argv[1:] if argv is None else argv))
    header = ["# The tool's own speed\n",
              f"Produced by `{command}` on {datetime.date.today().isoformat()} in "
              f"{(time.perf_counter() - started) / 60:.1f} minutes: onnx-lowrank {onnx_lowrank.__version__}, onnx "
              f"{onnx.__version__}, onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}, "
              f"{os.cpu_count()} cores ({platform.machine()}). Medians of {args.repeats} run(s), the spread in "
              "brackets. See the script's docstring for what each run is.\n"]
    Path(args.out).write_text("\n".join(header + lines) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
