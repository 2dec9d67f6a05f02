"""A scripted `stages.timing.Timer`: the time of a model is a function of the model alone, so whatever the guard,
the latency budget or the judge decide from timings is determined, on any machine.

Pass it as `timer=` to `onnx_lowrank.analyze`, `compress` or `apply`. It records every call, so a test can also
assert what was (or was not) timed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx

from onnx_lowrank.stages.timing import Timings

PER_NODE_MS = 0.1
PER_WEIGHT_MS = 1e-4


def weights_and_nodes(model: onnx.ModelProto, per_node: float = PER_NODE_MS,
                      per_weight: float = PER_WEIGHT_MS) -> float:
    """Milliseconds: a fixed cost per node plus one per weight element (initializers and Constant nodes). A
    factorized layer pays one node more and saves weights, so low ranks are faster and ranks near the largest
    candidate slower, as on a real CPU."""
    weights = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    weights += sum(int(np.prod(a.t.dims)) for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
                   if a.name == "value")
    return per_node * len(model.graph.node) + per_weight * weights


class ScriptedTimer:
    """A Timer returning `ms(model)` for every round of every model; `calls` holds the models of each call.

    `jitter` > 0 scripts noise: round i of the j-th model of a call takes ms(model) x (1 + jitter (-1)^(i+j)), so
    two models of one call differ by less than the noise unless their times differ by more than the jitter does.
    `session_jitter` > 0 scripts the difference between sessions: in the c-th call every round of the j-th model
    is multiplied by (1 + session_jitter (-1)^(c+j)), a difference no round of one call can show."""

    def __init__(self, ms: Callable[[onnx.ModelProto], float] = weights_and_nodes, jitter: float = 0.0,
                 session_jitter: float = 0.0):
        self.ms = ms
        self.jitter = jitter
        self.session_jitter = session_jitter
        self.calls: list[list[onnx.ModelProto]] = []

    def time(self, models: Sequence[onnx.ModelProto], feeds, rounds: int, warmup: int = 1,
             block_s: float = 0.0) -> Timings:
        assert len(feeds) == len(models) and all(len(own) >= 1 for own in feeds)
        call = len(self.calls)
        self.calls.append(list(models))
        medians = tuple(float(self.ms(model)) * (1 + self.session_jitter * (-1) ** (call + j))
                        for j, model in enumerate(models))
        samples = tuple(tuple(ms * (1 + self.jitter * (-1) ** (i + j)) for i in range(rounds))
                        for j, ms in enumerate(medians))
        return Timings(medians, samples)

    @property
    def models_timed(self) -> int:
        return sum(len(models) for models in self.calls)
