"""Seed statistics of the sweep: Student-t confidence intervals and rankings that respect them.

A sweep cell (one format under one rule) runs several seeds. Its numbers are reported as the mean
and a 95% confidence interval of the mean, ``mean +- t * s / sqrt(n)`` with ``t`` the Student-t
quantile at ``n - 1`` degrees of freedom (the seeds are few, so the normal quantile would make
the interval too narrow). Two cells are ranked only when their intervals do not overlap; cells
whose intervals overlap are a "tie within noise".

Pure Python and NumPy: the quantile comes from the closed form of the t distribution for integer
degrees of freedom (Abramowitz & Stegun 26.7.3-4), solved by bisection, so nothing beyond the
runtime dependencies is needed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

__all__ = ["CONFIDENCE", "Interval", "interval", "rank", "t_quantile", "two_sided_t_mass"]

CONFIDENCE = 0.95


def two_sided_t_mass(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with ``df`` (a positive integer) degrees of freedom.

    The finite series of Abramowitz & Stegun 26.7.3 (odd ``df``) and 26.7.4 (even ``df``) in
    ``theta = atan(t / sqrt(df))``: exact, no special functions needed.
    """
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for k in range(2, df, 2):  # (1*3*...*(k-1)) / (2*4*...*k) * cos^k
            term *= (k - 1) / k * cos2
            total += term
        return math.sin(theta) * total
    if df == 1:
        return 2 * theta / math.pi
    term, total = math.cos(theta), math.cos(theta)
    for k in range(3, df - 1, 2):  # (2*4*...*(k-1)) / (1*3*...*k) * cos^k
        term *= (k - 1) / k * cos2
        total += term
    return 2 / math.pi * (theta + math.sin(theta) * total)


def t_quantile(confidence: float, df: int) -> float:
    """The ``t`` with ``P(|T| <= t) == confidence`` (two-sided), by bisection to 1e-12."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    low, high = 0.0, 1.0
    while two_sided_t_mass(high, df) < confidence:
        high *= 2
    while high - low > 1e-12 * max(high, 1.0):
        mid = (low + high) / 2
        low, high = (mid, high) if two_sided_t_mass(mid, df) < confidence else (low, mid)
    return (low + high) / 2


@dataclasses.dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its confidence interval ``[low, high]`` (None below 2 values)."""

    mean: float | None
    low: float | None
    high: float | None
    n: int

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2

    def below(self, other: Interval) -> bool:
        """Whether this interval lies entirely below ``other`` (so the two are separated)."""
        if self.high is None or other.low is None:
            return False
        return self.high < other.low


def interval(values: Sequence[float | None], confidence: float = CONFIDENCE) -> Interval:
    """Mean and Student-t interval of the values that are not None."""
    present = [float(v) for v in values if v is not None]
    n = len(present)
    if n == 0:
        return Interval(None, None, None, 0)
    mean = math.fsum(present) / n
    if n == 1:
        return Interval(mean, None, None, 1)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in present) / (n - 1))
    half = t_quantile(confidence, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def rank(intervals: dict[str, Interval]) -> list[list[str]]:
    """Tiers of names, best (lowest) first: a tier is the names tied within noise.

    Walking up by mean, the first tier holds the lowest name and every name whose interval is
    not entirely above that name's interval; the next tier starts from the lowest remaining
    name, and so on. One name per tier means it is separated from the names after it. Names
    without a mean are left out; without intervals (one seed) everything is one tie.
    """
    order = sorted((name for name, iv in intervals.items() if iv.mean is not None),
                   key=lambda name: intervals[name].mean)  # fmt: skip
    tiers: list[list[str]] = []
    while order:
        lead = intervals[order[0]]
        tier = [name for name in order if not lead.below(intervals[name])]
        tiers.append(tier)
        order = [name for name in order if name not in tier]
    return tiers
