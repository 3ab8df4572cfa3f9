"""One bad batch costs its own step: no NaN or inf reaches a history, a scale or a neighbour."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import altgrad_jax as ag
from altgrad_jax.config import QuantConfig, TensorQuant
from altgrad_jax.linen import QUANT_STATE, QuantDense, quant_value_and_grad

CONFIG = QuantConfig("E4M3", "E4M3", TensorQuant("E5M2", scaling="delayed"))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(QuantDense(32, config=CONFIG, name="hidden")(x))
        return QuantDense(4, config=CONFIG, name="out")(x)


def _train(batches, targets):
    """SGD in a jitted lax.scan that skips a step whose gradients are not finite."""
    model = MLP()
    variables = model.init(jax.random.key(0), batches[0])

    def loss_fn(params, state, x, y):
        out, new = model.apply({"params": params, QUANT_STATE: state}, x, mutable=[QUANT_STATE])
        return jnp.mean((out - y) ** 2), new[QUANT_STATE]

    def step(carry, batch):
        params, state = carry
        loss, grads, state = quant_value_and_grad(loss_fn)(params, state, *batch)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        params = jax.tree.map(lambda p, g: jnp.where(finite, p - 0.05 * g, p), params, grads)
        return (params, state), loss

    carry = (variables["params"], variables[QUANT_STATE])
    (_, state), losses = jax.jit(lambda c, b: jax.lax.scan(step, c, b))(carry, (batches, targets))
    return np.asarray(losses), state


def test_a_nan_batch_in_a_scan_costs_exactly_its_step():
    keys = jax.random.split(jax.random.key(1), 2)
    batches = jax.random.normal(keys[0], (8, 16, 8))
    targets = jax.random.normal(keys[1], (8, 16, 4))
    clean, _ = _train(batches, targets)
    bad = batches.at[3, 5, 2].set(jnp.nan)
    # The run with the bad batch inserted at step 3 (and the clean ones after it)...
    inserted = jnp.concatenate([batches[:3], bad[3:4], batches[3:]])
    inserted_targets = jnp.concatenate([targets[:3], targets[3:4], targets[3:]])
    losses, state = _train(inserted, inserted_targets)
    assert np.isnan(losses[3])
    # ... loses that step only: before and after, the clean run's losses, bit for bit.
    np.testing.assert_array_equal(np.delete(losses, 3), clean)
    for layer in ("hidden", "out"):
        for role in ("inputs", "output_grads"):
            assert np.isfinite(state[layer]["dot_general"][role].history).all(), (layer, role)


def test_one_inf_saturates_alone_and_the_scale_stays_finite():
    x = jnp.asarray([jnp.inf, 1.0, 2.0, -3.0])
    history = ag.AmaxHistory.create(4)
    scale, history = ag.scale_and_update(history, x, ag.E4M3, "current")
    assert np.isfinite(float(scale))
    q = jax.jit(lambda x, s: ag.quantize(x, ag.E4M3, s))(x, scale)
    np.testing.assert_array_equal(q[1:], ag.quantize(x[1:], ag.E4M3, scale))
    assert q[0] == np.float32(ag.E4M3.max_value) * np.float32(scale)  # saturated, finite
    # The next clean tensor is not spoiled: the inf never entered the window.
    clean = jnp.asarray([0.5, 1.0, 2.0, -3.0])
    next_scale, _ = ag.scale_and_update(history, clean, ag.E4M3, "current")
    assert float(next_scale) == float(ag.compute_scale(jnp.float32(3.0), ag.E4M3))
