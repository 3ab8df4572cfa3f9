"""The framework-neutral quantized matmul: exact statistics, traced formats, the state protocol."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import altgrad_jax as ag
from altgrad_jax.config import QuantConfig, TensorQuant
from altgrad_jax.quant_dot import (
    STAT_NAMES,
    QuantDotState,
    QuantStats,
    next_state,
    quantize_output_grad,
    quantized_contract,
    state_names,
    tensor_stats,
)

DOT = functools.partial(lax.dot_general, dimension_numbers=(((1,), (0,)), ((), ())))


def test_tensor_stats_are_exact_counts():
    x = jnp.array([0.0, 1e-6, -1e-6, 1.0, 500.0, -1000.0, jnp.nan, 2.0**-8], jnp.float32)
    q = ag.quantize(x, ag.E4M3)
    stats = tensor_stats(x, q, ag.as_params(ag.E4M3), jnp.float32(1.0))
    # 8 entries, 7 nonzero; 1e-6 twice below 2**-10 -> 0; 500 and 1000 beyond 448; 2**-8 is a
    # subnormal of E4M3 (below 2**-6); one NaN, so the amax is not finite.
    counts = dict(zip(STAT_NAMES, np.asarray(stats.counts).tolist(), strict=True))
    assert counts == {
        "entries": 8,
        "nonzero": 7,
        "underflow": 2,
        "saturated": 2,
        "subnormal": 1,
        "nan": 1,
        "nonfinite_amax": 1,
        "blocks": 0,
        "saturated_blocks": 0,
        "flushed_blocks": 0,
    }
    assert float(stats.underflow) == np.float32(2) / np.float32(7)
    traced = tensor_stats(x, q, ag.format_params(ag.E4M3).as_arrays(), jnp.float32(1.0))
    np.testing.assert_array_equal(traced.counts, stats.counts)


@pytest.mark.parametrize("fmt", [ag.E0M7, ag.E1M6, ag.E8M0, ag.E5M2])
def test_subnormal_count_follows_the_format_min_normal(fmt):
    values = jnp.asarray(ag.grid(fmt), jnp.float32)
    stats = tensor_stats(values, values, ag.format_params(fmt).as_arrays(), jnp.float32(1.0))
    expected = int(np.sum((values != 0) & (np.abs(values) < fmt.min_normal)))
    assert int(stats.count("subnormal")) == expected


def test_stats_add_and_survive_the_float32_probe_exactly():
    big = QuantStats(
        jnp.asarray([2**31 + 12345, 2**24 + 1, 7, 0, 3, 1, 0, 9, 1, 2], jnp.uint32), 0.5
    )
    total = big + big
    np.testing.assert_array_equal(total.counts[:3], np.uint32([24690, 2**25 + 2, 14]))
    assert float(total.scale) == 0.5
    # Probes add as cotangents do; the 16-bit halves keep every count exact.
    back = QuantStats.from_probe(big.to_probe() + big.to_probe())
    np.testing.assert_array_equal(back.counts, total.counts)


@pytest.mark.parametrize("traced", [False, True], ids=["static", "traced"])
@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_output_grad_is_quantized_with_stats_in_the_cotangent(traced, scaling):
    fmt = ag.format_params(ag.E5M2).as_arrays() if traced else ag.E5M2
    tq = TensorQuant(fmt, scaling=scaling, history_len=4)
    y = jnp.linspace(-1.0, 1.0, 7)
    dy = jnp.array([1e-10, 0.3, -0.7, 1.1, 0.0, 2.5, -3.3], jnp.float32)
    history = ag.AmaxHistory.create(4).record(jnp.float32(8.0)) if scaling == "delayed" else None
    probe = QuantStats.zeros().to_probe()

    def f(y, history, probe):
        return jnp.sum(quantize_output_grad(y, tq, history, None, probe) * dy)

    grad_y, history_ct, probe_ct = jax.jit(jax.grad(f, argnums=(0, 1, 2), allow_int=True))(
        y, history, probe
    )
    amax = 8.0 if scaling == "delayed" else 3.3
    scale = ag.compute_scale(jnp.float32(amax), ag.E5M2)
    expected = ag.quantize(dy, ag.E5M2, scale)
    np.testing.assert_array_equal(grad_y, expected)
    stats = QuantStats.from_probe(probe_ct)
    want = tensor_stats(dy, expected, ag.as_params(ag.E5M2), scale)
    np.testing.assert_array_equal(stats.counts, want.counts)
    assert float(stats.scale) == float(scale)
    if scaling == "delayed":
        np.testing.assert_array_equal(history_ct.history, np.float32([3.3, 0, 0, 0]))


def test_traced_formats_give_the_static_bits_forward_and_backward_in_one_program():
    x = jax.random.normal(jax.random.key(0), (4, 6)) * 3
    w = jax.random.normal(jax.random.key(1), (6, 5))
    dy = jax.random.normal(jax.random.key(2), (4, 5))

    def run(config, x, w):
        state = QuantDotState.create(config)

        def f(x, w):
            y, _, stats = quantized_contract(DOT, x, w, config, state, None)
            return jnp.sum(y * dy), (y, stats)

        (_, (y, stats)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(x, w)
        return y, grads, stats

    @jax.jit
    @chex.assert_max_traces(n=1)
    def traced_run(forward, backward, x, w):
        return run(QuantConfig(forward, forward, backward, stats=True), x, w)

    for forward, backward in (("E4M3", "E5M2"), ("E3M4", "E2M5")):
        static = run(QuantConfig(forward, forward, backward, stats=True), x, w)
        traced = traced_run(
            ag.format_params(ag.get_format(forward)).as_arrays(),
            ag.format_params(ag.get_format(backward)).as_arrays(),
            x,
            w,
        )
        for a, b in zip(jax.tree.leaves(static), jax.tree.leaves(traced), strict=True):
            np.testing.assert_array_equal(a, b)


def test_state_has_an_entry_per_role_and_next_state_records_the_gradient_amax():
    config = QuantConfig(
        inputs="E4M3",
        weights=None,
        output_grads=TensorQuant("E5M2", scaling="delayed", history_len=3),
        stats=True,
    )
    assert state_names(config) == ("inputs", "output_grads", "output_grads_stats")
    state = QuantDotState.create(config)
    assert state.weights is None and state.inputs.history_len == 16
    x, w = jnp.ones((2, 3)), jnp.full((3, 2), 2.0)

    def loss(state):
        y, new_state, _ = quantized_contract(DOT, x, w, config, state, None)
        return jnp.sum(y) * 4.0, new_state

    (_, forward), cotangent = jax.value_and_grad(loss, has_aux=True, allow_int=True)(state)
    after = next_state(forward, cotangent)
    assert int(after.inputs.count) == 1 and float(after.inputs.history[0]) == 1.0
    assert int(after.output_grads.count) == 1 and float(after.output_grads.history[0]) == 4.0
    assert int(after.grad_stats.count("entries")) == 4


def test_stochastic_roles_need_a_key():
    config = QuantConfig.uniform(rounding="stochastic")
    with pytest.raises(ValueError, match="RNG stream 'quant'"):
        quantized_contract(
            DOT, jnp.ones((2, 3)), jnp.ones((3, 2)), config, QuantDotState.create(config), None
        )
