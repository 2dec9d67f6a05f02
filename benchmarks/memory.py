"""Peak memory of `onnx-lowrank compress` on large generated models, against the size of their weights.

    python benchmarks/memory.py --markdown benchmarks/MEMORY.md   # every case below (~10 minutes)
    python benchmarks/memory.py chain:1.0 inline:1.0                # some of them

Each model is a chain of MatMul layers alternating (1, 256) @ (256, 65536) and (1, 65536) @ (65536, 256), 64 MiB
of float32 weights per layer, so a 1 GB model has 15 layers and a 2.3 GB one 34: the protobuf of the larger one is
over the 2 GiB limit of one message, so it can only exist with its weights as external data. Wide-and-short layers
keep the SVDs cheap (a 256 x 65536 SVD takes about a second), so the run measures the file handling, not the
linear algebra. The model is written one layer at a time (headers built by hand, bytes appended to the data file),
so generating it never holds more than one weight either. The `inline` case rewrites the same model with its
weights inside the .onnx file (by onnx itself, in the measuring process, not the measured one), which is how
exporters write models below 2 GB.

The `table` case is the other kind of large model: one small MatMul to compress next to a GB-sized embedding
table read by a Gather, stored as a sparse file (zeros cost no disk and no time to generate). It exercises the
> 2 GiB file paths (lazy load, check by path, external data written automatically, the table streamed from the
input's data file into the output's) without the linear algebra that a compressible 2 GB model needs.

`onnx-lowrank compress MODEL OUT --budget 0.5 --allow-slower --quiet` (with `--metric flops` for the table model,
whose parameters are nearly all in the table) runs in a child process, as a user would
type it, and its peak resident set size (ru_maxrss of that child alone, from wait4) is reported next to the weights'
size. The measuring process stays small (the inline model is made by a process of its own): Linux carries the
peak RSS of the process a child was started from into the child's own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
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


def inline_weights(path: Path) -> None:
    """Rewrite the model in `path` with every weight inside the .onnx file, and remove its data file."""
    model = onnx.load(str(path))
    onnx.save(model, str(path))
    del model
    (path.parent / (path.name + ".data")).unlink()


def measure(gigabytes: float, folder: Path, untouched: bool = False, inline: bool = False) -> dict:
    layers = 1 if untouched else max(2, round(gigabytes * 1e9 / (LAYER[0] * LAYER[1] * 4)))
    model, weight_bytes = (write_embedding_model(folder, gigabytes) if untouched else write_model(folder, layers))
    if inline:  # in a process of its own: a child started from a big process would inherit its peak RSS
        subprocess.run([sys.executable, __file__, "--inline-weights", str(model)], check=True)
    output = folder / "compressed.onnx"
    command = [sys.executable, "-m", "onnx_lowrank", "compress", str(model), str(output), "--budget", "0.5",
               "--allow-slower", "--quiet"]
    if untouched:  # the table is most of the parameters, and none of the FLOPs
        command += ["--metric", "flops"]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, text=True)
        _, status, usage = os.wait4(child.pid, 0)  # the resources of this child alone
        child.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        stderr = errors.read()
    seconds = time.perf_counter() - start
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    written = sum(p.stat().st_size for p in folder.glob("compressed.onnx*"))
    return {"layers": layers, "weights": weight_bytes, "peak_rss": peak, "ratio": peak / weight_bytes,
            "seconds": seconds, "exit": child.returncode, "stderr": stderr.strip()[-300:], "written": written}


CASES = ("chain:1.0", "chain:2.3", "inline:1.0", "table:2.3")
"""What a plain run measures: MatMul chains of ~1 GB and ~2.3 GB with external data, the ~1 GB chain with its
weights inside the .onnx file, and a 2.3 GB untouched table."""

_KINDS = {"chain": "MatMul chain, external data", "inline": "MatMul chain, weights inside the .onnx",
          "table": "untouched table + one MatMul"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", default=list(CASES), metavar="KIND:GB",
                        help=f"kind (chain, inline or table) and size in GB (default: {' '.join(CASES)})")
    parser.add_argument("--folder", default=None, help="where to write the models (default: a temporary folder)")
    parser.add_argument("--markdown", default=None, metavar="FILE", help="also write the table to FILE")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inline-weights", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inline_weights:
        inline_weights(Path(args.inline_weights))
        return
    if args.one:  # a child: one case, its row as JSON on stdout
        kind, size = args.cases[0].split(":")
        with tempfile.TemporaryDirectory(dir=args.folder, prefix="onnx_lowrank_memory_") as folder:
            row = measure(float(size), Path(folder), untouched=kind == "table", inline=kind == "inline")
        print(json.dumps({**row, "case": args.cases[0]}))
        return
    started = time.perf_counter()
    lines = [_HEADER, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    print(_HEADER, flush=True)
    for case in args.cases:
        kind, _, size = case.partition(":")
        if kind not in _KINDS or not size:
            parser.error(f"unknown case {case!r}: give chain:GB, inline:GB or table:GB")
        # every case in its own process, so ru_maxrss of the children is that case's alone
        child = subprocess.run([sys.executable, __file__, case, "--one"]
                               + (["--folder", args.folder] if args.folder else []),
                               capture_output=True, text=True, check=False)
        if child.returncode:
            print(f"| {case} | failed: {child.stderr.strip()[-300:]} |", flush=True)
            continue
        line = _line(json.loads(child.stdout.strip().splitlines()[-1]))
        lines.append(line)
        print(line, flush=True)
    if args.markdown:
        Path(args.markdown).write_text(
            "# Peak memory on large models\n\n"
            f"Produced by `python benchmarks/memory.py {' '.join(args.cases)}` on {time.strftime('%Y-%m-%d')} in "
            f"{(time.perf_counter() - started) / 60:.1f} minutes ({platform.machine()}, {os.cpu_count()} cores; "
            f"onnxruntime {_version('onnxruntime')}, onnx {_version('onnx')}).\n\n"
            "Each row is one `onnx-lowrank compress MODEL OUT --budget 0.5 --allow-slower --quiet` (with "
            "`--metric flops` for the table) in a child process; `peak RSS` is that child's ru_maxrss, everything "
            "included: the interpreter and libraries (about 0.1 GB), onnxruntime sessions, mapped weight files.\n\n"
            + "\n".join(lines) + "\n\n" + _WHERE)


_WHERE = """\
Where the peak comes from: weights are read one layer at a time (a layer or two in flight), factors are written into
the new model as they are computed, and onnxruntime maps the weight files. The peak is reached while the two
models are verified and timed against each other: the compressed model itself (half the weights at budget 0.5),
the original's onnxruntime session (the weights once) and the compressed one's (half again) are all alive, plus
the fixed 0.1 GB. The table model, of which nothing but one small layer changes, peaks at its two sessions.
"""


_HEADER = "| model | weights | layers | peak RSS | RSS / weights | seconds | output | exit |"


def _line(row: dict) -> str:
    kind, _, _ = row["case"].partition(":")
    return (f"| {_KINDS[kind]} | {row['weights'] / 1e9:.2f} GB | {row['layers']} | {row['peak_rss'] / 1e9:.2f} GB | "
            f"{row['ratio']:.2f}x | {row['seconds']:.0f} | {row['written'] / 1e9:.2f} GB | {row['exit']}"
            + (f" {row['stderr']}" if row["exit"] else "") + " |")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
