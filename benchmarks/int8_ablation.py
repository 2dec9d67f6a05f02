"""Where ours + int8 loses its task metric: one plan's parts written alone, in float and in int8.

    python benchmarks/int8_ablation.py ppocrv4-rec 0.6            # params budget
    python benchmarks/int8_ablation.py ppocrv4-det latency:0.75 --each

Plans `compress(..., quantize="int8")` on the workload's calibration split (as benchmarks/int8.py does), then
writes with `apply` the whole plan, its factorizations alone and its narrowings alone (with `--each`, every
factorized layer and every narrowed chain alone too), each in float and quantized by the same recipe, and prints
each one's task metric on the evaluation split next to int8 alone's. A part that is fine in float and not in
int8 is one whose form quantizes badly (this found the narrowing folds that leaned on near-copies, see
`math.elimination`); a part that is already bad in float is the cut itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import onnx_lowrank  # noqa: E402
from onnx_lowrank.graph import runtime  # noqa: E402

from benchmarks.workloads import model_path, workloads  # noqa: E402

THREADS = 2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(workloads()))
    parser.add_argument("budget", help="0.6 (params) or latency:0.8")
    parser.add_argument("--each", action="store_true", help="also every factorized layer and narrowed chain alone")
    args = parser.parse_args(argv)
    workload = workloads()[args.model]
    path = model_path(workload.model)
    calibration = workload.calibration_feeds()
    reference = workload.outputs(runtime.session(onnx.load(path)))
    metric, _, fraction = args.budget.rpartition(":")

    def score(model: onnx.ModelProto) -> float:
        return workload.compare(workload.outputs(runtime.session(model)), reference)["metric"]

    def written(plan, quantize):
        model, _ = onnx_lowrank.apply(path, plan, calibration=calibration, quantize=quantize, verify=False,
                                      threads=THREADS, upgrade_opset=quantize is not None)
        return model

    ours, report = onnx_lowrank.compress(path, float(fraction), metric=metric or "params", calibration=calibration,
                                         quantize="int8", verify=False, threads=THREADS, upgrade_opset=True)
    plan = report.plan
    print(f"{args.model} {args.budget}: {plan.allocator}, {len(plan.layers)} factorized, {len(plan.widths)} narrowed; "
          f"{workload.metric}: ours + int8 {score(ours):.3f}, int8 alone {score(_int8_alone(path, calibration)):.3f}")
    parts = [("whole plan", plan), ("factorizations alone", dataclasses.replace(plan, widths={})),
             ("narrowings alone", dataclasses.replace(plan, layers={}))]
    if args.each:
        parts += [(f"layer {name}", dataclasses.replace(plan, layers={name: kr}, widths={}))
                  for name, kr in plan.layers.items()]
        parts += [(f"chain {name} -> {width}", dataclasses.replace(plan, layers={}, widths={name: width}))
                  for name, width in plan.widths.items()]
    print("| part | float | int8 |\n| --- | ---: | ---: |")
    for label, part in parts:
        if not part.layers and not part.widths:
            continue
        print(f"| {label} | {score(written(part, None)):.3f} | {score(written(part, 'int8')):.3f} |", flush=True)
    return 0


def _int8_alone(path: Path, calibration) -> onnx.ModelProto:
    """The original quantized by the tool's recipe: an empty plan applied with quantize."""
    from onnx_lowrank.plan import Plan

    model, _ = onnx_lowrank.apply(path, Plan(layers={}), calibration=calibration, quantize="int8", verify=False,
                                  threads=THREADS, upgrade_opset=True)
    return model


if __name__ == "__main__":
    sys.exit(main())
