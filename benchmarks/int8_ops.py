"""Where an int8 model's time goes, by operator: onnxruntime's profiler on the float model and on int8 alone.

    python benchmarks/int8_ops.py                       # YOLOv8n, its workload's calibration samples
    python benchmarks/int8_ops.py --model ppocrv4-det --runs 20

Why low rank buys little time on top of int8 on a model: a factorization shrinks only the (QLinear)Conv share.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from onnx_lowrank.stages.quantize import plan_quantization, quantize  # noqa: E402

from benchmarks.workloads import model_path, workloads  # noqa: E402


def kernel_times(model: onnx.ModelProto, feed: dict, runs: int, threads: int) -> collections.Counter:
    """Microseconds per run spent in each op type's kernels (onnxruntime's profile, after one warm-up run)."""
    with tempfile.TemporaryDirectory() as folder:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                               providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    times = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["args"]["op_name"]] += event["dur"] / (runs + 1)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="yolov8n-320")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--silu-in-float", action="store_true",
                        help="also time int8 alone with every Sigmoid and Mul left in float, against the default")
    args = parser.parse_args(argv)
    workload = workloads()[args.model]
    original = onnx.load(model_path(workload.model))
    calibration = workload.calibration_feeds()
    recipe, _ = plan_quantization(original, "int8", calibrated=True, upgrade=True)
    alone = quantize(original, recipe, calibration)
    for label, model in (("float", original), (f"int8 alone ({recipe.describe()})", alone)):
        times = kernel_times(model, calibration[0], args.runs, args.threads)
        total = sum(times.values())
        print(f"{label}: {total / 1000:.2f} ms of kernels per run")
        for op, us in times.most_common(8):
            print(f"  {op:24s} {us / 1000:7.3f} ms  {us / total:6.1%}")
    if args.silu_in_float:
        _silu_in_float(original, alone, recipe, calibration, args.threads)
    return 0


def _silu_in_float(original, alone, recipe, calibration, threads: int) -> None:
    """int8 alone against the same recipe with the SiLU's Sigmoid and Mul nodes kept in float (excluded like the
    weightless tail), timed interleaved: whether the activations' share of int8 time is worth leaving unquantized."""
    from onnx_lowrank.graph.runtime import RuntimeSettings
    from onnx_lowrank.stages import quantize as quantize_module
    from onnx_lowrank.stages.timing import OnnxruntimeTimer

    tail = quantize_module.weightless_tail
    quantize_module.weightless_tail = lambda model: tail(model) + [
        node.name for node in model.graph.node if node.op_type in ("Sigmoid", "Mul") and node.name]
    try:
        float_silu = quantize(original, recipe, calibration)
    finally:
        quantize_module.weightless_tail = tail
    timings = OnnxruntimeTimer(RuntimeSettings(threads=threads)).time(
        [original, alone, float_silu], [[calibration[0]]] * 3, 30, block_s=0.002)
    print("medians ms: float {:.2f}, int8 alone {:.2f}, int8 with Sigmoid and Mul in float {:.2f}".format(
        *timings.medians))


if __name__ == "__main__":
    sys.exit(main())
