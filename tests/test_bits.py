"""Bit-level transfer functions: codes <-> values and the ULP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from references import LOW_FORMATS, ML_DTYPES, SMALL_FORMATS, log_uniform_values, midpoints

import altgrad_jax as ag

TRACEABLE_FORMATS = (*SMALL_FORMATS, ag.FP16, ag.BF16)
ALL_CODE_FORMATS = (*TRACEABLE_FORMATS, *LOW_FORMATS)


def _all_codes(fmt):
    return np.arange(1 << fmt.total_bits, dtype=np.uint32).astype(fmt.code_dtype)


def _ml_view(codes, name):
    dtype = np.dtype(ML_DTYPES[name])
    return codes.astype(np.uint16 if dtype.itemsize == 2 else np.uint8).view(dtype)


@pytest.mark.parametrize("fmt", ALL_CODE_FORMATS, ids=lambda f: f.name)
def test_every_code_round_trips(fmt):
    codes = _all_codes(fmt)
    values = np.asarray(ag.from_bits(codes, fmt))
    finite = ~np.isnan(values)
    back = np.asarray(ag.to_bits(values, fmt))
    np.testing.assert_array_equal(back[finite], codes[finite])
    # quantize is the identity on the grid (bit for bit, -0 included)
    again = np.asarray(ag.quantize(values[finite], fmt))
    np.testing.assert_array_equal(again.view(np.uint32), values[finite].view(np.uint32))


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_from_bits_matches_ml_dtypes_on_every_code(name):
    fmt = ag.get_format(name)
    codes = _all_codes(fmt)
    with np.errstate(invalid="ignore"):
        expected = _ml_view(codes, name).astype(np.float32)
    got = np.asarray(ag.from_bits(codes, fmt))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    finite = ~np.isnan(expected)
    np.testing.assert_array_equal(got[finite].view(np.uint32), expected[finite].view(np.uint32))


def test_e8m0_codes_match_ml_dtypes():
    codes = _all_codes(ag.E8M0)
    expected = codes.view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    got = np.asarray(ag.from_bits(codes, ag.E8M0))
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert np.isnan(got[255]) and got[0] == 2.0**-127 and got[127] == 1.0


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_to_bits_matches_ml_dtypes(name):
    fmt = ag.get_format(name)
    x = np.concatenate([log_uniform_values(fmt, 20000), midpoints(fmt)])
    x = x[np.abs(x) <= fmt.max_value]
    expected = x.astype(ML_DTYPES[name]).view(np.uint16 if fmt.total_bits > 8 else np.uint8)
    expected = expected & ((1 << fmt.total_bits) - 1)
    np.testing.assert_array_equal(np.asarray(ag.to_bits(x, fmt)), expected)


def test_code_dtypes():
    assert ag.to_bits(jnp.ones(3), ag.E4M3).dtype == jnp.uint8
    assert ag.to_bits(jnp.ones(3), ag.E2M1).dtype == jnp.uint8
    assert ag.to_bits(jnp.ones(3), ag.BF16).dtype == jnp.uint16


def test_special_codes():
    nan, inf = np.float32(np.nan), np.float32(np.inf)
    assert int(ag.to_bits(nan, ag.E4M3)) == 0x7F and int(ag.to_bits(-nan, ag.E4M3)) == 0xFF
    assert int(ag.to_bits(nan, ag.E5M2)) == 0x7E
    assert int(ag.to_bits(inf, ag.E5M2)) == 0x7C and int(ag.to_bits(-inf, ag.E5M2)) == 0xFC
    assert int(ag.to_bits(inf, ag.E4M3)) == 0x7E  # saturates to 448
    assert int(ag.to_bits(nan, ag.E8M0)) == 0xFF and int(ag.to_bits(0.0, ag.E8M0)) == 0xFF
    assert int(ag.to_bits(nan, ag.E3M4)) == 0xFF  # no NaN code: documented all-ones
    assert int(ag.to_bits(-0.0, ag.E4M3)) == 0x80


def test_codes_reject_wrong_dtypes():
    with pytest.raises(TypeError, match="integer codes"):
        ag.from_bits(jnp.ones(3), ag.E4M3)
    with pytest.raises(TypeError, match="floating-point"):
        ag.to_bits(jnp.ones(3, jnp.int32), ag.E4M3)


@pytest.mark.parametrize("fmt", (*SMALL_FORMATS, *LOW_FORMATS), ids=lambda f: f.name)
def test_ulp_is_the_gap_to_the_next_grid_value(fmt):
    g = ag.grid(fmt, negative=False)
    gaps = np.diff(g)
    below_top = g[:-1]
    np.testing.assert_array_equal(np.asarray(ag.ulp(below_top.astype(np.float32), fmt)), gaps)
    # Anywhere strictly between two grid values, the gap of that pair.
    inside = (below_top + gaps / 4).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(ag.ulp(-inside, fmt)), gaps)


def test_ulp_at_the_ends():
    assert float(ag.ulp(0.0, ag.E4M3)) == 2.0**-9
    assert float(ag.ulp(1e6, ag.E4M3)) == 32.0  # beyond max: the top binade's spacing
    assert float(ag.ulp(1.0, ag.BF16)) == 2.0**-7
    assert float(ag.ulp(1e-40, ag.BF16)) == 2.0**-133
    assert np.isnan(ag.ulp(jnp.inf, ag.E5M2)) and np.isnan(ag.ulp(jnp.nan, ag.E5M2))


@pytest.mark.parametrize("fmt", TRACEABLE_FORMATS, ids=lambda f: f.name)
def test_ulp_takes_traced_formats(fmt):
    x = np.concatenate([ag.grid(f) for f in SMALL_FORMATS]).astype(np.float32)
    traced = jax.jit(ag.ulp)(x, ag.format_params(fmt).as_arrays())
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(ag.ulp(x, fmt)))
