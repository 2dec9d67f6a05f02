"""What every model-building script here shares: deterministic torch, the atomic write into the cache folder, and
the command line (``--dest``, ``--epochs``; prints ``name<TAB>path``).

A build script defines ``train(epochs) -> (model, held-out accuracy)`` and ``export(model, path)``, and calls
``main(NAME, __doc__, train, export, default_epochs)``. It needs only numpy at import, so the benchmark workloads can
load a build script by file path for its data generator and split without torch installed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["deterministic_torch", "fit", "generated", "train_generated", "accuracy", "export_torchscript", "store", "build", "main"]


def deterministic_torch(seed: int):
    """torch, seeded, single-threaded and with deterministic algorithms: one torch version gives one set of weights."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    return torch


def fit(torch, model, x, y, epochs: int, batch: int, lr: float, max_lr: float, weight_decay: float, seed: int):
    """Train `model` on (x, y) by cross-entropy: AdamW, a one-cycle schedule, batches of a seeded permutation."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    count = len(y)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=epochs * -(-count // batch))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for rows in torch.randperm(count, generator=generator).split(batch):
            loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model


def accuracy(torch, model, x, y) -> float:
    """Top-1 accuracy of `model` (in eval mode) on inputs `x` against the classes `y`."""
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def generated(sample: Callable, split: str, start: int, count: int) -> tuple:
    """Samples start .. start + count - 1 of a generated `split` (`sample(split, index)` -> (ids, class)): token
    ids (count, length) int64 and classes (count,) int64."""
    import numpy as np

    pairs = [sample(split, i) for i in range(start, start + count)]
    return (np.stack([p[0] for p in pairs]).astype(np.int64), np.array([p[1] for p in pairs], dtype=np.int64))


def train_generated(make: Callable, samples: Callable, seed: int, count: int, held_out: int, epochs: int,
                    **options) -> tuple[object, float]:
    """Train `make(torch)` on the first `count` samples of "train" (`samples(split, start, count)`), batches of
    64, `options` for `fit`; returns the model and its accuracy on the first `held_out` samples of "held-out"."""
    torch = deterministic_torch(seed)
    tokens, labels = (torch.from_numpy(a) for a in samples("train", 0, count))
    model = fit(torch, make(torch), tokens, labels, epochs, batch=64, seed=seed, **options)
    held_tokens, held_labels = (torch.from_numpy(a) for a in samples("held-out", 0, held_out))
    return model, accuracy(torch, model, held_tokens, held_labels)


def export_torchscript(model, example, path: Path, input_name: str) -> None:
    """torch.onnx.export with the TorchScript exporter at opset 17, the batch dimension dynamic, output 'logits'."""
    import torch

    with torch.no_grad():
        torch.onnx.export(model, (example,), str(path), input_names=[input_name], output_names=["logits"],
                          dynamic_axes={input_name: {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)


def store(name: str, write: Callable[[Path], None], dest: str | os.PathLike | None = None) -> Path:
    """Call `write(temporary path)` in the cache folder and rename the file to <folder>/<name>.onnx atomically."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fetch import models_dir

    folder = models_dir(dest)
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".onnx", dir=folder)
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o644)
        os.replace(temporary, folder / f"{name}.onnx")
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return folder / f"{name}.onnx"


def build(name: str, train: Callable, export: Callable, dest=None, epochs: int | None = None) -> Path:
    """Train, report the held-out accuracy on stderr, export and store atomically; returns the model's path."""
    model, accuracy = train() if epochs is None else train(epochs)
    print(f"{name}: held-out accuracy {accuracy:.4f}", file=sys.stderr)
    return store(name, lambda path: export(model, path), dest)


def main(name: str, doc: str, train: Callable, export: Callable, epochs: int, argv: list[str] | None = None,
         needs: str = "torch scikit-learn onnx") -> int:
    """The command line of a build script: ``[--dest DIR] [--epochs N]``; prints ``name<TAB>path``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--dest", help="cache folder (default: $ONNX_LOWRANK_MODELS or ~/.cache/onnx-lowrank/models)")
    parser.add_argument("--epochs", type=int, default=epochs)
    args = parser.parse_args(argv)
    try:
        for module in needs.replace("scikit-learn", "sklearn").split():
            __import__(module)
    except ImportError as error:
        print(f"error: building {name} needs {error.name}: pip install {needs}", file=sys.stderr)
        return 2
    print(f"{name}\t{build(name, train, export, args.dest, args.epochs)}")
    return 0
