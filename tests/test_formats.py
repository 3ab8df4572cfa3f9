"""Format specifications, registry, validation, grids and the table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from references import ML_DTYPES

import altgrad_jax as ag

CONTRACT_TABLE = [
    # name, E, M, bias, inf, nan, max_value
    ("E0M7", 0, 7, 0, False, False, 127 / 128),
    ("E1M6", 1, 6, 0, False, False, 127 / 32),
    ("E2M5", 2, 5, 1, False, False, 7.875),
    ("E3M4", 3, 4, 1, False, False, 124.0),
    ("E4M3", 4, 3, 7, False, True, 448.0),
    ("E5M2", 5, 2, 15, True, True, 57344.0),
    ("E6M1", 6, 1, 31, False, False, 3 * 2.0**31),
    ("E7M0", 7, 0, 63, False, False, 2.0**64),
    ("FP16", 5, 10, 15, True, True, 65504.0),
    ("BF16", 8, 7, 127, True, True, float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)),
]


@pytest.mark.parametrize(("name", "e", "m", "bias", "inf", "nan", "max_value"), CONTRACT_TABLE)
def test_contract_table(name, e, m, bias, inf, nan, max_value):
    fmt = ag.get_format(name)
    assert fmt is getattr(ag, name)
    assert (fmt.exponent_bits, fmt.mantissa_bits, fmt.bias) == (e, m, bias)
    assert (fmt.has_inf, fmt.has_nan) == (inf, nan)
    assert fmt.max_value == max_value
    assert fmt.total_bits == 1 + e + m


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_range_matches_ml_dtypes_finfo(name):
    fmt, info = ag.get_format(name), ml_dtypes.finfo(ML_DTYPES[name])
    assert fmt.max_value == float(info.max)
    assert fmt.min_normal == float(info.smallest_normal)
    assert fmt.min_subnormal == float(info.smallest_subnormal)


def test_mx_formats():
    assert (ag.E2M1.max_value, ag.E2M3.max_value, ag.E3M2.max_value) == (6.0, 7.5, 28.0)
    assert ag.E2M1.total_bits == 4 and ag.E2M3.total_bits == 6
    assert ag.E8M0.total_bits == 8 and not ag.E8M0.signed
    assert ag.E8M0.max_value == 2.0**127 and ag.E8M0.min_subnormal == 2.0**-127
    assert ag.E8M0.min_value == 2.0**-127


def test_fixed_point_has_uniform_grid_and_no_subnormals():
    assert ag.E0M7.min_normal == ag.E0M7.min_subnormal == 2.0**-7
    assert set(np.diff(ag.grid(ag.E0M7))) == {2.0**-7}
    # E1M6 is fixed point in disguise: its subnormal and normal spacings coincide.
    assert set(np.diff(ag.grid(ag.E1M6))) == {2.0**-5}


@pytest.mark.parametrize("name", ["E4M3", "e4m3", "FP8_E4M3", "fp8-e4m3", " E4M3FN "])
def test_get_format_is_case_insensitive_with_aliases(name):
    assert ag.get_format(name) is ag.E4M3


def test_get_format_passes_formats_through():
    assert ag.get_format(ag.E5M2) is ag.E5M2


def test_unknown_format_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown format 'E9M9'.*E4M3.*E5M2"):
        ag.get_format("E9M9")
    with pytest.raises(TypeError):
        ag.get_format(3)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        (dict(exponent_bits=-1, mantissa_bits=3, bias=7), "exponent_bits=-1"),
        (dict(exponent_bits=9, mantissa_bits=3, bias=7), "exponent_bits=9"),
        (dict(exponent_bits=4, mantissa_bits=24, bias=7), "mantissa_bits=24"),
        (dict(exponent_bits=4, mantissa_bits=-2, bias=7), "mantissa_bits=-2"),
        (dict(exponent_bits=0, mantissa_bits=0, bias=0), "no nonzero value"),
        (dict(exponent_bits=0, mantissa_bits=7, bias=0, has_inf=True, has_nan=True), "inf"),
        (dict(exponent_bits=5, mantissa_bits=2, bias=15, has_inf=True), "has_nan"),
        (dict(exponent_bits=8, mantissa_bits=3, bias=100), "above float32"),
        (dict(exponent_bits=4, mantissa_bits=3, bias=148), r"2\*\*-150, below float32's smallest"),
        (dict(exponent_bits=0, mantissa_bits=7, bias=143), r"2\*\*-150, below float32's smallest"),
        (
            dict(exponent_bits=8, mantissa_bits=0, bias=150, has_zero=False, signed=False),
            r"2\*\*-150, below float32's smallest",
        ),
        (dict(exponent_bits=4, mantissa_bits=3, bias=7, has_zero=False), "exponent-only"),
    ],
)
def test_impossible_formats_raise(kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        ag.FloatFormat("bad", **kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((2, 1, 128), {}),
        ((0, 7, 127), {}),
        ((0, 7, 142), {}),  # quantum 2**-149: float32's smallest subnormal
        ((8, 0, 149), dict(has_nan=True, signed=False, has_zero=False)),
    ],
)
def test_formats_exact_in_float32_are_accepted(args, kwargs):
    fmt = ag.FloatFormat("low", *args, **kwargs)
    values = ag.grid(fmt)
    assert np.all(values.astype(np.float32).astype(np.float64) == values)
    assert fmt.min_subnormal >= 2.0**-149


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(name=123), "name"),
        (dict(signed="no"), "signed"),
        (dict(has_nan=1), "has_nan"),
        (dict(has_inf=None), "has_inf"),
        (dict(has_zero=0), "has_zero"),
    ],
)
def test_name_and_flags_are_type_checked(kwargs, argument):
    kwargs = {"name": "bad", **kwargs}
    with pytest.raises(TypeError, match=f"{argument} must be"):
        ag.FloatFormat(exponent_bits=4, mantissa_bits=3, bias=7, **kwargs)


def test_empty_name_is_rejected():
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        ag.FloatFormat("", 4, 3, 7)


def test_non_integer_bits_raise_type_error():
    with pytest.raises(TypeError, match="mantissa_bits"):
        ag.FloatFormat("bad", 4, 3.0, 7)
    with pytest.raises(TypeError, match="exponent_bits"):
        ag.FloatFormat("bad", True, 3, 7)


def test_user_format_at_float32_limits_is_accepted():
    widest = ag.FloatFormat("E8M23", 8, 23, 127, has_inf=True, has_nan=True)
    assert widest.max_value == float(np.finfo(np.float32).max)
    assert widest.min_subnormal == 2.0**-149


def test_formats_are_hashable_static_arguments():
    assert hash(ag.FloatFormat("E4M3", 4, 3, 7, has_nan=True)) == hash(ag.E4M3)
    assert ag.FloatFormat("E4M3", 4, 3, 7, has_nan=True) == ag.E4M3
    traces = []

    def g(x, fmt):
        traces.append(fmt)
        return ag.quantize(x, fmt)

    g_jit = jax.jit(g, static_argnums=1)
    x = jnp.ones(4)
    for fmt in (ag.E4M3, ag.FloatFormat("E4M3", 4, 3, 7, has_nan=True), ag.E5M2, ag.E4M3):
        g_jit(x, fmt)
    assert traces == [ag.E4M3, ag.E5M2]


@pytest.mark.parametrize("name", sorted(ML_DTYPES))
def test_grid_equals_every_finite_ml_dtypes_value(name):
    fmt = ag.get_format(name)
    dtype = np.dtype(ML_DTYPES[name])
    n = 1 << fmt.total_bits
    codes = np.arange(n, dtype=np.uint32).astype(np.uint16 if dtype.itemsize == 2 else np.uint8)
    with np.errstate(invalid="ignore"):
        values = codes.view(dtype).astype(np.float64)
    finite = np.unique(values[np.isfinite(values)])
    np.testing.assert_array_equal(ag.grid(fmt), finite)


def test_grid_shape_and_order():
    g = ag.grid(ag.E4M3)
    assert len(g) == 253  # 256 codes - 2 NaN - the duplicate zero
    assert np.all(np.diff(g) > 0)
    assert len(ag.grid(ag.E8M0)) == 255 and ag.grid(ag.E8M0)[0] == 2.0**-127
    assert np.array_equal(ag.grid("E2M1", negative=False), [0, 0.5, 1, 1.5, 2, 3, 4, 6])
    with pytest.raises(ValueError, match="16 bits"):
        ag.grid(ag.FloatFormat("E8M23", 8, 23, 127, has_inf=True, has_nan=True))


def test_register_format():
    fmt = ag.FloatFormat("E3M3_TEST", 3, 3, 3)
    assert ag.register_format(fmt, aliases=("MY_FP7",)) is fmt
    assert ag.get_format("my_fp7") is fmt and "E3M3_TEST" in ag.list_formats()
    with pytest.raises(ValueError, match="already registered"):
        ag.register_format(ag.FloatFormat("E3M3_TEST", 3, 2, 3))


def test_format_table_lists_every_format():
    table = ag.format_table()
    for name in ("E0M7", "E4M3", "E5M2", "E7M0", "FP16", "BF16", "E2M1", "E8M0"):
        assert name in table
    assert "57344" in table and "448" in table
    assert ag.format_table(("E4M3",)).count("\n") == 2


def test_repr_is_readable():
    assert repr(ag.E5M2) == "FloatFormat(E5M2: E5M2, bias=15, max=57344, inf)"
    assert "unsigned" in repr(ag.E8M0)


def test_emax_and_epsilon():
    assert ag.E4M3.emax == 8 and ag.E5M2.emax == 15 and ag.E7M0.emax == 64
    assert ag.E3M4.epsilon == 2**-4
    assert ag.E0M7.emax == -1
