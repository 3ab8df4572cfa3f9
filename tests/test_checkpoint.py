"""Params + quant state (+ optimizer state) round-trip through flax.serialization, and training
continues bit-identically from the restored copy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, serialization

from altgrad_jax.config import QuantConfig, TensorQuant
from altgrad_jax.linen import QUANT_STATE, QuantDense, quant_value_and_grad
from altgrad_jax.nnx import QuantLinear
from altgrad_jax.nnx import quant_value_and_grad as nnx_quant_value_and_grad

CONFIG = QuantConfig(
    inputs=TensorQuant("E4M3", history_len=4, amax_algorithm="most_recent"),
    weights=TensorQuant("E4M3", scaling="delayed"),
    output_grads=TensorQuant("E5M2", scaling="delayed", history_len=8),
)
W_TRUE = jax.random.normal(jax.random.key(0), (8, 2))
BATCHES = [jax.random.normal(k, (16, 8)) for k in jax.random.split(jax.random.key(1), 6)]


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return QuantDense(2, config=CONFIG)(nn.relu(QuantDense(16, config=CONFIG)(x)))


TX = optax.adam(1e-2)


def loss_fn(params, state, x):
    out, updates = MLP().apply({"params": params, QUANT_STATE: state}, x, mutable=[QUANT_STATE])
    return jnp.mean((out - x @ W_TRUE) ** 2), updates[QUANT_STATE]


@jax.jit
def train_step(checkpoint, x):
    loss, grads, state = quant_value_and_grad(loss_fn)(
        checkpoint["params"], checkpoint[QUANT_STATE], x
    )
    updates, opt_state = TX.update(grads, checkpoint["opt_state"])
    params = optax.apply_updates(checkpoint["params"], updates)
    return {"params": params, QUANT_STATE: state, "opt_state": opt_state}, loss


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_linen_checkpoint_round_trip_continues_bit_identically():
    variables = MLP().init(jax.random.key(2), BATCHES[0])
    fresh = {**variables, "opt_state": TX.init(variables["params"])}
    checkpoint = fresh
    for x in BATCHES[:3]:
        checkpoint, _ = train_step(checkpoint, x)

    restored = serialization.from_bytes(fresh, serialization.to_bytes(checkpoint))
    _assert_identical(restored, checkpoint)
    history = restored[QUANT_STATE]["QuantDense_0"]["dot_general"]["inputs"]
    assert history.algorithm == "most_recent" and int(history.count) == 3

    for x in BATCHES[3:]:
        checkpoint, loss = train_step(checkpoint, x)
        restored, restored_loss = train_step(restored, x)
        assert loss == restored_loss
    _assert_identical(restored, checkpoint)


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = QuantLinear(8, 16, config=CONFIG, rngs=rngs)
        self.out = QuantLinear(16, 2, config=CONFIG, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


@nnx.jit
def nnx_step(model, optimizer, x):
    def loss(model):
        return jnp.mean((model(x) - x @ W_TRUE) ** 2)

    value, grads, _ = nnx_quant_value_and_grad(loss)(model)
    optimizer.update(model, grads)
    return value


def test_nnx_checkpoint_round_trip_continues_bit_identically():
    model = NNXMLP(nnx.Rngs(3))
    optimizer = nnx.Optimizer(model, TX, wrt=nnx.Param)
    for x in BATCHES[:3]:
        nnx_step(model, optimizer, x)

    saved = serialization.to_bytes(nnx.to_pure_dict(nnx.state((model, optimizer))))
    twin = NNXMLP(nnx.Rngs(4))
    twin_optimizer = nnx.Optimizer(twin, TX, wrt=nnx.Param)
    state = nnx.state((twin, twin_optimizer))
    nnx.replace_by_pure_dict(state, serialization.from_bytes(nnx.to_pure_dict(state), saved))
    nnx.update((twin, twin_optimizer), state)
    _assert_identical(nnx.state((twin, twin_optimizer)), nnx.state((model, optimizer)))

    for x in BATCHES[3:]:
        assert nnx_step(model, optimizer, x) == nnx_step(twin, twin_optimizer, x)
    _assert_identical(nnx.state(twin), nnx.state(model))
