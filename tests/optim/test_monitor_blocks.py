"""Stall monitor with block formats: counts against the block grid, against a reference."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from references import rceil_exponent

import altgrad_jax as ag
from altgrad_jax.optim import (
    HISTOGRAM_EDGES,
    HISTOGRAM_LABELS,
    low_precision_storage,
    monitor_stall,
    stall_stats,
)

ELEMENTS = {"E2M1": ml_dtypes.float4_e2m1fn, "E4M3": ml_dtypes.float8_e4m3fn}
TILES = ag.MXFP8_E4M3.replace(name="MXFP8_TILES", block_size=(8, 16))


def _element_ulp(e: np.ndarray, dtype) -> np.ndarray:
    """An element format's ULP at |e| from ml_dtypes' limits: 2**(max(floor(log2|e|), emin) - M)."""
    info = ml_dtypes.finfo(dtype)
    emin = math.log2(float(info.smallest_normal))
    with np.errstate(divide="ignore"):
        exponent = np.maximum(np.floor(np.log2(np.abs(e.astype(np.float64)))), emin)
    return np.exp2(exponent - info.nmant)


def _reference_grid(x: np.ndarray, fmt: ag.BlockFormat) -> tuple[np.ndarray, np.ndarray]:
    """(Q(x), spacing) on the storage's block grid, by the formulas, in numpy and ml_dtypes.

    1-D blocks run along axis -2 of a kernel (the only axis of a vector), tiles over the last two
    axes; every case is seen as 2-D ``(rows, cols)`` tiles of a zero-padded matrix.
    """
    x = np.asarray(x, np.float32)
    if len(fmt.block_shape) == 2:
        matrix, tile = x, fmt.block_shape
    else:
        axis = -2 if x.ndim >= 2 else -1
        matrix, tile = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1), (fmt.block_size, 1)
    rows, cols = (-(-n // t) * t for n, t in zip(matrix.shape, tile, strict=True))
    padded = np.zeros((rows, cols), np.float32)
    padded[: matrix.shape[0], : matrix.shape[1]] = matrix
    blocks = padded.reshape(rows // tile[0], tile[0], cols // tile[1], tile[1]).swapaxes(1, 2)
    amax = np.abs(blocks).max(axis=(2, 3), keepdims=True)
    dtype = ELEMENTS[fmt.element.name]
    if fmt.tensor_scale:  # NVFP4: float32 tensor scale, E4M3 block scale (clamped to 2**-9)
        one = np.float32(1)  # divisions by a scalar: times its float32 reciprocal
        t = np.abs(x).max() * (one / np.float32(448 * 6))
        ratio = amax * (one / np.float32(6)) * (one / t)
        s_b = np.maximum(ratio.astype(ml_dtypes.float8_e4m3fn).astype(np.float32), 2.0**-9)
        s = (t * s_b).astype(np.float32)
        scaled = np.clip(blocks * (np.float32(1) / s), -6, 6)
    else:
        k = np.vectorize(lambda a: rceil_exponent(float(a), fmt.element.max_value))(amax)
        s = np.exp2(k.astype(np.float64))
        scaled = blocks.astype(np.float64) / s
    elements = scaled.astype(dtype)
    q = (elements.astype(np.float64) * s).astype(np.float32)
    spacing = (_element_ulp(elements, dtype) * s).astype(np.float32)

    def back(v: np.ndarray) -> np.ndarray:
        v = v.swapaxes(1, 2).reshape(rows, cols)[: matrix.shape[0], : matrix.shape[1]]
        if len(fmt.block_shape) == 2:
            return v
        moved = np.moveaxis(x, -2 if x.ndim >= 2 else -1, 0).shape
        return np.moveaxis(v.reshape(moved), 0, -2 if x.ndim >= 2 else -1)

    return back(q), back(spacing)


def _direct_stats(w, u, g, fmt):
    """Every statistic of one leaf, with Q(w) and Q(w + u) each on its own blocks' grid."""
    w, u, g = (np.asarray(v, np.float32) for v in (w, u, g))
    old, spacing = _reference_grid(w, fmt)
    new, _ = _reference_grid(w + u, fmt)
    flipped, counted = new != old, np.abs(g) > 1e-10
    level = sum(np.abs(u) >= edge * spacing for edge in HISTOGRAM_EDGES)
    bins = np.where(u != 0, 1 + level, 0).ravel()
    counts = [np.sum(counted & ~flipped), np.sum(counted), np.sum(flipped), np.sum(u != 0), u.size]
    histogram = np.bincount(bins, minlength=len(HISTOGRAM_LABELS))
    return counts, histogram, np.sum(np.abs(new - old)), np.sum(np.abs(u))


def _leaves(seed: int) -> tuple[dict, dict, dict]:
    """A kernel with a short last block, a vector, a conv kernel; magnitudes vary per column
    (numpy draws: eager jax.random would compile a program per shape)."""
    rng = np.random.default_rng(seed)
    shapes = {"kernel": (70, 24), "bias": (40,), "conv": (3, 3, 20, 8)}
    w, u, g = {}, {}, {}
    for name, shape in shapes.items():
        spread = np.exp2(rng.integers(-6, 6, shape[-1:])).astype(np.float32)
        w[name] = (rng.standard_normal(shape) * spread).astype(np.float32)
        w[name][(0,) * len(shape)] = 0.0
        u[name] = (rng.standard_normal(shape) * 0.05 * spread).astype(np.float32)
        u[name].flat[::5] = 0.0
        g[name] = rng.standard_normal(shape).astype(np.float32)
        g[name][(1,) * len(shape)] = 0.0
    return w, u, g


def test_every_statistic_matches_a_direct_block_grid_computation():
    """One program for every format: path rules give each group of leaves its own format."""
    formats = {f.name: f for f in (ag.MXFP4, ag.MXFP8_E4M3, ag.NVFP4, TILES)}
    w, u, g = {}, {}, {}
    for i, (name, fmt) in enumerate(formats.items()):
        leaves = _leaves(i)
        if fmt is not ag.MXFP4:  # every leaf shape once; the kernel for the other formats
            leaves = tuple({"kernel": tree["kernel"]} for tree in leaves)
        w[name], u[name], g[name] = leaves
    rules = ag.PathRules(tuple((f"^{name}/", fmt) for name, fmt in formats.items()))
    opt = monitor_stall(optax.stateless(lambda updates, params: u), rules)
    _, state = jax.jit(opt.update)(g, opt.init(w), w)
    for name, fmt in formats.items():
        for leaf_name in w[name]:
            leaf = stall_stats(state).leaf_last[name][leaf_name]
            args = (w[name][leaf_name], u[name][leaf_name], g[name][leaf_name], fmt)
            counts, histogram, landed, requested = _direct_stats(*args)
            where = f"{name}/{leaf_name}"
            fields = ("stalled", "counted", "flipped", "moved", "entries")
            assert [int(getattr(leaf, f)) for f in fields] == [int(c) for c in counts], where
            assert 0 < counts[0] < counts[1], where  # some updates stall, some do not
            np.testing.assert_array_equal(np.asarray(leaf.histogram), histogram, err_msg=where)
            np.testing.assert_allclose(float(leaf.landed), landed, rtol=1e-5, err_msg=where)
            np.testing.assert_allclose(float(leaf.requested), requested, rtol=1e-5)


def test_a_constant_tiny_gradient_stalls_in_mxfp4_and_flips_are_stored_weights_that_moved():
    """Around a chain ending in nearest MXFP4 storage, from weights on the block grid."""
    opt = monitor_stall(
        optax.chain(optax.sgd(1.0), low_precision_storage(ag.MXFP4, "nearest")), ag.MXFP4
    )

    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        # E2M1 has 2 exponent bits: w + (t - w) is exactly t, plain optax lands on the grid.
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(1)
    params = {"w": ag.quantize(rng.standard_normal((64, 16), np.float32), ag.MXFP4, axis=-2)}
    state = opt.init(params)
    random = {"w": rng.standard_normal((64, 16), np.float32) * np.float32(0.05)}
    tiny = {"w": jnp.full((64, 16), 1e-3)}
    changes = []
    for grads in (random, *[tiny] * 4):
        new, state = step(params, state, grads)
        stats = stall_stats(state).last
        changed = int(jnp.sum(new["w"] != params["w"]))
        assert int(stats.flipped) == changed and int(stats.stalled) == 64 * 16 - changed
        changes.append(changed)
        params = new
    assert changes[0] > 0
    # -1e-3 is far below half of any block's spacing; only a block maximum that grows past
    # 6 * 2**k rescales its block (once). Then every update stalls.
    assert changes[-2:] == [0, 0] and float(stats.stall_rate) == 1.0


def test_every_k_steps_with_a_block_format_add_up_to_one_dense_step():
    w, _, g = ({"kernel": tree["kernel"]} for tree in _leaves(3))
    dense = monitor_stall(optax.sgd(0.01), ag.MXFP4)
    sampled = monitor_stall(optax.sgd(0.01), ag.MXFP4, every=3)
    _, dense_state = jax.jit(dense.update)(g, dense.init(w), w)
    update, state = jax.jit(sampled.update), sampled.init(w)
    for _ in range(3):
        _, state = update(g, state, w)
    expected, got = stall_stats(dense_state).last, stall_stats(state).total
    for field in ("stalled", "counted", "flipped", "moved", "entries"):
        assert int(getattr(got, field)) == int(getattr(expected, field)), field
