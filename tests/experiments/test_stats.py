"""Seed statistics: Student-t intervals, and rankings only where intervals separate."""

from __future__ import annotations

import pytest

from altgrad_jax.experiments.stats import Interval, interval, rank, t_quantile


@pytest.mark.parametrize(
    ("df", "expected"), [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]
)
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.95, df) == pytest.approx(expected, abs=1e-4)


def test_interval_is_mean_plus_minus_t_sem():
    iv = interval([1.0, 2.0, 3.0, None])  # None (a diverged seed) is left out
    assert (iv.mean, iv.n) == (2.0, 3)
    assert iv.half_width == pytest.approx(4.302653 * 1.0 / 3**0.5, rel=1e-6)
    assert interval([5.0]) == Interval(5.0, None, None, 1)
    assert interval([None]) == Interval(None, None, None, 0)


def test_separated_rules_are_ranked_and_equal_ones_tie():
    far = {
        "nearest": interval([2.9, 3.0, 3.1]),
        "stochastic": interval([2.10, 2.15, 2.20]),
        "master": interval([2.12, 2.14, 2.18]),
    }
    assert rank(far) == [["master", "stochastic"], ["nearest"]]  # by mean within a tier
    equal = {"a": interval([2.0, 2.1, 2.2]), "b": interval([2.0, 2.1, 2.2])}
    assert rank(equal) == [["a", "b"]]
    assert rank({"a": interval([1.0]), "b": interval([9.0])}) == [["a", "b"]]  # one seed
