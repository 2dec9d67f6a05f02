"""Frontier plots (matplotlib is optional: `pip install onnx-lowrank[plot]`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from onnx_lowrank.errors import InvalidOptionError
from onnx_lowrank.sweep import SweepPoint

__all__ = ["plot_frontier"]

_STYLE = {"alds": ("tab:red", "o"), "uniform": ("tab:blue", "s"), "energy": ("tab:green", "^"),
          "auto": ("tab:purple", "D")}


def plot_frontier(
    points: Sequence[SweepPoint],
    path: str | Path,
    title: str,
    panels: Sequence[tuple[str, str]] = (("output_error", "output relative L2 error (lower is better)"),
                                         ("latency_ratio", "latency / original (lower is faster)")),
    x: tuple[str, str] = ("params_ratio", "fraction of params kept"),
) -> Path:
    """One panel per (field, label) in `panels` against `x`, one line per allocator. Fields may name task metrics."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidOptionError("--plot needs matplotlib: pip install 'onnx-lowrank[plot]'.") from None
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for axis, (name, label) in zip(axes[0], panels):
        for allocator in dict.fromkeys(p.allocator for p in points):
            series = sorted((_value(p, x[0]), _value(p, name)) for p in points if p.allocator == allocator)
            series = [(a, b) for a, b in series if a is not None and b is not None]
            if not series:
                continue
            color, marker = _STYLE.get(_family(allocator), (None, "x"))
            marker = {"flops:": "v", "latency:": "P"}.get(allocator.split()[0], marker)
            style = "--" if "weight" in allocator else ":" if "allow-slower" in allocator else "-"
            axis.plot(*zip(*series), marker=marker, color=color, linestyle=style, label=allocator)
        if name in ("latency_ratio", "predicted_latency_ratio"):
            axis.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
        axis.set_xlabel(x[1])
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:  # some series had values
            axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    target = Path(path)
    figure.savefig(target, dpi=110)
    plt.close(figure)
    return target


def _family(label: str) -> str:
    """The allocator in a label such as "alds", "auto:alds", "data alds+refit" or "flops: data auto"."""
    words = re.split(r"[\s:+]+", label)
    return next((w for w in reversed(words) if w in _STYLE), "")


def _value(point: SweepPoint, name: str):
    if hasattr(point, name):
        return getattr(point, name)
    return point.task.get(name)
