"""Deciding "faster" and "slower" from timings: what counts as beyond noise.

Two kinds of noise, two tests:

- Within one measurement (several variants timed round after round, interleaved, in one set of sessions), the
  per-round times are paired by round: the sign test (`tolerated_rounds`) asks whether one variant was slower in
  more rounds than chance allows. It is what a layer's variants are judged by.
- Between measurements: two sessions of the *same* model differ by a few percent (measured on 0.1-15 ms models,
  2 threads: the ratio of one 20-round measurement strays 1-3% with the same sessions, 3-5% with fresh ones), a
  difference every round of one measurement shares, so no within-measurement test can see it. A whole-model
  verdict therefore repeats the measurement with fresh sessions and bounds the ratio from the spread of the
  repeats (`ratio_bounds`: Student's t on the logs of the per-measurement ratios). A clear difference is called
  early (`timing.compare_models`: after `EARLY_MEASUREMENTS` at the stricter `EARLY_LEVEL`, the rest of NOISE_LEVEL
  left for the last look, so the two looks together still call a no-difference pair "faster" at most NOISE_LEVEL of
  the time: the union bound).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from scipy import special  # scipy.stats alone took 0.5 s to import, a third of the CLI's start

__all__ = ["NOISE_LEVEL", "EARLY_MEASUREMENTS", "EARLY_LEVEL", "tolerated_rounds", "slower_beyond_noise",
           "faster_beyond_noise", "ratio_bounds", "geometric_mean"]

NOISE_LEVEL = 0.05
"""The one-sided level of every test of "faster" or "slower" beyond noise."""
EARLY_MEASUREMENTS = 3
"""Independent measurements after which a whole-model comparison may stop, when its verdict is already clear."""
EARLY_LEVEL = 0.01
"""The level of that early look; the last look is made at NOISE_LEVEL - EARLY_LEVEL."""


def tolerated_rounds(rounds: int) -> int:
    """How many of `rounds` paired rounds may go the other way while a difference is still beyond noise: the
    largest c with P(Binomial(rounds, 1/2) <= c) <= NOISE_LEVEL (the sign test; -1 when no count is, i.e. too few
    rounds to show anything). Equivalently, the (c+1)-th smallest per-round ratio is a distribution-free one-sided
    95% confidence bound on the median ratio. 7 rounds: 0 (every round must agree); 20 rounds: 5."""
    total, tail = 2.0 ** rounds, 0.0
    for count in range(rounds + 1):
        tail += math.comb(rounds, count)
        if tail / total > NOISE_LEVEL:
            return count - 1
    return rounds


def _beyond_noise(against: Sequence[float], base: Sequence[float], slower: bool) -> bool:
    pairs = list(zip(against, base))
    if not pairs:
        return False
    contrary = sum(1 for a, b in pairs if (a <= b if slower else a >= b))  # ties count against the claim
    return contrary <= tolerated_rounds(len(pairs))


def slower_beyond_noise(variant: Sequence[float], base: Sequence[float]) -> bool:
    """Whether `variant` was slower than `base` beyond the rounds' noise: per-round times of one interleaved
    measurement, paired by round (the sign test of `tolerated_rounds` on the per-round ratios variant / base)."""
    return _beyond_noise(variant, base, slower=True)


def faster_beyond_noise(variant: Sequence[float], base: Sequence[float]) -> bool:
    """Whether `variant` was faster than `base` beyond the rounds' noise (as `slower_beyond_noise`)."""
    return _beyond_noise(variant, base, slower=False)


def ratio_bounds(ratios: Sequence[float], level: float = NOISE_LEVEL) -> tuple[float, float]:
    """(lower, upper) one-sided `level` bounds on a time ratio measured `len(ratios)` times independently
    (fresh sessions each time): the geometric mean of the ratios times exp(-/+ t * standard error of their logs).
    Fewer than two ratios carry no spread: both bounds are the one ratio (nan with none)."""
    logs = [math.log(r) for r in ratios if r > 0 and math.isfinite(r)]
    if not logs:
        return math.nan, math.nan
    centre = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(centre), math.exp(centre)
    t = float(special.stdtrit(len(logs) - 1, 1 - level))  # Student's t quantile
    spread = statistics.stdev(logs) / math.sqrt(len(logs)) * t
    return math.exp(centre - spread), math.exp(centre + spread)


def geometric_mean(values: Sequence[float]) -> float:
    """The geometric mean of positive values: how independent measurements' times and ratios are combined (nan when
    there are none or one is not positive)."""
    return math.exp(statistics.fmean(map(math.log, values))) if values and min(values) > 0 else float("nan")
