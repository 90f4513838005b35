"""Confidence intervals for differences between arms over seeds.

Every comparison the reports make is paired: for one seed, two arms see the same batches in the same order and
start from the same initialisation of the latents they share (docs/design.md, "Controls"), so the difference is
taken within a seed and the seeds are the units resampled. The interval is the percentile bootstrap of the mean of
those per-seed differences, drawn from a fixed generator, so a report rendered twice prints the same numbers.

With few seeds the percentile bootstrap is coarse (with 3 seeds the resampled means take at most 10 values) and
slightly too narrow; it is what a reader can recompute, and the decision it supports is written in words.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0
EXCLUDES = "the interval excludes 0"
INCLUDES = "it does not"
ONE_SEED = "one seed: no interval"
NO_READING = "no reading"  # no finite value, e.g. curves that do not overlap in L0


@dataclass(frozen=True)
class Interval:
    """The mean of `n` per-seed values and its bootstrap interval [low, high] (NaN with fewer than 2 values)."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE

    @property
    def excludes_zero(self) -> bool | None:
        """Whether 0 lies outside the interval; None when there is no interval."""
        if self.n < 2 or not (math.isfinite(self.low) and math.isfinite(self.high)):
            return None
        return self.low > 0 or self.high < 0

    @property
    def decision(self) -> str:
        """The decision in words: 'the interval excludes 0', 'it does not', or why there is no interval."""
        if self.n == 0:
            return NO_READING
        return {True: EXCLUDES, False: INCLUDES, None: ONE_SEED}[self.excludes_zero]

    def text(self, fmt: str = "{:+.4f}") -> str:
        """'+0.0040 [+0.0010, +0.0070]'; the mean alone without an interval; '' without a value."""
        if self.n == 0 or not math.isfinite(self.mean):
            return ""
        if self.excludes_zero is None:
            return fmt.format(self.mean)
        return f"{fmt.format(self.mean)} [{fmt.format(self.low)}, {fmt.format(self.high)}]"


def bootstrap_ci(values: Sequence[float] | np.ndarray, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                 seed: int = SEED) -> Interval:
    """The percentile bootstrap interval of the mean of `values` (one per seed; NaN values are dropped):
    `resamples` draws of len(values) values with replacement from `numpy.random.default_rng(seed)`."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, confidence)
    mean = float(v.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, confidence)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    # a constant sample has an interval of width 0; keep it exact rather than off by rounding in the means
    if np.all(v == v[0]):
        low = high = float(v[0])
    return Interval(mean, float(low), float(high), n, confidence)


def paired_bootstrap_ci(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                        confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """The interval of mean(a - b) where a[i] and b[i] come from the same seed: the seeds are resampled, each
    keeping its pair (a pair with a NaN is dropped)."""
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired values need equal lengths, not {x.size} and {y.size}")
    return bootstrap_ci(x - y, confidence, resamples, seed)
