"""int8 alone against the size of its calibration split: every activation-ranges method, scored on one evaluation split.

    python benchmarks/int8_calibration.py ppocrv4-rec --evaluation 192 --calibration 16,64
    python benchmarks/int8_calibration.py ppocrv4-det --evaluation 32 --calibration 4,16,32

The baseline of the int8 goal is int8 alone calibrated on the same samples as ours. More samples are not always a
better int8 alone: a range method is calibrated on every prefix named (`Workload.with_calibration`: the first
samples are the same), quantized by the tool's recipe (`stages.quantize`, activation type measured), and scored with
the workload's task metric; "chosen" marks the method `deployment.choose_ranges` keeps (least output error on the
calibration samples themselves), the one int8 alone and ours are written with.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onnx_lowrank.graph import runtime  # noqa: E402
from onnx_lowrank.graph.inputs import Samples  # noqa: E402
from onnx_lowrank.graph.runtime import RuntimeSettings  # noqa: E402
from onnx_lowrank.settings import SpeedSettings  # noqa: E402
from onnx_lowrank.stages.deployment import choose_activations, choose_ranges  # noqa: E402
from onnx_lowrank.stages.quantize import RANGES, plan_quantization, quantize  # noqa: E402

from benchmarks.workloads import model_path, workloads  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=tuple(workloads()))
    parser.add_argument("--calibration", default="16,64", help="calibration split sizes, comma-separated")
    parser.add_argument("--evaluation", type=int, default=0, help="at least this many evaluation samples")
    args = parser.parse_args(argv)
    base = workloads()[args.model].with_evaluation(args.evaluation)
    original = onnx.load(model_path(base.model))
    speed = SpeedSettings(runtime=RuntimeSettings(threads=2))
    reference = base.outputs(runtime.session(original))
    feed = base.evaluation_feeds()[0]
    print(f"## {args.model}: int8 alone ({base.metric}, {len(base.evaluation_feeds())} evaluation samples)\n")
    print("| calibration samples | ranges | output error on them | task metric | |")
    print("| ---: | --- | ---: | ---: | --- |")
    for count in (int(c) for c in args.calibration.split(",")):
        calibration = Samples.given(base.with_calibration(count).calibration_feeds()[:count])
        recipe, _ = plan_quantization(original, "int8", True, upgrade=True)
        recipe, alone, _ = choose_activations(original, recipe, calibration, feed, speed)
        chosen, _, errors = choose_ranges(original, recipe, calibration, alone)
        for ranges in RANGES:
            model = quantize(original, replace(chosen, ranges=ranges), calibration)
            score = base.compare(base.outputs(runtime.session(model)), reference)["metric"]
            print(f"| {count} | {ranges} | {errors[ranges]:.4f} | {score:.4f} | "
                  f"{'chosen' if ranges == chosen.ranges else ''} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
