"""A target instead of a budget: the smallest budget whose model meets it, by bisection with verification in the loop.

Budget 1.0 (nothing factorized) always meets it. Each step plans, writes and checks one budget; the interval halves
until it is narrower than `RESOLUTION`. Planning and writing are the caller's (`pipeline`), so this module only
decides which budget to try next.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import onnx

from onnx_lowrank.plan import Plan
from onnx_lowrank.stages.report import Report, SearchStep

__all__ = ["RESOLUTION", "search_budget"]

RESOLUTION = 0.01


def search_budget(
    make_plan: Callable[[float], Plan],
    written: Callable[[Plan], tuple[onnx.ModelProto, Report]],
    low: float,
    empty: Plan,
    metric: str,
    target_error: float | None,
    evaluate: Callable[[onnx.ModelProto], float] | None,
    min_score: float | None,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> tuple[Plan, tuple[SearchStep, ...], str]:
    """(the plan of the smallest passing budget, the steps tried, the goal in words). `low` is the smallest budget
    the allocator can meet; `empty` the plan of budget 1.0, which keeps the model as it is."""
    steps: list[SearchStep] = []

    def check(fraction: float) -> tuple[bool, Plan]:
        candidate = make_plan(fraction)
        compressed, report = written(candidate)
        if target_error is not None:
            value = 0.0 if report.verification is None else report.verification.worst_relative_l2
            passed = bool(value <= target_error)
        else:
            value = float(evaluate(compressed))
            passed = bool(value >= min_score)
        steps.append(SearchStep(budget=fraction, achieved=report.ratio(metric), value=value, passed=passed))
        if progress is not None:
            progress("searching", len(steps), max(len(steps), planned_steps))
        return passed, candidate

    best, high = empty, 1.0
    # one check of the smallest budget, then halvings until the interval is narrower than the resolution
    planned_steps = 1 + max(0, math.ceil(math.log2(max(high - low, RESOLUTION) / RESOLUTION)))
    passed, candidate = check(low)
    if passed:
        best, high = candidate, low
    while high - low > RESOLUTION:  # when the smallest budget passed, high == low already
        middle = round((low + high) / 2, 4)
        passed_middle, candidate = check(middle)
        if passed_middle:
            best, high = candidate, middle
        else:
            low = middle
    if progress is not None:
        progress("searching", len(steps), len(steps))  # done: the bar ends full
    measure = "relative output error" if target_error is not None else "score"
    goal = f"{measure} <= {target_error:g}" if target_error is not None else f"score >= {min_score:g}"
    return best, tuple(steps), goal
