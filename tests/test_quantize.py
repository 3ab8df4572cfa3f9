"""quantize: bit-exact rounding, saturation, scales, dtypes, gradients, stochastic rounding."""

from __future__ import annotations

import functools
import re

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from references import (
    LOW_FORMATS,
    ML_DTYPES,
    REFERENCE_ONLY,
    SMALL_FORMATS,
    count_compiles,
    f32_bits,
    log_uniform_values,
    midpoints,
    reference_round,
)

import altgrad_jax as ag

quantize_jit = jax.jit(ag.quantize, static_argnums=1, static_argnames=("rounding",))
finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


def _values(fmt, n=20000, seed=0):
    x = np.concatenate([log_uniform_values(fmt, n, seed), midpoints(fmt), ag.grid(fmt)])
    return x.astype(np.float32)


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_bit_exact_with_ml_dtypes(name):
    fmt = ag.get_format(name)
    x = _values(fmt)
    x = x[np.abs(x) <= fmt.max_value]  # ml_dtypes overflows to inf/NaN; we saturate
    expected = x.astype(ML_DTYPES[name]).astype(np.float32)
    np.testing.assert_array_equal(f32_bits(quantize_jit(x, fmt)), f32_bits(expected))


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
@settings(max_examples=300, deadline=None)
@given(x=hnp.arrays(np.float32, 64, elements=finite_f32))
def test_bit_exact_with_ml_dtypes_property(name, x):
    fmt = ag.get_format(name)
    x = np.clip(x, -fmt.max_value, fmt.max_value).astype(np.float32)
    expected = x.astype(ML_DTYPES[name]).astype(np.float32)
    np.testing.assert_array_equal(f32_bits(quantize_jit(x, fmt)), f32_bits(expected))


@pytest.mark.parametrize("name", REFERENCE_ONLY)
def test_matches_slow_reference(name):
    fmt = ag.get_format(name)
    x = _values(fmt)
    x = np.concatenate([x, [fmt.max_value * 1.5, -fmt.max_value * 7]]).astype(np.float32)
    np.testing.assert_array_equal(f32_bits(quantize_jit(x, fmt)), f32_bits(reference_round(x, fmt)))


@pytest.mark.parametrize("name", REFERENCE_ONLY)
@settings(max_examples=200, deadline=None)
@given(x=hnp.arrays(np.float32, 64, elements=finite_f32))
def test_matches_slow_reference_property(name, x):
    fmt = ag.get_format(name)
    np.testing.assert_array_equal(f32_bits(quantize_jit(x, fmt)), f32_bits(reference_round(x, fmt)))


def test_e8m0_matches_ml_dtypes_away_from_ties():
    x = log_uniform_values(ag.E8M0, 20000)
    x = x[x >= 2.0**-126]  # ml_dtypes rounds float32-subnormal inputs up; we round to nearest
    expected = x.astype(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    mantissa = f32_bits(x) & 0x7FFFFF
    away = mantissa != 0x400000  # 1.5 * 2**e is a tie; ml_dtypes rounds ties up
    got = np.asarray(ag.quantize(x, ag.E8M0))
    np.testing.assert_array_equal(got[away], expected[away])
    np.testing.assert_array_equal(got, reference_round(x, ag.E8M0))


def test_e8m0_has_no_zero_and_no_negatives():
    out = np.asarray(ag.quantize(jnp.array([0.0, -1.0, 1e-40, 1.5 * 2.0**-127, 3.0]), ag.E8M0))
    assert np.isnan(out[0]) and np.isnan(out[1])
    np.testing.assert_array_equal(out[2:], [2.0**-127, 2.0**-127, 2.0])


def test_m0_ties_go_to_the_even_exponent_code():
    out = ag.quantize(jnp.array([3.0, 1.5, 6.0, -3.0, 12.0, 24.0]), ag.E7M0)
    np.testing.assert_array_equal(out, [2.0, 2.0, 8.0, -2.0, 8.0, 32.0])


@pytest.mark.parametrize("fmt", SMALL_FORMATS, ids=lambda f: f.name)
def test_saturation_and_specials(fmt):
    x = jnp.array([1e30, -1e30, jnp.inf, -jnp.inf, jnp.nan], jnp.float32)
    out = np.asarray(ag.quantize(x, fmt))
    top = fmt.max_value
    if fmt.signed:
        np.testing.assert_array_equal(out[:2], [top, -top])
        expected_inf = [np.inf, -np.inf] if fmt.has_inf else [top, -top]
        np.testing.assert_array_equal(out[2:4], expected_inf)
    assert np.isnan(out[4])


def test_nan_keeps_its_payload_and_inf_stays_in_formats_with_inf():
    x = jnp.array([np.inf, -np.inf], jnp.float32)
    np.testing.assert_array_equal(ag.quantize(x, ag.E5M2), x)
    np.testing.assert_array_equal(ag.quantize(x, ag.FP16), x)
    payload = np.array([0x7FC01234], np.uint32).view(np.float32)
    assert f32_bits(ag.quantize(payload, ag.E4M3))[0] == 0x7FC01234


def test_subnormal_normal_boundary():
    fmt = ag.E4M3  # smallest normal 2**-6, subnormal spacing 2**-9
    below = np.nextafter(np.float32(2.0**-6), np.float32(0))
    mid = np.float32(2.0**-6 - 2.0**-10)  # halfway between 7 * 2**-9 and 2**-6: tie -> even (2**-6)
    x = np.array([below, mid, np.nextafter(mid, np.float32(0)), 2.0**-10, 2.0**-10 + 2.0**-30])
    np.testing.assert_array_equal(
        ag.quantize(x, fmt), [2.0**-6, 2.0**-6, 7 * 2.0**-9, 0.0, 2.0**-9]
    )


def test_negative_zero_survives():
    assert f32_bits(ag.quantize(jnp.float32(-0.0), ag.E4M3)) == 0x80000000
    assert f32_bits(ag.quantize(jnp.float32(-1e-9), ag.E4M3)) == 0x80000000


def test_scale_divides_then_multiplies():
    x = jnp.linspace(-3.0, 3.0, 101)
    for scale in (0.01, 3.0, 2.0**-20, 0.75):
        reciprocal = np.float32(1) / np.float32(scale)
        np.testing.assert_array_equal(
            ag.quantize(x, ag.E4M3, scale), ag.quantize(x * reciprocal, ag.E4M3) * scale
        )
        jitted = jax.jit(lambda x, s: ag.quantize(x, ag.E4M3, s))(x, scale)
        np.testing.assert_array_equal(jitted, ag.quantize(x, ag.E4M3, scale))
    per_row = jnp.array([[0.5], [4.0]])
    rows = ag.quantize(jnp.ones((2, 3)) * 3.3, ag.E3M4, per_row)
    np.testing.assert_array_equal(rows, [[3.25] * 3, [3.25] * 3])


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), jnp.array([1.0, -2.0])])
def test_bad_scale_raises(scale):
    with pytest.raises(ValueError, match="scale must be positive"):
        ag.quantize(jnp.ones(2), ag.E4M3, scale)


def test_traced_scale_is_accepted():
    out = jax.jit(lambda x, s: ag.quantize(x, ag.E4M3, s))(jnp.full(2, 3.0), 2.0)
    np.testing.assert_array_equal(out, [3.0, 3.0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_inputs_are_exact_and_keep_their_dtype(dtype):
    x = jnp.asarray(log_uniform_values(ag.E4M3, 2000)).astype(dtype)
    out = ag.quantize(x, ag.E4M3)
    assert out.dtype == dtype
    expected = ag.quantize(x.astype(jnp.float32), ag.E4M3).astype(dtype)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))


def test_format_that_does_not_fit_the_input_dtype_raises():
    with pytest.raises(ValueError, match="not all representable in float16"):
        ag.quantize(jnp.ones(2, jnp.float16), ag.E7M0)
    with pytest.raises(ValueError, match="bfloat16"):
        ag.quantize(jnp.ones(2, jnp.bfloat16), ag.FP16)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="floating-point"):
        ag.quantize(jnp.ones(2, jnp.int32), ag.E4M3)
    with pytest.raises(ValueError, match="unknown format 'E4M4'"):
        ag.quantize(jnp.ones(2), "E4M4")
    with pytest.raises(ValueError, match="unknown rounding 'up'"):
        ag.quantize(jnp.ones(2), ag.E4M3, rounding="up")
    with pytest.raises(ValueError, match="needs a PRNG key"):
        ag.quantize(jnp.ones(2), ag.E4M3, rounding="stochastic")


def test_straight_through_gradient_under_jit():
    x = jnp.linspace(-600.0, 600.0, 50)  # includes saturated entries

    def loss(x, scale):
        return jnp.sum(ag.quantize(x, ag.E4M3, scale) * jnp.arange(50.0))

    gx, gs = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, 1.5)
    np.testing.assert_array_equal(gx, jnp.arange(50.0))
    assert gs == 0.0
    _, tangent = jax.jvp(lambda x: ag.quantize(x, ag.E4M3), (x,), (jnp.ones(50),))
    np.testing.assert_array_equal(tangent, jnp.ones(50))


def test_clipped_gradient_zeroes_saturated_entries():
    x = jnp.array([1.0, 447.0, 449.0, -1000.0, jnp.inf])
    g = jax.grad(lambda x: jnp.sum(ag.quantize(x, ag.E4M3, clip_gradient=True)))(x)
    np.testing.assert_array_equal(g, [1.0, 1.0, 0.0, 0.0, 0.0])


def test_toward_zero_takes_the_grid_value_below():
    fmt = ag.E3M4
    x = _values(fmt)
    x = x[np.abs(x) <= fmt.max_value]
    out = np.asarray(ag.quantize(x, fmt, rounding="toward_zero"))
    g = ag.grid(fmt, negative=False)
    expected = np.sign(x) * g[np.searchsorted(g, np.abs(x), side="right") - 1]
    np.testing.assert_array_equal(out, expected.astype(np.float32))


def _neighbours(x, fmt):
    g = ag.grid(fmt)
    hi = g[np.searchsorted(g, x, side="left")]
    lo = g[np.searchsorted(g, x, side="right") - 1]
    return lo, hi


@pytest.mark.parametrize("fmt", [ag.E4M3, ag.E5M2, ag.E7M0, ag.E0M7], ids=lambda f: f.name)
def test_stochastic_rounding_returns_only_the_two_neighbours(fmt):
    x = log_uniform_values(fmt, 5000, seed=3)
    x = x[np.abs(x) <= fmt.max_value]
    out = np.asarray(ag.quantize(x, fmt, rounding="stochastic", key=jax.random.key(0)))
    lo, hi = _neighbours(x.astype(np.float64), fmt)
    assert np.all((out == lo) | (out == hi))


@pytest.mark.parametrize(
    ("fmt", "value"),
    [(ag.E4M3, 1.3), (ag.E5M2, -0.0123), (ag.E4M3, 0.3 * 2.0**-9), (ag.E7M0, 5.0), (ag.E1M6, 0.01)],
)
def test_stochastic_rounding_is_unbiased(fmt, value):
    n = 200_000
    x = jnp.full((n,), value, jnp.float32)
    out = np.asarray(ag.quantize(x, fmt, rounding="stochastic", key=jax.random.key(7)), np.float64)
    lo, hi = _neighbours(np.float64(np.float32(value)), fmt)
    p = (np.float32(value) - lo) / (hi - lo)
    sigma = (hi - lo) * np.sqrt(p * (1 - p) / n)
    assert abs(out.mean() - np.float32(value)) < 5 * sigma
    assert set(np.unique(out)) <= {lo, hi}


def test_stochastic_rounding_is_reproducible_by_key():
    x = jnp.linspace(-2.0, 2.0, 1000)
    a = ag.quantize(x, ag.E5M2, rounding="stochastic", key=jax.random.key(1))
    b = ag.quantize(x, ag.E5M2, rounding="stochastic", key=jax.random.key(1))
    c = ag.quantize(x, ag.E5M2, rounding="stochastic", key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert np.any(np.asarray(a) != np.asarray(c))
    legacy = ag.quantize(x, ag.E5M2, rounding="stochastic", key=jax.random.PRNGKey(1))
    assert legacy.shape == x.shape


def test_random_bits_are_uniform_per_bit():
    bits = np.asarray(ag.random_bits(jax.random.key(0), (1 << 16,)))
    ones = np.unpackbits(bits.view(np.uint8)).reshape(-1, 32).mean(axis=0)
    assert np.all(np.abs(ones - 0.5) < 0.01)


@pytest.mark.parametrize("rounding", ["nearest", "toward_zero", "stochastic"])
@pytest.mark.parametrize("fmt", [*SMALL_FORMATS, ag.FP16, ag.BF16], ids=lambda f: f.name)
def test_traced_format_equals_static_format(fmt, rounding):
    x = np.concatenate([_values(fmt, 3000), [np.inf, -np.inf, np.nan, 0.0, -0.0, 1e38]])
    x = jnp.asarray(x, jnp.float32)
    key = jax.random.key(5)
    static = ag.quantize(x, fmt, 0.75, rounding=rounding, key=key)
    traced = jax.jit(functools.partial(ag.quantize, rounding=rounding, key=key))(
        x, ag.format_params(fmt).as_arrays(), 0.75
    )
    np.testing.assert_array_equal(f32_bits(traced), f32_bits(static))


def test_one_compilation_serves_every_format_and_vmap_runs_over_formats():
    step = count_compiles(lambda x, params: ag.quantize(x, params))
    step_jit = jax.jit(step)
    x = jnp.asarray(log_uniform_values(ag.E4M3, 512))
    for fmt in ag.EIGHT_BIT_FORMATS:
        traced = step_jit(x, ag.format_params(fmt).as_arrays())
        np.testing.assert_array_equal(traced, ag.quantize(x, fmt))
    assert step.traces == 1
    stacked = ag.stack_format_params(ag.EIGHT_BIT_FORMATS)
    batched = jax.vmap(ag.quantize, in_axes=(None, 0))(x, stacked)
    for row, fmt in zip(batched, ag.EIGHT_BIT_FORMATS, strict=True):
        np.testing.assert_array_equal(row, ag.quantize(x, fmt))


def test_works_under_vmap_and_scan():
    xs = jnp.asarray(log_uniform_values(ag.E5M2, 64).reshape(8, 8))
    scales = jnp.arange(1.0, 9.0)
    vmapped = jax.vmap(lambda x, s: ag.quantize(x, ag.E5M2, s))(xs, scales)
    looped = jnp.stack([ag.quantize(x, ag.E5M2, s) for x, s in zip(xs, scales, strict=True)])
    np.testing.assert_array_equal(vmapped, looped)

    def body(carry, x):
        return carry + ag.quantize(x, ag.E5M2), None

    total, _ = jax.lax.scan(body, jnp.zeros(8), xs)
    expected = jnp.zeros(8)
    for x in xs:
        expected = expected + ag.quantize(x, ag.E5M2)
    np.testing.assert_array_equal(total, expected)


# ------------------------------------------------ subnormal intermediates (FTZ / DAZ devices)
def _ieee_reference(x, fmt, scale):
    """round_fmt(x * (1 / scale)) * scale in NumPy float32 (IEEE, gradual underflow), rounding
    by enumeration of the grid."""
    x, scale = np.float32(x), np.float32(scale)
    y = x * (np.float32(1) / scale)
    return reference_round(y, fmt) * scale


@pytest.mark.parametrize("scale", [3.0, 0.75, 1.0, 2.0**-20, 2.0**20, 5.5e3, 2.0**-120])
@pytest.mark.parametrize("fmt", [ag.E8M0, ag.BF16, ag.E5M2, ag.E4M3, ag.E2M1], ids=lambda f: f.name)
def test_scaled_path_is_exact_on_subnormal_intermediates(fmt, scale):
    rng = np.random.default_rng(1)
    x = (2.0 ** rng.uniform(-149, -100, 3000)).astype(np.float32)
    x = x if not fmt.signed else x * rng.choice([-1, 1], x.size).astype(np.float32)
    with np.errstate(over="ignore"):
        expected = _ieee_reference(x, fmt, scale)
    y = np.float32(x) * (np.float32(1) / np.float32(scale))
    ok = np.isfinite(y) & ((y != 0) | fmt.has_zero)  # E8M0 has no zero: NaN, not 2**-127
    eager = ag.quantize(x, fmt, scale)
    traced = jax.jit(lambda x, s: ag.quantize(x, fmt, s))(x, jnp.float32(scale))
    np.testing.assert_array_equal(f32_bits(eager)[ok], f32_bits(expected)[ok])
    np.testing.assert_array_equal(f32_bits(traced), f32_bits(eager))


@pytest.mark.parametrize("fmt", [ag.E4M3, ag.E5M2, ag.E2M1], ids=lambda f: f.name)
def test_float_fast_path_and_exact_path_agree_across_their_boundary(fmt):
    """quantize multiplies in float where that is provably exact on a device that flushes
    subnormals, and scales in integers elsewhere; around the switch (``scale * min_value`` near
    ``2**-124``) subnormal inputs whose scaled values round up to ``min_value`` must survive."""
    rng = np.random.default_rng(2)
    min_value = float(ag.grid(fmt)[ag.grid(fmt) > 0].min())
    boundary = 2.0**-124 / min_value
    x = np.concatenate(
        [
            (2.0 ** rng.uniform(-149, -126, 2000)).astype(np.float32),  # float32 subnormals
            (2.0 ** rng.uniform(-126, -90, 2000)).astype(np.float32),
        ]
    ) * rng.choice([-1, 1], 4000).astype(np.float32)
    step = jax.jit(lambda x, s: ag.quantize(x, fmt, s))
    for scale in boundary * np.array([0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.0**10]):
        expected = _ieee_reference(x, fmt, scale)
        np.testing.assert_array_equal(f32_bits(ag.quantize(x, fmt, scale)), f32_bits(expected))
        np.testing.assert_array_equal(f32_bits(step(x, jnp.float32(scale))), f32_bits(expected))


def test_issue_reproducers_for_subnormals():
    tiny = np.float32(1e-40)
    assert float(ag.quantize(tiny, "E8M0", 3.0)) == np.float32(2.0**-127) * np.float32(3.0)
    assert f32_bits(ag.quantize(tiny, "E8M0", jnp.float32(1.0))) == f32_bits(2.0**-127)
    assert f32_bits(ag.quantize(tiny, "E8M0", 1.0)) == f32_bits(2.0**-127)
    x = jnp.asarray(9.18e-40, jnp.bfloat16)
    expected = _ieee_reference(np.float32(x.astype(jnp.float32)), ag.E5M2, 2.0**-120)
    out = ag.quantize(x, "E5M2", 2.0**-120)
    assert out.dtype == jnp.bfloat16 and float(out) == float(expected) and float(out) > 0


@pytest.mark.parametrize("fmt", [ag.E4M3, ag.E2M1, ag.BF16], ids=lambda f: f.name)
def test_subnormal_traced_scale_is_exact(fmt):
    """E8M0 code 0, 2**-127, is itself a float32 subnormal: block scales use it."""
    grid = ag.grid(fmt)
    grid = grid[np.abs(grid) <= 2.0**20].astype(np.float32)
    for k in (-127, -133, -140):
        x = (grid.astype(np.float64) * 2.0**k).astype(np.float32)
        exact = x.astype(np.float64) == grid.astype(np.float64) * 2.0**k
        out = jax.jit(lambda x, s: ag.quantize(x, fmt, s))(x, jnp.float32(2.0**k))
        np.testing.assert_array_equal(f32_bits(out)[exact], f32_bits(x)[exact])


@pytest.mark.parametrize(
    ("fmt", "value", "scale"),
    [
        (ag.BF16, 0.3 * 2.0**-133, 1.0),  # below BF16's smallest subnormal, a float32 subnormal
        (ag.BF16, 1.7 * 2.0**-146, 1.0),  # probability 2**-12: beyond 32 fraction bits
        (ag.E8M0, 1.3 * 2.0**-127, 1.0),  # E8M0's lowest binade, float32 subnormals
        (ag.E8M0, 1.3 * 2.0**-127 * 3, 3.0),  # the same, reached through a scale
        (ag.E4M3, 0.3 * 2.0**-9 * 2.0**-120, 2.0**-120),
    ],
)
def test_stochastic_rounding_is_unbiased_on_subnormals(fmt, value, scale):
    n = 200_000
    x = jnp.full((n,), value, jnp.float32)
    out = ag.quantize(x, fmt, scale, rounding="stochastic", key=jax.random.key(3))
    y = np.float64(np.float32(value) * (np.float32(1) / np.float32(scale)))
    lo, hi = _neighbours(y, fmt)
    p = (y - lo) / (hi - lo)
    got = np.asarray(out, np.float64) / scale
    sigma = (hi - lo) * np.sqrt(p * (1 - p) / n)
    assert abs(got.mean() - y) < 5 * sigma
    assert set(np.unique(got)) == {lo, hi}


def test_finite_overflow_through_a_scale_saturates():
    out = ag.quantize(jnp.array([1e38, -1e38]), ag.E5M2, 1e-5)
    np.testing.assert_array_equal(out, np.float32([57344, -57344]) * np.float32(1e-5))


@pytest.mark.parametrize("scale", [1e-50, 1e-45, 1e39, 2.0**-127, -0.0, float("-inf")])
def test_scale_checked_in_float32(scale):
    with pytest.raises(ValueError, match=r"scale must be positive.*got " + re.escape(repr(scale))):
        ag.quantize(jnp.ones(2), ag.E4M3, scale)


def test_scale_must_broadcast_to_x():
    with pytest.raises(ValueError, match=r"scale of shape \(3, 1\) does not broadcast to x's"):
        ag.quantize(jnp.ones(3), ag.E4M3, jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="does not broadcast"):
        jax.jit(lambda x, s: ag.quantize(x, ag.E4M3, s))(jnp.ones(3), jnp.ones((2,)))
    per_row = jnp.full((3, 1), 2.0)
    g = jax.grad(lambda x: jnp.sum(ag.quantize(x, ag.E4M3, per_row)))(jnp.ones((3, 4)))
    np.testing.assert_array_equal(g, jnp.ones((3, 4)))


def test_invalid_traced_scale_gives_nan():
    out = jax.jit(lambda s: ag.quantize(jnp.ones(2), ag.E4M3, s))(jnp.array([0.0, jnp.inf]))
    assert np.all(np.isnan(out))


# ------------------------------------------------------------ traced formats: the dtype check
def test_traced_format_gets_the_input_dtype_check():
    x = jnp.full(2, 65504.0, jnp.bfloat16)
    for params in (
        ag.format_params(ag.FP16).as_arrays(),  # may hold any format
        ag.format_params(ag.FP16).as_arrays(within=()),  # FP16 itself
        ag.stack_format_params((ag.E4M3, ag.FP16)),
    ):
        with pytest.raises(ValueError, match="bfloat16"):
            jax.jit(ag.quantize)(x, params)
    fits = ag.format_params(ag.E4M3).as_arrays(within=(ag.E5M2,))
    out = jax.jit(ag.quantize)(jnp.full(2, 3.3, jnp.bfloat16), fits)
    np.testing.assert_array_equal(np.asarray(out, np.float32), [3.25, 3.25])
    assert out.dtype == jnp.bfloat16


def test_format_params_bounds_are_static_and_shared_by_within():
    own = ag.format_params(ag.E5M2).as_arrays(within=())
    assert own.bounds == ag.FormatBounds(2, 57344.0, 2.0**-16)
    family = (ag.E4M3, ag.E5M2)
    a = ag.format_params(ag.E4M3).as_arrays(within=family)
    b = ag.format_params(ag.E5M2).as_arrays(within=family)
    assert a.bounds == b.bounds == ag.FormatBounds(3, 57344.0, 2.0**-16)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert ag.format_params(ag.E4M3).as_arrays().bounds == ag.ANY_FORMAT
    assert a.mantissa_bits.dtype == jnp.uint32 and float(a.max_value) == 448.0
    scanned = jax.lax.scan(
        lambda c, p: (c, ag.quantize(jnp.float32(3.3), p)), 0, ag.stack_format_params(family)
    )[1]
    np.testing.assert_array_equal(scanned, [3.25, 3.5])


# ------------------------------------------- formats whose grid lies among float32 subnormals
@pytest.mark.parametrize("fmt", LOW_FORMATS, ids=lambda f: f.name)
def test_formats_below_float32_normals_match_the_reference(fmt):
    x = np.concatenate([_values(fmt, 5000), [fmt.max_value * 3, 2.0**-126, 1.0, 1e30]])
    x = x.astype(np.float32)
    x = x[(x > 0) | fmt.signed]
    np.testing.assert_array_equal(f32_bits(quantize_jit(x, fmt)), f32_bits(reference_round(x, fmt)))
    out = np.asarray(ag.quantize(x, fmt, rounding="toward_zero"))
    g = ag.grid(fmt, negative=False)
    below = g[np.clip(np.searchsorted(g, np.abs(x), side="right") - 1, 0, None)]
    expected = np.where(np.abs(x) < g[0], g[0], below) * (np.sign(x) if fmt.signed else 1)
    np.testing.assert_array_equal(out, expected.astype(np.float32))
    sr = np.asarray(ag.quantize(x, fmt, rounding="stochastic", key=jax.random.key(0)))
    lo, hi = _neighbours(np.clip(x, -fmt.max_value, fmt.max_value).astype(np.float64), fmt)
    assert np.all((sr == lo) | (sr == hi))


@pytest.mark.parametrize("fmt", LOW_FORMATS[:3], ids=lambda f: f.name)
def test_formats_below_float32_normals_are_static_only(fmt):
    with pytest.raises(ValueError, match="static format"):
        ag.format_params(fmt).as_arrays()
