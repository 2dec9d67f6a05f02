"""Error compensation: refit each decoder (and bias) on the inputs the compressed network really feeds it.

A layer's factors are chosen on the original network's activations, but once upstream layers are compressed its
input drifts. For every factorized layer, with its encoder E fixed, the decoder D and a bias correction c are refit by
least squares so that D (E x~) + c matches the ORIGINAL layer's output W x on the same positions, where x~ is the
layer's input in the compressed network and x in the original (Zhang et al. 2015, "asymmetric" reconstruction):

    [D, c] = argmin  sum ||W x - D z - c||^2 + ridge * tr(C_zz) / dim(z) * ||D||^2,   z = E x~

Layers are refit in topological order, in a few stages: each stage's inputs come from a network whose earlier
stages are already refit. The statistics are (kr x kr) and (kr x d) sums, streamed over the samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from onnx_lowrank.graph import runtime
from onnx_lowrank.stages.calibrate import DEFAULT_MAX_ROWS, sample_seed
from onnx_lowrank.ops.layer import Layer
from onnx_lowrank.graph.inputs import Samples
from onnx_lowrank.passes import factorize_layers
from onnx_lowrank.math.patches import input_rows
from onnx_lowrank.math.svd import Factors

__all__ = ["DEFAULT_RIDGE", "DEFAULT_STAGES", "refit_factors"]

DEFAULT_RIDGE = 1e-3
DEFAULT_STAGES = 4


def refit_factors(
    model: onnx.ModelProto,
    rewrites: Sequence[tuple[Layer, Factors]],
    samples: Samples,
    *,
    stages: int = DEFAULT_STAGES,
    ridge: float = DEFAULT_RIDGE,
    max_rows: int = DEFAULT_MAX_ROWS,
    base: onnx.ModelProto | None = None,
) -> list[tuple[Layer, Factors]]:
    """`rewrites` (in model order) with every decoder and bias correction refit; encoders are kept. The factors go
    into `base` (default `model`): the model with its narrowed layers already cut, so that the decoders also make up
    for what narrowing moved (`model` stays the reference)."""
    current = list(rewrites)
    graph_inputs = {value.name for value in model.graph.input}
    names = [n for n in dict.fromkeys(view.input_name for layer, _ in current for view in layer.views())
             if n not in graph_inputs]
    original = runtime.session(runtime.with_outputs(model, names))
    bounds = np.linspace(0, len(current), min(stages, len(current)) + 1).round().astype(int)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        compressed = factorize_layers(model if base is None else base, current)[0]
        session = runtime.session(runtime.with_outputs(compressed, names))
        sums = [_Sums(layer, factors) for layer, factors in current[start:stop]]
        for index, feed in enumerate(samples):
            before, after = runtime.run(original, feed), runtime.run(session, feed)
            for item in sums:
                for view in item.layer.views():  # a shared weight serves every node reading it
                    name = view.input_name
                    x = feed[name] if name in graph_inputs else before[name]
                    x_tilde = feed[name] if name in graph_inputs else after[name]
                    seed = sample_seed(name, index)
                    rows, rows_tilde = (input_rows(v, view.geometry, max_rows, seed) for v in (x, x_tilde))
                    item.add(rows, rows_tilde)
        for offset, item in enumerate(sums):
            current[start + offset] = (item.layer, item.solve(ridge))
    return current


class _Sums:
    """Running sums of z = E x~ and of the target W x for one layer."""

    def __init__(self, layer: Layer, factors: Factors) -> None:
        self.layer, self.factors = layer, factors
        self.weight_t = layer.read_matrix().T  # this stage's layers only: read once, dropped with the sums
        width = factors.k * factors.rank
        self.zz = np.zeros((width, width))
        self.zy = np.zeros((width, layer.out_channels))
        self.z = np.zeros(width)
        self.y = np.zeros(layer.out_channels)
        self.count = 0

    def add(self, x: np.ndarray, x_tilde: np.ndarray) -> None:
        k = self.factors.k
        groups = np.split(np.asarray(x_tilde, dtype=np.float64), k, axis=1)
        z = np.concatenate([g @ e.T for g, e in zip(groups, self.factors.encoder)], axis=1)
        y = np.asarray(x, dtype=np.float64) @ self.weight_t
        self.zz += z.T @ z
        self.zy += z.T @ y
        self.z += z.sum(axis=0)
        self.y += y.sum(axis=0)
        self.count += z.shape[0]

    def solve(self, ridge: float) -> Factors:
        n = max(self.count, 1)
        mz, my = self.z / n, self.y / n
        czz = self.zz / n - np.outer(mz, mz)
        czy = self.zy / n - np.outer(mz, my)
        penalty = ridge * max(float(np.trace(czz)), 1e-30) / czz.shape[0]
        decoder_t = np.linalg.solve(czz + penalty * np.eye(czz.shape[0]), czy)  # (kr, out)
        shift = my - mz @ decoder_t
        return Factors(k=self.factors.k, rank=self.factors.rank, encoder=self.factors.encoder,
                       decoder=np.ascontiguousarray(decoder_t.T), shift=shift)
