"""Block formats: MX rules against gfloat and exact references, NVFP4, tiles, axes, gradients."""

from __future__ import annotations

import gfloat
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gfloat import formats as gformats
from references import count_compiles, rceil_exponent

import altgrad_jax as ag

MX = {
    "MXFP8_E4M3": gformats.format_info_mxfp8_e4m3,
    "MXFP8_E5M2": gformats.format_info_mxfp8_e5m2,
    "MXFP6_E2M3": gformats.format_info_mxfp6_e2m3,
    "MXFP6_E3M2": gformats.format_info_mxfp6_e3m2,
    "MXFP4": gformats.format_info_mxfp4_e2m1,
}


def _hard_blocks(rng: np.random.Generator, rows: int = 48) -> np.ndarray:
    """Blocks of 32 of wildly different magnitudes, with outliers, tiny, subnormal and zero rows."""
    x = rng.standard_normal((rows, 32)) * np.exp2(rng.integers(-120, 120, (rows, 1)))
    x[1] = 0.0
    x[2, 5] *= 1e4  # one outlier
    x[3] = rng.standard_normal(32) * 2.0**-140  # float32 subnormals: E8M0 scale 2**-127
    x[4] = np.float32(2.0) ** np.arange(-16, 16)  # exact powers of two, all binades
    x[5] = 448.0 * 2.0 ** rng.integers(-3, 3, 32)  # amax exactly at a power-of-two multiple
    return x.astype(np.float32)


@pytest.mark.parametrize("name", sorted(MX))
def test_mx_floor_rule_is_bit_exact_against_gfloat(name):
    fmt = ag.get_format(name).replace(scale_rule="floor")
    x = _hard_blocks(np.random.default_rng(0))
    amax = np.abs(x).max(axis=1)
    # All rows (tiny ones: integer scaling) and the moderate ones (plain float multiplies).
    for rows in (x, x[(amax > 2.0**-90) & (amax < 2.0**90)]):
        ours = np.asarray(jax.jit(lambda v: ag.quantize(v, fmt))(rows))
        ref = np.stack(
            [
                gfloat.quantize_block(MX[name], row.astype(np.float64), gfloat.compute_scale_amax)
                for row in rows
            ]
        ).astype(np.float32)
        np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
        np.testing.assert_array_equal(np.asarray(ag.quantize(rows, fmt)), ours)  # eager == jit


@pytest.mark.parametrize("name", sorted(MX))
def test_rceil_scales_are_the_smallest_that_do_not_saturate(name):
    fmt = ag.get_format(name)
    assert fmt.scale_rule == "rceil"
    x = _hard_blocks(np.random.default_rng(1))
    scales = np.asarray(ag.block_scales(x, fmt))[:, 0]
    for row, scale in zip(x, scales, strict=True):
        amax = float(np.max(np.abs(row)))
        k = rceil_exponent(amax, fmt.element.max_value)
        assert scale == np.float32(2.0**k), (amax, scale, k)
    q = np.asarray(ag.quantize(x, fmt))
    # Nothing saturates, and every element is an element value times its block's scale.
    assert np.all(np.abs(q) <= np.abs(x).max(axis=1, keepdims=True) * 2)
    element_grid = set(ag.grid(fmt.element).tolist())
    for row, scale in zip(q, scales, strict=True):
        assert set((row.astype(np.float64) / float(scale)).tolist()) <= element_grid


def test_the_scale_rules_differ_where_the_spec_says():
    # amax = 150 in E4M3 blocks: rceil gives 2**-1, ceil (OCP) 2**0, floor 2**-1.
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 150.0
    scales = {
        rule: float(ag.block_scales(x, ag.MXFP8_E4M3.replace(scale_rule=rule))[0, 0])
        for rule in ("floor", "ceil", "rceil", "even")
    }
    assert scales == {"floor": 0.5, "ceil": 1.0, "rceil": 0.5, "even": 0.5}
    # E2M1 (max 6 = 1.5 * 2**2): amax 7 is 1.75 * 2**2 -> floor keeps 2**0 and saturates,
    # rceil moves up; "even" rounds 7 to 8 at one mantissa bit first.
    x[0, 0] = 7.0
    got = {r: float(ag.block_scales(x, ag.MXFP4.replace(scale_rule=r))[0, 0]) for r in scales}
    assert got == {"floor": 1.0, "ceil": 2.0, "rceil": 2.0, "even": 2.0}
    assert float(ag.quantize(x, ag.MXFP4.replace(scale_rule="floor"))[0, 0]) == 6.0


def test_e8m0_edge_codes():
    zero = jnp.zeros((1, 32))
    np.testing.assert_array_equal(ag.quantize(zero, ag.MXFP4), zero)
    scale = np.asarray(ag.block_scales(zero, ag.MXFP4))[0, 0]
    assert scale.view(np.uint32) == 0x00400000  # 2**-127, a float32 subnormal
    # E8M0 itself: code 0 is 2**-127, 0xFF is NaN, there is no zero.
    np.testing.assert_array_equal(
        np.asarray(ag.from_bits(jnp.uint8([0, 127, 254, 255]), ag.E8M0)).view(np.uint32),
        np.float32([2.0**-127, 1.0, 2.0**127, np.nan]).view(np.uint32),
    )


def test_nan_and_inf_blocks_become_nan_and_spare_their_neighbours():
    x = np.ones((3, 32), np.float32) * np.float32([[1.0], [2.0], [3.0]])
    x[0, 3] = np.nan
    x[2, 0] = np.inf
    q = np.asarray(ag.quantize(x, ag.MXFP8_E4M3))
    assert np.isnan(q[0]).all() and np.isnan(q[2]).all()
    np.testing.assert_array_equal(q[1], x[1])
    assert np.isnan(np.asarray(ag.block_scales(x, ag.MXFP8_E4M3))[[0, 2], 0]).all()


def test_partial_blocks_any_axis_and_tiles():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((70, 5)) * np.exp2(rng.integers(-8, 8, (70, 1)))).astype(np.float32)
    # 70 = 2 blocks of 32 and a short block of 6, as if zero-padded.
    padded = np.concatenate([x, np.zeros((26, 5), np.float32)])
    np.testing.assert_array_equal(
        ag.quantize(x, ag.MXFP4, axis=0), np.asarray(ag.quantize(padded, ag.MXFP4, axis=0))[:70]
    )
    np.testing.assert_array_equal(
        ag.quantize(x, ag.MXFP4, axis=0), ag.quantize(x.T, ag.MXFP4, axis=-1).T
    )
    assert ag.block_scales(x, ag.MXFP4, axis=0).shape == (3, 5)
    # A 16 x 16 tile shares one scale: the same as a 1-D block of its 256 elements.
    tiles = ag.MXFP8_E4M3.replace(block_size=(16, 16))
    y = (rng.standard_normal((32, 48)) * 3).astype(np.float32)
    q = np.asarray(ag.quantize(y, tiles))
    flat = ag.MXFP8_E4M3.replace(block_size=256)
    for i in range(2):
        for j in range(3):
            tile = y[16 * i : 16 * (i + 1), 16 * j : 16 * (j + 1)]
            expected = np.asarray(ag.quantize(tile.reshape(1, 256), flat)).reshape(16, 16)
            np.testing.assert_array_equal(q[16 * i : 16 * (i + 1), 16 * j : 16 * (j + 1)], expected)
    assert ag.block_scales(y, tiles).shape == (2, 3)


def test_bfloat16_input_and_straight_through_gradient():
    x = jax.random.normal(jax.random.key(0), (4, 64)) * 10
    xb = x.astype(jnp.bfloat16)
    qb = ag.quantize(xb, ag.MXFP4)
    assert qb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        qb.astype(jnp.float32), ag.quantize(xb.astype(jnp.float32), ag.MXFP4)
    )
    grad = jax.jit(jax.grad(lambda v: jnp.sum(ag.quantize(v, ag.NVFP4) * 3.0)))(x)
    np.testing.assert_array_equal(grad, jnp.full_like(x, 3.0))
    batched = jax.vmap(lambda v: ag.quantize(v, ag.MXFP8_E5M2))(x)
    np.testing.assert_array_equal(batched, ag.quantize(x, ag.MXFP8_E5M2))


def _nvfp4_reference(x: np.ndarray) -> np.ndarray:
    """NVFP4 from its formula, with ml_dtypes for the E4M3 and E2M1 roundings (float64 math)."""
    import ml_dtypes

    one = np.float32(1)
    t = np.max(np.abs(x)) * (one / np.float32(448 * 6))  # divisions: times the reciprocal
    out = np.empty_like(x)
    for i in range(0, x.shape[-1], 16):
        block = x[..., i : i + 16]
        ratio = np.max(np.abs(block), axis=-1, keepdims=True) * (one / np.float32(6)) * (one / t)
        s_b = ratio.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
        s_b = np.maximum(s_b, np.float32(2.0**-9))
        s = np.float32(t * s_b)
        scaled = np.clip(block * (np.float32(1) / s), -6, 6)
        out[..., i : i + 16] = scaled.astype(ml_dtypes.float4_e2m1fn).astype(np.float32) * s
    return out


def test_nvfp4_matches_its_formula_and_never_makes_nan_from_finite_input():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((8, 64)) * np.exp2(rng.integers(-10, 10, (8, 1)))).astype(np.float32)
    x[0, :16] *= 1e-30  # a block far below the tensor's range flushes to zero
    q = np.asarray(ag.quantize(x, ag.NVFP4))
    np.testing.assert_array_equal(q, _nvfp4_reference(x))
    assert np.isfinite(q).all()
    np.testing.assert_array_equal(q[0, :16], 0.0)


def test_stochastic_rounding_of_elements_is_unbiased_and_keyed():
    x = jnp.tile(jnp.linspace(0.1, 5.9, 32), (1, 1))
    draws = jax.vmap(lambda k: ag.quantize(x, ag.MXFP4, rounding="stochastic", key=k))(
        jax.random.split(jax.random.key(0), 4000)
    )
    mean = np.asarray(draws.mean(axis=0))
    # 4000 draws: the standard error is at most 2 * 0.5 / sqrt(4000) = 0.016 (gap 2 at 4..6).
    np.testing.assert_allclose(mean, np.asarray(x), atol=4 * 0.016)
    key = jax.random.key(5)
    np.testing.assert_array_equal(
        ag.quantize(x, ag.MXFP4, rounding="stochastic", key=key),
        ag.quantize(x, ag.MXFP4, rounding="stochastic", key=key),
    )
    toward_zero = np.asarray(ag.quantize(x, ag.MXFP4, rounding="toward_zero"))
    assert np.all(np.abs(toward_zero) <= np.abs(np.asarray(x)))


def test_block_formats_are_registered_and_validated():
    assert ag.get_format("mxfp4") is ag.MXFP4 and ag.get_format("NvFp4") is ag.NVFP4
    assert ag.MXFP4.element is ag.E2M1 and ag.MXFP4.scale_format is ag.E8M0
    assert ag.NVFP4.block_size == 16 and ag.NVFP4.tensor_scale
    np.testing.assert_array_equal(ag.grid(ag.MXFP4), ag.grid(ag.E2M1))
    assert "MXFP6_E3M2" in ag.format_table()
    assert hash(ag.MXFP4) == hash(ag.BlockFormat("MXFP4", "E2M1"))
    with pytest.raises(ValueError, match="block_size"):
        ag.BlockFormat("bad", "E4M3", 0)
    with pytest.raises(ValueError, match="scale_rule"):
        ag.BlockFormat("bad", "E4M3", 32, "E8M0", "nearest")
    with pytest.raises(ValueError, match="2-D blocks"):
        ag.quantize(jnp.ones(32), ag.MXFP4.replace(block_size=(4, 8)))
    with pytest.raises(ValueError, match="out of range"):
        ag.quantize(jnp.ones((2, 32)), ag.MXFP4, axis=2)
    with pytest.raises(ValueError, match="scale"):
        ag.quantize(jnp.ones((2, 32)), ag.MXFP4, 0.5)


def test_traced_element_formats_share_one_program_per_layout_and_give_the_static_bits():
    x = _hard_blocks(np.random.default_rng(4), rows=12)
    traced = count_compiles(lambda v, p: (ag.quantize(v, p), ag.block_scales(v, p)))
    run = jax.jit(traced)
    mx = tuple(ag.get_format(name) for name in sorted(MX))
    even = tuple(f.replace(scale_rule="even") for f in (ag.MXFP8_E4M3, ag.MXFP6_E2M3))
    cases = [(mx, f) for f in mx] + [(even, f) for f in even]
    cases += [((ag.NVFP4,), ag.NVFP4), ((ag.FP8_E4M3_1X128,), ag.FP8_E4M3_1X128)]
    for family, fmt in cases:
        q, scales = run(x, fmt.as_arrays(within=family))
        expected = jax.jit(lambda v, f=fmt: (ag.quantize(v, f), ag.block_scales(v, f)))(x)
        np.testing.assert_array_equal(np.asarray(q).view(np.uint32), f32_view(expected[0]))
        np.testing.assert_array_equal(np.asarray(scales), np.asarray(expected[1]))
    assert traced.traces == 4  # MX rceil, MX even, NVFP4, 1x128: one program per layout
    # bfloat16 input where the bounds allow it; any-format params take float32 only.
    xb = jnp.asarray(x[:2]).astype(jnp.bfloat16)
    np.testing.assert_array_equal(
        ag.quantize(xb, ag.MXFP4.as_arrays(within=mx)), ag.quantize(xb, ag.MXFP4)
    )
    with pytest.raises(ValueError, match="float32 input only"):
        ag.quantize(xb, ag.MXFP4.as_arrays())
    with pytest.raises(ValueError, match="layout"):
        ag.MXFP4.as_arrays(within=(ag.NVFP4,))


def f32_view(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)
