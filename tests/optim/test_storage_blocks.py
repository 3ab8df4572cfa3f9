"""Weights stored in block formats: on the block grid after every step, stall and its rescue."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import altgrad_jax as ag
from altgrad_jax.optim import apply_updates, landed_stats, low_precision_storage

W = jax.random.normal(jax.random.key(0), (64, 16)) * 0.1


def _run(fmt, rule, update, steps):
    opt = low_precision_storage(fmt, rule)
    params, state = {"w": W, "b": W[0]}, opt.init({"w": W, "b": W[0]})
    step = jax.jit(
        lambda p, s: (lambda u, s: (apply_updates(p, u, s), s))(*opt.update(update, s, p))
    )
    history = []
    for _ in range(steps):
        params, state = step(params, state)
        history.append(params)
    return history, state


@pytest.mark.parametrize("fmt", [ag.MXFP4, ag.NVFP4, ag.MXFP8_E4M3])
def test_stored_weights_stay_on_the_block_grid_and_a_zero_update_moves_nothing(fmt):
    zero = {"w": jnp.zeros_like(W), "b": jnp.zeros_like(W[0])}
    history, _ = _run(fmt, "nearest", zero, 3)
    first = history[0]
    np.testing.assert_array_equal(ag.quantize(first["w"], fmt, axis=-2), first["w"])
    np.testing.assert_array_equal(ag.quantize(first["b"], fmt, axis=-1), first["b"])
    for params in history[1:]:
        jax.tree.map(np.testing.assert_array_equal, params, first)


def test_a_constant_tiny_gradient_stalls_in_mxfp4_nearest_and_moves_stochastically():
    tiny = {"w": jnp.full_like(W, 1e-3), "b": jnp.zeros_like(W[0])}
    nearest, state = _run(ag.MXFP4, "nearest", tiny, 20)
    # A block whose maximum crosses a power of two rescales once (a few weights move); after
    # that every update stalls and the stored weights never change again.
    for params in nearest[3:]:
        jax.tree.map(np.testing.assert_array_equal, params, nearest[2])
    assert float(landed_stats(state).run_ratio) < 0.1
    stochastic, state = _run(ag.MXFP4, "stochastic", tiny, 20)
    moved = np.asarray(stochastic[-1]["w"] - stochastic[0]["w"])
    # 19 steps of 1e-3: unbiased, so the mean movement is 0.019 within sampling noise.
    assert abs(moved.mean() - 0.019) < 0.004
    assert 0.8 < float(landed_stats(state).run_ratio) < 1.2


def test_block_format_names_and_rules_reach_the_storage():
    opt = low_precision_storage(ag.PathRules((("b", None),), default="mxfp4"), "nearest")
    params = {"w": W, "b": W[0]}
    state = opt.init(params)
    updates, state = opt.update(jax.tree.map(jnp.zeros_like, params), state, params)
    assert float(jnp.abs(updates["b"]).max()) == 0.0
    np.testing.assert_array_equal(W + updates["w"], ag.quantize(W, ag.MXFP4, axis=-2))
    assert optax.tree_utils.tree_get(state, "LowPrecisionState") is not None
