"""Runs in its own process with 8 simulated CPU devices (see test_sharding.py).

Trains a quantized Linen MLP for a few steps on one device, data-parallel over 8 devices and
data x model parallel over a 2 x 4 mesh, and checks that the numbers agree and that the amax
recorded under sharding is the global one; then runs monitored Adam into stochastic storage on
the model-sharded weights, and an MXFP4 layer with its contraction axis sharded. Prints OK on
success.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from altgrad_jax.config import QuantConfig, TensorQuant
from altgrad_jax.linen import QUANT_STATE, QuantDense, quant_value_and_grad
from altgrad_jax.optim import apply_updates, low_precision_storage, monitor_stall, stall_stats

CONFIG = QuantConfig(output_grads=TensorQuant("E5M2", scaling="delayed"))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(QuantDense(64, config=CONFIG, name="hidden")(x))
        return QuantDense(8, config=CONFIG, name="out")(x)


MODEL = MLP()


def loss_fn(params, state, x, y):
    out, updates = MODEL.apply({"params": params, QUANT_STATE: state}, x, mutable=[QUANT_STATE])
    return jnp.mean((out - y) ** 2), updates[QUANT_STATE]


@jax.jit
def train_step(params, state, x, y):
    loss, grads, state = quant_value_and_grad(loss_fn)(params, state, x, y)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return params, state, loss


def run(variables, batches, put_params=lambda t: t, put_batch=lambda t: t):
    params, state = put_params(variables["params"]), variables[QUANT_STATE]
    losses = []
    for x, y in batches:
        params, state, loss = train_step(params, state, put_batch(x), put_batch(y))
        losses.append(loss)
    return params, state, losses


def optimizer_run(params, grads, every):
    """Three steps of monitored Adam into stochastic E5M2 storage; the params and the monitor."""
    opt = optax.chain(
        monitor_stall(optax.adam(0.05), "e5m2", every=every),
        low_precision_storage("e5m2", "stochastic"),
    )

    @jax.jit
    def step(params, state):
        updates, state = opt.update(grads, state, params)
        return apply_updates(params, updates, state), state

    state = opt.init(params)
    for _ in range(3):
        params, state = step(params, state)
    return params, stall_stats(state)


def check_optimizer(variables, put_params):
    """Sharded weights give the same stored weights and the same stall counts, bit for bit."""
    params = variables["params"]
    grads = jax.tree.map(
        lambda p: jnp.cos(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape), params
    )
    for every in (1, 3):
        reference = optimizer_run(params, grads, every)
        sharded = optimizer_run(put_params(params), put_params(grads), every)
        assert len(sharded[0]["hidden"]["kernel"].sharding.device_set) == 8
        jax.tree.map(np.testing.assert_array_equal, sharded[0], reference[0])
        np.testing.assert_array_equal(sharded[1].total.counts.low, reference[1].total.counts.low)
        np.testing.assert_allclose(sharded[1].total.landed, reference[1].total.landed, rtol=1e-6)


def check_block_formats():
    """MXFP4 with the contraction axis (K = 256, 8 blocks of 32) sharded over 8 devices: each
    shard holds whole blocks, and forward and gradients equal one device bit for bit."""
    config = QuantConfig("MXFP4", "MXFP4", "MXFP8_E5M2")
    layer = QuantDense(16, config=config)
    x = jax.random.normal(jax.random.key(7), (64, 256)) * 4
    variables = layer.init(jax.random.key(8), x)

    @jax.jit
    def value_and_grads(params, x):
        return jax.value_and_grad(
            lambda p, x: jnp.sum(jnp.sin(layer.apply({"params": p}, x))), argnums=(0, 1)
        )(params, x)

    reference = value_and_grads(variables["params"], x)
    mesh = Mesh(np.array(jax.devices()), ("k",))
    sharded_x = jax.device_put(x, NamedSharding(mesh, P(None, "k")))
    sharded_params = {
        "kernel": jax.device_put(variables["params"]["kernel"], NamedSharding(mesh, P("k"))),
        "bias": variables["params"]["bias"],
    }
    result = value_and_grads(sharded_params, sharded_x)
    jax.tree.map(np.testing.assert_array_equal, result, reference)


def main():
    assert jax.device_count() == 8, jax.devices()
    check_block_formats()
    keys = jax.random.split(jax.random.key(0), 8)
    batches = [
        (jax.random.normal(keys[i], (32, 16)) * (i + 1), jax.random.normal(keys[i + 4], (32, 8)))
        for i in range(3)
    ]
    variables = MODEL.init(jax.random.key(1), batches[0][0])
    reference = run(variables, batches)

    data_mesh = Mesh(np.array(jax.devices()), ("data",))
    dp = run(
        variables,
        batches,
        put_batch=lambda t: jax.device_put(t, NamedSharding(data_mesh, P("data"))),
    )

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    specs = {
        "hidden": {"kernel": P(None, "model"), "bias": P("model")},
        "out": {"kernel": P("model", None), "bias": P()},
    }

    def put_params(params):
        return jax.tree.map(
            lambda p, s: jax.device_put(p, NamedSharding(mesh, s)),
            params,
            specs,
            is_leaf=lambda n: isinstance(n, P),
        )

    mp = run(
        variables,
        batches,
        put_params=put_params,
        put_batch=lambda t: jax.device_put(t, NamedSharding(mesh, P("data"))),
    )
    assert len(mp[0]["hidden"]["kernel"].sharding.device_set) == 8

    for name, (params, state, losses) in (("data", dp), ("model", mp)):
        np.testing.assert_allclose(losses, reference[2], rtol=1e-5, err_msg=name)
        jax.tree.map(
            lambda a, b, n=name: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=n),
            (params, state),
            reference[:2],
        )
        # The recorded input amax is the max over the whole (sharded) batch, bit for bit.
        recorded = state["hidden"]["dot_general"]["inputs"].history[:3]
        expected = [float(jnp.max(jnp.abs(x))) for x, _ in batches[::-1]]
        np.testing.assert_array_equal(recorded, np.float32(expected), err_msg=name)
    check_optimizer(variables, put_params)
    print("OK")


if __name__ == "__main__":
    main()
