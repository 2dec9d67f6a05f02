"""Run independent per-layer work (decompositions, factors) on every core, each task with one BLAS thread.

Many small SVDs and eigendecompositions: a second BLAS thread inside one barely helps them, and when onnxruntime
or another process holds the other core it makes them many times slower (measured: 1.3 s with one thread, 14-59 s
with two). LAPACK releases the GIL, so layers decomposed on separate Python threads, one BLAS thread each, use the
cores without that contention. Results come back in input order, so the output does not depend on scheduling, and
only a few are computed ahead of the one being used: a layer's factors can be as large as its weight, and the
factors of every layer at once would hold a second copy of the model.
"""

from __future__ import annotations

import os
from collections import deque
from itertools import islice
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from threadpoolctl import threadpool_limits

__all__ = ["single_threaded_blas", "map_in_order", "map_all"]

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def map_in_order(function: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[R]:
    """`function` over `items` on `workers` threads (default: one per core), yielding results in input order; at
    most `workers` results wait, finished or running, while the caller holds the last one yielded."""
    items = list(items)
    workers = min(workers or os.cpu_count() or 1, max(len(items), 1))
    if workers <= 1:
        yield from map(function, items)
        return
    remaining = iter(items)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque(pool.submit(function, item) for item in islice(remaining, workers))
        while pending:
            result = pending.popleft().result()
            for item in remaining:  # one more in flight before the caller gets this one
                pending.append(pool.submit(function, item))
                break
            yield result
            del result


def map_all(function: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> tuple[R, ...]:
    """Every result of `function` over `items`, in input order, for a caller that keeps them all anyway: every item
    is queued at once, so one slow item does not leave a core idle (measured on YOLOv8n's analysis: with only one
    item ahead, two threads were 1.15x one)."""
    items = list(items)
    workers = min(workers or os.cpu_count() or 1, max(len(items), 1))
    if workers <= 1:
        return tuple(map(function, items))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return tuple(pool.map(function, items))
