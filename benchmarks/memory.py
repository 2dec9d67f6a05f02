"""Peak memory of `onnx-lowrank compress` on large generated models, against the size of their weights.

    python benchmarks/memory.py                  # ~1 GB and ~2.3 GB models
    python benchmarks/memory.py --gigabytes 1    # one size only

Each model is a chain of MatMul layers alternating (1, 256) @ (256, 65536) and (1, 65536) @ (65536, 256), 64 MiB
of float32 weights per layer, so a 1 GB model has 16 layers and a 2.3 GB one 36: the protobuf of the larger one is
over the 2 GiB limit of one message, so it can only exist with its weights as external data. Wide-and-short layers
keep the SVDs cheap (a 256 x 65536 SVD takes about a second), so the run measures the file handling, not the
linear algebra. The model is written one layer at a time (headers built by hand, bytes appended to the data file),
so generating it never holds more than one weight either.

`--untouched GB` adds the other kind of large model: one small MatMul to compress next to a GB-sized embedding
table read by a Gather, stored as a sparse file (zeros cost no disk and no time to generate). It exercises the
> 2 GiB file paths (lazy load, check by path, external data written automatically, the table streamed from the
input's data file into the output's) without the linear algebra that a compressible 2 GB model needs.

`onnx-lowrank compress MODEL OUT --budget 0.5 --allow-slower --quiet` (with `--metric flops` for the table model,
whose parameters are nearly all in the table) runs in a child process, as a user would
type it, and its peak resident set size (ru_maxrss of that child alone) is reported next to the weights' size.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

LAYER = (256, 65536)  # 64 MiB of float32 per layer


def write_model(folder: Path, layers: int, seed: int = 0) -> tuple[Path, int]:
    """A chain of `layers` MatMuls with external weights in 'model.onnx.data'; return the path and weight bytes."""
    path = folder / "model.onnx"
    data_name = path.name + ".data"
    rng = np.random.default_rng(seed)
    initializers, nodes, offset = [], [], 0
    with open(folder / data_name, "wb") as data:
        for index in range(layers):
            shape = LAYER if index % 2 == 0 else LAYER[::-1]
            weight = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(shape[0])).astype(np.float32)
            data.write(weight.tobytes())
            tensor = TensorProto(name=f"w{index}", data_type=TensorProto.FLOAT, dims=shape,
                                 data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(weight.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += weight.nbytes
            initializers.append(tensor)
            source = "x" if index == 0 else f"h{index - 1}"
            target = "y" if index == layers - 1 else f"h{index}"
            nodes.append(helper.make_node("MatMul", [source, f"w{index}"], [target], name=f"mm{index}"))
            del weight
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, LAYER[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, LAYER[0] if layers % 2 == 0 else LAYER[1]])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.write_bytes(model.SerializeToString())
    return path, offset


def write_embedding_model(folder: Path, gigabytes: float, width: int = 256) -> tuple[Path, int]:
    """y = MatMul(x + Gather(table, [0]), w): `table` (rows x width float32, `gigabytes` of zeros) lives in a sparse
    data file; w (width x width) is the one layer to compress. Return the path and the weight bytes."""
    path = folder / "model.onnx"
    data_name = path.name + ".data"
    rows = int(gigabytes * 1e9) // (4 * width)
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    table_bytes = rows * width * 4
    with open(folder / data_name, "wb") as data:
        data.truncate(table_bytes)  # a hole: zeros without writing them
        data.seek(table_bytes)
        data.write(weight.tobytes())
    tensors = []
    for name, dims, offset, length in (("table", (rows, width), 0, table_bytes),
                                       ("w", (width, width), table_bytes, weight.nbytes)):
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims, data_location=TensorProto.EXTERNAL)
        for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensors.append(tensor)
    tensors.append(helper.make_tensor("row", TensorProto.INT64, [1], [0]))
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "row"], ["e"], name="embed"),
         helper.make_node("Add", ["x", "e"], ["h"], name="add"),
         helper.make_node("MatMul", ["h", "w"], ["y"], name="fc")],
        "embedding",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        tensors)
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    return path, table_bytes + weight.nbytes


def measure(gigabytes: float, folder: Path, untouched: bool = False) -> dict:
    layers = 1 if untouched else max(2, round(gigabytes * 1e9 / (LAYER[0] * LAYER[1] * 4)))
    model, weight_bytes = (write_embedding_model(folder, gigabytes) if untouched else write_model(folder, layers))
    output = folder / "compressed.onnx"
    command = [sys.executable, "-m", "onnx_lowrank", "compress", str(model), str(output), "--budget", "0.5",
               "--allow-slower", "--quiet"]
    if untouched:  # the table is most of the parameters, and none of the FLOPs
        command += ["--metric", "flops"]
    start = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    completed = subprocess.run(command, capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    seconds = time.perf_counter() - start
    if peak < before * 1024:
        peak = float("nan")  # an earlier child was bigger: this child's peak is hidden (run one size per process)
    written = sum(p.stat().st_size for p in folder.glob("compressed.onnx*"))
    return {"layers": layers, "weights": weight_bytes, "peak_rss": peak, "ratio": peak / weight_bytes,
            "seconds": seconds, "exit": completed.returncode, "stderr": completed.stderr.strip()[-300:],
            "written": written}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, nargs="*", default=[1.0, 2.3])
    parser.add_argument("--folder", default=None, help="where to write the models (default: a temporary folder)")
    parser.add_argument("--untouched", type=float, default=None, metavar="GB",
                        help="instead: a GB-sized untouched embedding table (sparse file) and one small MatMul")
    parser.add_argument("--no-header", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.no_header:
        print(f"{'weights':>10} {'layers':>6} {'peak RSS':>10} {'RSS/weights':>11} {'seconds':>8} {'output':>10} exit",
              flush=True)
    if args.untouched is not None:
        with tempfile.TemporaryDirectory(dir=args.folder, prefix="onnx_lowrank_memory_") as folder:
            _print(measure(args.untouched, Path(folder), untouched=True))
        return
    for size in args.gigabytes:
        # every size in its own process, so ru_maxrss of the children is that size's alone
        if len(args.gigabytes) > 1:
            subprocess.run([sys.executable, __file__, "--gigabytes", str(size), "--no-header"]
                           + (["--folder", args.folder] if args.folder else []), check=False)
            continue
        with tempfile.TemporaryDirectory(dir=args.folder, prefix="onnx_lowrank_memory_") as folder:
            _print(measure(size, Path(folder)))


def _print(row: dict) -> None:
    print(f"{row['weights'] / 1e9:>9.2f}G {row['layers']:>6} {row['peak_rss'] / 1e9:>9.2f}G "
          f"{row['ratio']:>11.2f} {row['seconds']:>8.1f} {row['written'] / 1e9:>9.2f}G {row['exit']}"
          + (f"  {row['stderr']}" if row["exit"] else ""), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
