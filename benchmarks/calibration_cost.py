"""What calibration costs: wall time and peak memory of `onnx-lowrank compress --calibration` against the number of
calibration samples.

    python benchmarks/calibration_cost.py        # writes benchmarks/CALIBRATION_COST.md

YOLOv8n (320 x 320) is compressed to 0.8 of its parameters from a folder of N calibration images (the detection
workload's calibration images, then mirrored and cropped variants of them), once per N, each run in its own
process through the command line a user would type, so its peak resident memory (ru_maxrss of that process alone)
and wall time are what a user sees. Statistics are streamed one sample at a time, so memory should not grow with N.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.workloads import model_path, workloads  # noqa: E402
from benchmarks.workloads.detection import augment, letterbox  # noqa: E402


def write_samples(folder: Path, count: int) -> None:
    """`count` .npz files of letterboxed calibration images (originals first, then augmented variants)."""
    workload = workloads()["yolov8n-320"]
    images = workload.images("calibration")
    rng = np.random.default_rng(7)
    for index in range(count):
        image = images[index % len(images)]
        if index >= len(images):
            image = augment(image, rng)
        np.savez(folder / f"sample_{index:04d}.npz", images=letterbox(image))


def measure(model: Path, folder: Path, out: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one `compress` run in a child process."""
    command = [sys.executable, "-m", "onnx_lowrank", "compress", str(model), str(out), "--budget", "0.8",
               "--calibration", str(folder), "--no-verify", "--quiet"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"compress failed: {' '.join(command)}")
    return seconds, usage.ru_maxrss / 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="16,128", help="numbers of calibration samples, comma-separated")
    parser.add_argument("--out", default=str(HERE / "CALIBRATION_COST.md"))
    args = parser.parse_args(argv)
    model = model_path("yolov8n-320")
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnx_lowrank_cost_") as scratch:
        for count in (int(c) for c in args.counts.split(",")):
            folder = Path(scratch) / f"calibration_{count}"
            folder.mkdir()
            write_samples(folder, count)
            seconds, peak = measure(model, folder, Path(scratch) / f"out_{count}.onnx")
            rows.append((count, seconds, peak))
            print(f"{count} samples: {seconds:.1f} s, peak RSS {peak:.0f} MiB", file=sys.stderr, flush=True)
    base = rows[0][2]
    lines = [
        "# Calibration cost\n",
        "Produced by `python benchmarks/calibration_cost.py`: `onnx-lowrank compress yolov8n-320.onnx out.onnx "
        "--budget 0.8 --calibration FOLDER --no-verify` in a child process per row (peak RSS of that process). "
        f"Machine: {os.cpu_count()} cores.\n",
        "| calibration samples | wall time (s) | peak RSS (MiB) | RSS vs first row |",
        "| ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {count} | {seconds:.1f} | {peak:.0f} | {peak / base - 1:+.1%} |" for count, seconds, peak in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
