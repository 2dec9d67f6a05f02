"""Write one split of a benchmark workload as a folder of .npz samples, the format `--calibration` and `--inputs`
take (one sample per file, keyed by the model's input name).

    python benchmarks/samples.py yolov8n-320 calibration calib/     # 16 letterboxed images
    python benchmarks/samples.py ppocrv4-rec evaluation held_out/   # 48 text lines of varying width
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.workloads import workloads  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=sorted(workloads()))
    parser.add_argument("split", choices=("calibration", "evaluation"))
    parser.add_argument("folder", help="created if missing; existing sample_*.npz files are replaced")
    args = parser.parse_args(argv)
    workload = workloads()[args.workload]
    feeds = workload.calibration_feeds() if args.split == "calibration" else workload.evaluation_feeds()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, feed in enumerate(feeds):
        np.savez(folder / f"sample_{index:04d}.npz", **feed)
    print(f"wrote {len(feeds)} samples to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
