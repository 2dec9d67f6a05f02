"""Byte-identity check for a redesign: fixed fuzz and benchmark models go through the public `onnx_lowrank.compress`
with fixed options, one line per case (`case<TAB>sha256 of the written model`, or `case<TAB>ERROR Type: message`),
so two trees can be shown to write the same bytes. Run it once per tree (first on PYTHONPATH) and diff the files:
PYTHONPATH=/tmp/ref python benchmarks/identity.py [--quick] --out before.tsv; same with PYTHONPATH=. --out after.tsv
"""

from __future__ import annotations

import argparse
import hashlib
import os
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

import onnx_lowrank

TREE = Path(onnx_lowrank.__file__).resolve().parent.parent  # the checkout whose code runs
MODELS = Path.home() / ".cache" / "onnx-lowrank" / "models"
REAL_MODELS = ("yolov8n-320", "ppocrv4-det", "ppocrv4-rec", "ppocr-cls")
SAMPLES = Path("/tmp/identity/samples")  # benchmark calibration samples, made once and shared by every run
CALIBRATION_COUNT = 4
CORPUS_SEED = 20261202
# Nothing may depend on timing: layers are not timed, nothing is cached, nothing is verified (which only reads).
COMMON = {"allow_slower": True, "latency_cache": False, "verify": False}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_tree() -> None:
    """Say which code runs, and stop if any onnx_lowrank module was loaded from another tree."""
    import onnx_lowrank.api  # noqa: F401 - loads the stages

    passes = sys.modules.get("onnx_lowrank.passes")  # a subpackage that an editable install may map elsewhere
    where = f" (passes: {passes.__file__})" if passes is not None else ""
    log(f"onnx_lowrank: {onnx_lowrank.__file__}{where}; tree {TREE}")
    stray = sorted(f"{name}: {module.__file__}" for name, module in list(sys.modules.items())
                   if name.split(".")[0] == "onnx_lowrank" and getattr(module, "__file__", None)
                   and not Path(module.__file__).resolve().is_relative_to(TREE))
    if stray:
        sys.exit("identity: modules from outside " + str(TREE) + ":\n" + "\n".join(stray))


OUTCOMES = {"rewritten": 0, "unchanged": 0, "refused": 0}  # what the cases did, for the summary on stderr


LINES: list[str] = []  # every result line, for --out


def emit(line: str) -> None:
    print(line, flush=True)
    LINES.append(line)


def run_case(name: str, make: Callable[[], tuple[onnx.ModelProto, object]], original: str) -> None:
    """One compress call: its line `name<TAB>sha256` (or `name<TAB>ERROR Type: first line`)."""
    start = time.perf_counter()
    try:
        model, _report = make()
        result = digest(model.SerializeToString())
        OUTCOMES["unchanged" if result == original else "rewritten"] += 1
    except Exception as error:  # noqa: BLE001 - a refusal (or a crash) is a result to compare as well
        first = (str(error).strip().splitlines() or [""])[0]
        result = f"ERROR {type(error).__name__}: {first}"
        OUTCOMES["refused"] += 1
    line = f"{name}\t{result}"
    emit(line)
    log(f"  {line[:110]}  ({time.perf_counter() - start:.1f} s)")


# ---------------------------------------------------------------------------------------------------- fuzz corpus


def load_fuzz_graphs():
    """The fuzz strategies by path (tests/ is not a package): $IDENTITY_STRATEGIES if set (give both trees the same
    file, so both compress the same corpus), else the running tree's tests/helpers/strategies.py or, in trees before
    the test helpers moved, tests/fuzz_graphs.py."""
    candidates = [TREE / "tests" / "helpers" / "strategies.py", TREE / "tests" / "fuzz_graphs.py"]
    path = Path(os.environ.get("IDENTITY_STRATEGIES") or next(p for p in candidates if p.exists()))
    sys.path.insert(0, str(path.parent.parent if path.parent.name == "helpers" else path.parent))
    spec = importlib.util.spec_from_file_location("fuzz_graphs", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    log(f"fuzz strategies: {path}")
    return module


def fuzz_corpus(count: int) -> list:
    """The first `count` distinct FuzzModels that hypothesis draws, `count` examples per seed, from seed CORPUS_SEED,
    then CORPUS_SEED + 1, ... (the examples depend on `count`: hypothesis sizes them by how many it is asked for)."""
    from hypothesis import HealthCheck, Phase, given, seed, settings

    fuzz_graphs = load_fuzz_graphs()
    stored = Path(os.environ["IDENTITY_CORPUS"]) if os.environ.get("IDENTITY_CORPUS") else None
    if stored is not None and stored.exists():  # the corpus a first run drew: hypothesis may draw another one later
        import pickle

        with stored.open("rb") as f:
            return pickle.load(f)[:count]
    corpus, seen = [], set()
    for offset in range(10):
        drawn = []

        @seed(CORPUS_SEED + offset)
        @settings(max_examples=count, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), print_blob=False)
        @given(fuzz_graphs.fuzz_models())
        def collect(fm):
            drawn.append(fm)

        collect()
        for fm in drawn:
            key = digest(fm.model.SerializeToString())
            if key not in seen and len(corpus) < count:
                seen.add(key)
                corpus.append(fm)
        if len(corpus) == count:
            break
    if stored is not None:
        import pickle

        stored.parent.mkdir(parents=True, exist_ok=True)
        with stored.open("wb") as f:
            pickle.dump(corpus, f)
    return corpus


def write_fuzz_samples(fm, index: int, folder: Path) -> None:
    """CALIBRATION_COUNT seeded uniform(-1, 1) inputs at the model's concrete shape, one .npz each (as test_fuzz's
    feeds_for makes them)."""
    folder.mkdir(parents=True)
    for sample in range(CALIBRATION_COUNT):
        rng = np.random.default_rng([CORPUS_SEED, index, sample])
        array = rng.uniform(-1, 1, fm.input_shape).astype(fm.input_dtype)
        np.savez(folder / f"sample_{sample:04d}.npz", **{fm.input_name: array})


def fuzz_cases(count: int) -> int:
    start = time.perf_counter()
    corpus = fuzz_corpus(count)
    log(f"fuzz corpus: {len(corpus)} models drawn in {time.perf_counter() - start:.1f} s")
    cases = 0
    with tempfile.TemporaryDirectory(prefix="identity-fuzz-") as scratch:
        for index, fm in enumerate(corpus):
            name = f"fuzz/{index:02d}"
            log(f"{name}: {fm.description[:100]}")
            original = digest(fm.model.SerializeToString())
            emit(f"{name}/input\t{original}")
            samples = Path(scratch) / f"{index:02d}"
            write_fuzz_samples(fm, index, samples)
            model = fm.model
            variants = {
                "weight-p0.5": lambda: onnx_lowrank.compress(model, 0.5, weight_only=True, **COMMON),
                "calib-p0.6": lambda: onnx_lowrank.compress(model, 0.6, calibration=str(samples), **COMMON),
                "calib-p0.6-lowrank-alds": lambda: onnx_lowrank.compress(
                    model, 0.6, calibration=str(samples), method="lowrank", allocator="alds", **COMMON),
                "calib-p0.6-shrink0.1-groups2": lambda: onnx_lowrank.compress(
                    model, 0.6, calibration=str(samples), shrinkage=0.1, max_groups=2, **COMMON),
            }
            for label, make in variants.items():
                run_case(f"{name}/{label}", make, original)
                cases += 1
    return cases


# ---------------------------------------------------------------------------------------------- benchmark models


def benchmark_samples(model: str) -> Path:
    """SAMPLES/<model>/: the first CALIBRATION_COUNT samples of the workload's calibration split, written by
    benchmarks/samples.py of the running tree the first time and reused from then on (same inputs for every tree)."""
    folder = SAMPLES / model
    if len(list(folder.glob("sample_*.npz"))) == CALIBRATION_COUNT:
        return folder
    with tempfile.TemporaryDirectory(prefix="identity-samples-") as scratch:
        subprocess.run([sys.executable, str(TREE / "benchmarks" / "samples.py"), model, "calibration", scratch],
                       check=True, stdout=sys.stderr)
        files = sorted(Path(scratch).glob("sample_*.npz"))[:CALIBRATION_COUNT]
        if len(files) != CALIBRATION_COUNT:
            raise RuntimeError(f"{model}: samples.py wrote {len(files)} calibration samples")
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for file in files:
            shutil.copyfile(file, folder / file.name)
    return folder


def folder_digest(folder: Path) -> str:
    hashes = hashlib.sha256()
    for file in sorted(folder.glob("sample_*.npz")):
        hashes.update(file.name.encode() + b"\0" + digest(file.read_bytes()).encode() + b"\n")
    return hashes.hexdigest()


def benchmark_cases() -> int:
    cases = 0
    for name in REAL_MODELS:
        path = MODELS / f"{name}.onnx"
        if not path.is_file():
            emit(f"{name}\tabsent")
            log(f"{name}: absent ({path})")
            cases += 1
            continue
        log(f"{name}: {path}")
        original = digest(onnx.load(str(path)).SerializeToString())  # as compress would write it unchanged
        emit(f"{name}/input\t{digest(path.read_bytes())}")
        samples = benchmark_samples(name)
        emit(f"{name}/samples\t{folder_digest(samples)}")
        # the shape the benchmark runs the model at: its calibration samples' (all of one shape per model)
        with np.load(sorted(samples.glob("sample_*.npz"))[0]) as first:
            shapes = {key: tuple(first[key].shape) for key in first.files}
        log(f"  input shapes {shapes}")
        variants = {
            "weight-p0.5": lambda: onnx_lowrank.compress(str(path), 0.5, weight_only=True, **COMMON),
            "weight-flops0.7": lambda: onnx_lowrank.compress(str(path), 0.7, metric="flops", weight_only=True,
                                                             input_shapes=shapes, **COMMON),
            "calib-p0.8": lambda: onnx_lowrank.compress(str(path), 0.8, calibration=str(samples), **COMMON),
        }
        for label, make in variants.items():
            run_case(f"{name}/{label}", make, original)
            cases += 1
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the fuzz corpus only")
    parser.add_argument("--out", type=Path, help="also write the lines to this file")
    parser.add_argument("--examples", type=int, default=60,
                        help="fuzz models to draw (default 60; another count draws another corpus)")
    args = parser.parse_args(argv)
    check_tree()
    start = time.perf_counter()
    cases = fuzz_cases(args.examples)
    if not args.quick:
        cases += benchmark_cases()
    check_tree()  # nothing imported on the way came from elsewhere either
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(line + "\n" for line in LINES))
    log(", ".join(f"{count} {what}" for what, count in OUTCOMES.items()) + " (the /input and /samples lines are "
        "the inputs' hashes, not cases)")
    log(f"{cases} cases in {time.perf_counter() - start:.0f} s" + (f"; written to {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
