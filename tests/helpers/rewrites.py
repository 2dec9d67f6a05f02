"""Rewrites the tests check outputs against: every layer of a model factorized at full rank, through the real passes."""

from __future__ import annotations

import numpy as np
import onnx

from onnx_lowrank.math.svd import Factors, factorize, max_rank
from onnx_lowrank.passes import factorize_layers
from onnx_lowrank.stages.discover import discover


def full_rank(model: onnx.ModelProto, k: int = 1, shift: bool = False, *,
              k_where_it_divides: bool = False) -> onnx.ModelProto:
    """Every discovered layer (there must be one) rewritten at full rank with `k` groups (with k_where_it_divides,
    1 group for a layer whose input channels `k` does not divide), and a zero bias correction when `shift`, so the
    correction's nodes are written; the result must pass the full checker."""
    rewrites = []
    for layer in discover(model).layers:
        groups = 1 if k_where_it_divides and layer.in_channels % k else k
        factors = factorize(layer.read_matrix(), groups, max_rank(*layer.matrix_shape, groups))
        if shift:
            factors = Factors(factors.k, factors.rank, factors.encoder, factors.decoder,
                              np.zeros(layer.out_channels))
        rewrites.append((layer, factors))
    rewritten, count = factorize_layers(model, rewrites)
    assert count == len(rewrites) > 0
    onnx.checker.check_model(rewritten, full_check=True)
    return rewritten
