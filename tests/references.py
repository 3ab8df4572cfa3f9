"""Shared test helpers: an independent slow rounding reference and ml_dtypes counterparts.

A module of its own, not conftest.py: tests/experiments has a conftest too, and only one module
named ``conftest`` can be imported by name.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

import altgrad_jax as ag

# Formats that ml_dtypes also implements, with the same semantics in the finite range.
ML_DTYPES = {
    "E4M3": ml_dtypes.float8_e4m3fn,
    "E5M2": ml_dtypes.float8_e5m2,
    "FP16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "E2M3": ml_dtypes.float6_e2m3fn,
    "E3M2": ml_dtypes.float6_e3m2fn,
    "E2M1": ml_dtypes.float4_e2m1fn,
}
# Formats only the slow reference can check.
REFERENCE_ONLY = ("E0M7", "E1M6", "E2M5", "E3M4", "E6M1", "E7M0")
SMALL_FORMATS = (*ag.EIGHT_BIT_FORMATS, ag.E2M1, ag.E2M3, ag.E3M2, ag.E8M0)
# Formats whose normal range (or whole grid) starts among float32's subnormals: every value is
# exact in float32, and the kernel takes its branch for frames below 2**-126.
LOW_FORMATS = (
    ag.FloatFormat("E2M1_B128", 2, 1, 128),
    ag.FloatFormat("E0M7_B127", 0, 7, 127),
    ag.FloatFormat("E0M7_B142", 0, 7, 142),  # step 2**-149: nothing to round among subnormals
    ag.FloatFormat("E2M1_B149", 2, 1, 149),
    ag.FloatFormat("E4M3_B146", 4, 3, 146, has_nan=True),  # smallest step exactly 2**-148
    ag.FloatFormat("E3M2_B140", 3, 2, 140),
    ag.FloatFormat("E5M0_B140", 5, 0, 140),  # M = 0: ties to the even exponent code
    ag.FloatFormat("E8M0_B149", 8, 0, 149, has_nan=True, signed=False, has_zero=False),
    ag.FloatFormat("E8M0_B140", 8, 0, 140, has_nan=True, signed=False, has_zero=False),
)


def reference_round(x: np.ndarray, fmt: ag.FloatFormat) -> np.ndarray:
    """Nearest grid value by enumeration (ties to the even code), saturating; float32 out.

    Written only for tests: it knows nothing of the bit kernel, just the sorted grid of
    magnitudes (whose index is the magnitude code).
    """
    x = np.asarray(x, np.float32).astype(np.float64)
    magnitudes = ag.grid(fmt, negative=False)  # index == magnitude code
    a = np.abs(x)
    hi_index = np.clip(np.searchsorted(magnitudes, a, side="left"), 0, len(magnitudes) - 1)
    lo_index = np.clip(hi_index - 1, 0, None)
    lo_index = np.where(magnitudes[hi_index] == a, hi_index, lo_index)
    lo, hi = magnitudes[lo_index], magnitudes[hi_index]
    d_lo, d_hi = a - lo, hi - a
    choose_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi_index % 2 == 0) & (hi_index != lo_index))
    out = np.where(choose_hi, hi, lo)
    out = np.where(a >= magnitudes[-1], magnitudes[-1], out)
    out = np.where(np.signbit(x), -out, out) if fmt.signed else out
    return np.where(np.isnan(x), np.nan, out).astype(np.float32)


def f32_bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def log_uniform_values(fmt: ag.FloatFormat, n: int, seed: int = 0) -> np.ndarray:
    """Signed values spread log-uniformly from below the smallest to beyond the largest value."""
    rng = np.random.default_rng(seed)
    lo = np.log2(fmt.min_subnormal) - 4
    hi = min(np.log2(fmt.max_value) + 0.5, 127.9)
    magnitudes = 2.0 ** rng.uniform(lo, hi, n)
    signs = rng.choice([-1.0, 1.0], n) if fmt.signed else 1.0
    return (signs * magnitudes).astype(np.float32)


def midpoints(fmt: ag.FloatFormat) -> np.ndarray:
    """Every exact midpoint between neighbouring grid values (float32 where representable)."""
    g = ag.grid(fmt)
    mids = (g[1:] + g[:-1]) / 2
    mids32 = mids.astype(np.float32)
    return mids32[mids32.astype(np.float64) == mids]


def count_compiles(fn):
    """Wraps fn so each trace increments ``wrapper.traces`` (a trace per compilation)."""

    def traced(*args, **kwargs):
        traced.traces += 1
        return fn(*args, **kwargs)

    traced.traces = 0
    return traced


def rceil_exponent(amax: float, element_max: float) -> int:
    """The smallest k with amax <= element_max * 2**k, by exact search in float64 (the MX
    "rceil" block-scale rule; E8M0 range: clamped to [-127, 127])."""
    if amax == 0:
        return -127
    k = math.floor(math.log2(amax / element_max)) - 2
    while amax > element_max * 2.0**k:
        k += 1
    return max(-127, min(127, k))
