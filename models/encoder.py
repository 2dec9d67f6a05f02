"""Build `digits-encoder`: a small vision transformer encoder, trained here and exported by PyTorch.

No transformer encoder ships inside a PyPI wheel we may use, and the benchmark never downloads from a model hub, so
this script trains one: a ViT (a Conv cutting the image into 16 patches of 2x2 pixels, a class token, 4 pre-norm
encoder blocks of 4-head self-attention and a GELU feed-forward of width 768, model width 192) on the handwritten
digits that ship with scikit-learn (8x8 images), then exports it with `torch.onnx.export` (TorchScript exporter, opset 17: GELU becomes the
Div/Erf/Add/Mul pattern, every Linear a MatMul and an Add), as a deployment engineer's model would arrive.

Needs torch and scikit-learn, which onnx-lowrank itself does not (run it in any environment that has them):

    pip install torch scikit-learn onnx
    python models/encoder.py                 # writes <cache>/digits-encoder.onnx, prints name<TAB>path
    python models/encoder.py --dest DIR

The digits are split by a fixed permutation (`split`): the first 1197 train the model; the calibration and
evaluation splits of the benchmark workload come from the remaining 600, which the model never saw. Training is
seeded and single-threaded, so one torch version gives the same weights every time; other torch versions may round
differently, which is why `fetch.py` checks no sha256 for built models.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import building  # noqa: E402

NAME = "digits-encoder"
TRAIN = 1197  # of scikit-learn's 1797 digits; the other 600 are the benchmark's calibration and evaluation splits
SEED = 20261125
PATCH = 2  # 8x8 digits: 16 patches of 2x2 pixels, 17 tokens with the class token


def split(count: int = 1797) -> np.ndarray:
    """The fixed permutation of the digits: [:TRAIN] trains the model, the rest is held out."""
    return np.random.default_rng(SEED).permutation(count)


def images(digits: np.ndarray) -> np.ndarray:
    """scikit-learn digits (n, 64) in 0..16 -> the model's input (n, 1, 8, 8) float32 in [-1, 1]."""
    return np.ascontiguousarray(digits.reshape(-1, 1, 8, 8).astype(np.float32) / 8.0 - 1.0)


def _build(torch):
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, width: int, heads: int, hidden: int) -> None:
            super().__init__()
            self.heads = heads
            self.norm1 = nn.LayerNorm(width)
            self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
            self.project = nn.Linear(width, width)
            self.norm2 = nn.LayerNorm(width)
            self.expand = nn.Linear(width, hidden)
            self.act = nn.GELU()
            self.contract = nn.Linear(hidden, width)

        def forward(self, x):
            batch, tokens, width = x.shape
            h = self.norm1(x)

            def heads(t):
                return t.reshape(batch, tokens, self.heads, width // self.heads).transpose(1, 2)

            q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
            attention = torch.softmax(q @ k.transpose(-2, -1) / (width // self.heads) ** 0.5, dim=-1)
            x = x + self.project((attention @ v).transpose(1, 2).reshape(batch, tokens, width))
            return x + self.contract(self.act(self.expand(self.norm2(x))))

    class Encoder(nn.Module):
        def __init__(self, width: int = 192, depth: int = 4, heads: int = 4, hidden: int = 768) -> None:
            super().__init__()
            self.patches = nn.Conv2d(1, width, kernel_size=PATCH, stride=PATCH)
            self.cls = nn.Parameter(torch.zeros(1, 1, width))
            self.position = nn.Parameter(torch.randn(1, (8 // PATCH) ** 2 + 1, width) * 0.02)
            self.blocks = nn.ModuleList(Block(width, heads, hidden) for _ in range(depth))
            self.norm = nn.LayerNorm(width)
            self.head = nn.Linear(width, 10)

        def forward(self, pixels):
            x = self.patches(pixels).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.position
            for block in self.blocks:
                x = block(x)
            return self.head(self.norm(x[:, 0]))

    return Encoder()


def train(epochs: int = 30) -> tuple[object, float]:
    """The trained model and its accuracy on the 600 held-out digits."""
    from sklearn.datasets import load_digits

    torch = building.deterministic_torch(SEED)
    digits = load_digits()
    order = split(len(digits.target))
    x = torch.from_numpy(images(digits.data))
    y = torch.from_numpy(digits.target.astype(np.int64))
    train_x, train_y = x[order[:TRAIN]], y[order[:TRAIN]]
    model = building.fit(torch, _build(torch), train_x, train_y, epochs, batch=32, lr=1e-3, max_lr=2e-3,
                         weight_decay=0.05, seed=SEED)
    return model, building.accuracy(torch, model, x[order[TRAIN:]], y[order[TRAIN:]])


def export(model, path: Path) -> None:
    import torch

    building.export_torchscript(model, torch.from_numpy(images(np.zeros((1, 64)))), path, "pixels")


def build(dest: str | os.PathLike | None = None, epochs: int = 30) -> Path:
    """Train, export and store the model as <dest>/digits-encoder.onnx (atomically); returns its path."""
    return building.build(NAME, train, export, dest, epochs)


def main(argv: list[str] | None = None) -> int:
    return building.main(NAME, __doc__, train, export, 30, argv)


if __name__ == "__main__":
    sys.exit(main())
