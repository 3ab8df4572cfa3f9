"""NNX QuantLinear / QuantEinsum: same numbers as Linen, state filtering, jit, stats, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import altgrad_jax as ag
from altgrad_jax import linen as qlinen
from altgrad_jax import nnx as qnnx
from altgrad_jax.config import QuantConfig, TensorQuant

DELAYED = QuantConfig(
    inputs=TensorQuant("E4M3", scaling="delayed", history_len=4),
    weights="E3M4",
    output_grads=TensorQuant("E5M2", scaling="delayed", history_len=4),
)
GRAD_ROW = [1000.0, 1e-8, -1e-9, 5e-7, -8e-7, 1.0, 2.0, 3.0]
BATCHES = [jax.random.normal(jax.random.key(i), (4, 5)) * f for i, f in enumerate((1, 30, 0.1))]


def _linen_steps(layer, nnx_layer):
    """Runs three helper steps of the Linen layer; yields (loss, grads, state) per step."""
    params = {"kernel": nnx_layer.kernel[...], "bias": nnx_layer.bias[...]}
    state = layer.init(jax.random.key(0), BATCHES[0])[qlinen.QUANT_STATE]

    def loss_fn(params, state, x):
        y, updates = layer.apply(
            {"params": params, qlinen.QUANT_STATE: state}, x, mutable=[qlinen.QUANT_STATE]
        )
        return jnp.sum(jnp.sin(y)), updates[qlinen.QUANT_STATE]

    for x in BATCHES:
        loss, grads, state = qlinen.quant_value_and_grad(loss_fn)(params, state, x)
        yield loss, grads, state


@pytest.mark.parametrize("config", [QuantConfig(), DELAYED], ids=["current", "delayed"])
@pytest.mark.parametrize("kind", ["linear", "einsum"])
def test_linen_and_nnx_agree(config, kind):
    rngs = nnx.Rngs(0)
    if kind == "linear":
        model = qnnx.QuantLinear(5, 3, config=config, rngs=rngs)
        layer = qlinen.QuantDense(3, config=config)
    else:
        model = qnnx.QuantEinsum("bi,io->bo", (5, 3), (3,), config=config, rngs=rngs)
        layer = qlinen.QuantEinsum((5, 3), "bi,io->bo", config=config)
    model.bias.set_value(jnp.linspace(-1, 1, 3))
    step = qnnx.quant_value_and_grad(lambda m, x: jnp.sum(jnp.sin(m(x))))
    for x, (loss, grads, state) in zip(BATCHES, _linen_steps(layer, model), strict=True):
        nnx_loss, nnx_grads, nnx_state = step(model, x)
        assert nnx_loss == loss
        np.testing.assert_array_equal(nnx_grads["kernel"][...], grads["kernel"])
        np.testing.assert_array_equal(nnx_grads["bias"][...], grads["bias"])
        linen_state = state["dot_general" if kind == "linear" else "einsum_op"]
        for role, history in linen_state.items():
            op = "dot_general" if kind == "linear" else "einsum_op"
            nnx_history = nnx_state[op][role].get_value()
            np.testing.assert_array_equal(nnx_history.history, history.history)
            assert nnx_history.count == history.count
    assert ("output_grads" in linen_state) == (config is DELAYED)


def test_histories_are_a_filterable_variable_type():
    model = qnnx.QuantLinear(5, 3, config=DELAYED, rngs=nnx.Rngs(0))
    assert set(nnx.state(model, qnnx.QuantState)["dot_general"]) == {
        "inputs",
        "weights",
        "output_grads",
    }
    assert set(nnx.state(model, qnnx.OutputGradState)["dot_general"]) == {"output_grads"}
    assert set(nnx.state(model, nnx.Param)) == {"kernel", "bias"}
    model(BATCHES[1])
    assert int(model.dot_general.inputs.get_value().count) == 1
    assert int(model.dot_general.output_grads.get_value().count) == 0  # only the helper records it


class MLP(nnx.Module):
    def __init__(self, config, rngs):
        self.hidden = qnnx.QuantLinear(8, 32, config=config, rngs=rngs)
        self.out = qnnx.QuantLinear(32, 1, config=config, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def _histories(model):
    """Copies of the model's amax history arrays."""
    state = nnx.state(model, qnnx.QuantState)
    is_history = lambda n: isinstance(n, ag.AmaxHistory)  # noqa: E731
    return [np.array(h.history) for h in jax.tree.leaves(state, is_leaf=is_history)]


def _loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def test_nnx_jit_and_jax_jit_over_split_state_agree():
    w_true = jax.random.normal(jax.random.key(0), (8, 1))
    a = MLP(DELAYED, nnx.Rngs(1))
    b = MLP(DELAYED, nnx.Rngs(1))
    optimizer = nnx.Optimizer(a, optax.adam(1e-2), wrt=nnx.Param)
    traces = []

    @nnx.jit
    def nnx_step(model, optimizer, x):
        traces.append("nnx")
        loss, grads, _ = qnnx.quant_value_and_grad(_loss)(model, x, x @ w_true)
        optimizer.update(model, grads)
        return loss

    tx = optax.adam(1e-2)
    graphdef, params, rest = nnx.split(b, nnx.Param, ...)
    opt_state = tx.init(params)

    @jax.jit
    def jax_step(params, rest, opt_state, x):
        traces.append("jax")
        model = nnx.merge(graphdef, params, rest)
        loss, grads, _ = qnnx.quant_value_and_grad(_loss)(model, x, x @ w_true)
        updates, opt_state = tx.update(grads, opt_state, params)
        _, _, rest = nnx.split(model, nnx.Param, ...)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    losses = []
    for key in jax.random.split(jax.random.key(2), 40):
        x = jax.random.normal(key, (64, 8))
        before = _histories(a)
        loss_a = nnx_step(a, optimizer, x)
        params, rest, opt_state, loss_b = jax_step(params, rest, opt_state, x)
        assert loss_a == loss_b
        for old, new in zip(before, _histories(a), strict=True):
            assert not np.array_equal(old, new)
        losses.append(float(loss_a))
    assert traces == ["nnx", "jax"]
    assert np.mean(losses[-5:]) < 0.2 * np.mean(losses[:5])
    nnx.update(b, params, rest)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(a), nnx.state(b))


def test_quant_stats_method():
    config = QuantConfig.uniform("E4M3", None, scaling="delayed", stats=True)
    layer = qnnx.QuantLinear(10, 1, use_bias=False, config=config, rngs=nnx.Rngs(0))
    assert set(layer.quant_stats()) == {"inputs", "weights"}
    s0 = np.float32(1.0) * (np.float32(1.01) / np.float32(448))
    scaled = [500, -1000, 1e6, 600, 1e-5, -1e-6, 0.004, -0.01, np.nan, 3.0]
    layer(jnp.ones((1, 10)))  # one step of amax 1.0: the delayed window then gives s0
    layer(jnp.asarray([scaled], jnp.float32) * s0)
    stats = layer.quant_stats()["inputs"]
    fractions = (stats.saturated, stats.underflow, stats.subnormal, stats.nan, stats.scale)
    np.testing.assert_array_equal(fractions, np.float32([0.4, 0.2, 0.2, 0.1, s0]))
    assert qnnx.QuantLinear(2, 2, rngs=nnx.Rngs(0)).quant_stats() == {}


def test_stochastic_rounding_needs_an_rng_stream():
    config = QuantConfig.uniform(rounding="stochastic")
    with pytest.raises(ValueError, match="'quant'"):
        qnnx.QuantLinear(5, 3, config=config, rngs=nnx.Rngs(params=0))
    x = BATCHES[0]
    layer = qnnx.QuantLinear(5, 3, config=config, rngs=nnx.Rngs(params=0, quant=1))
    twin = qnnx.QuantLinear(5, 3, config=config, rngs=nnx.Rngs(params=0, quant=1))
    first = layer(x)
    np.testing.assert_array_equal(first, twin(x))
    assert not np.array_equal(first, layer(x))  # the stream advances
    assert qnnx.QuantLinear(5, 3, config=config, rngs=nnx.Rngs(0))(x).shape == (4, 3)


def test_forward_equals_formula():
    layer = qnnx.QuantLinear(5, 3, config=QuantConfig(weights="E2M3"), rngs=nnx.Rngs(0))
    x = BATCHES[1]
    kernel = layer.kernel[...]
    factor = np.float32(1.01) / np.float32(448)
    sx = np.float32(np.abs(x).max()) * factor
    sw = np.float32(np.abs(kernel).max()) * (np.float32(1.01) / np.float32(ag.E2M3.max_value))
    expected = jnp.dot(ag.quantize(x, "E4M3", sx), ag.quantize(kernel, "E2M3", sw))
    np.testing.assert_array_equal(layer(x), expected + layer.bias[...])


def test_output_gradient_statistics_after_a_helper_step():
    config = QuantConfig(inputs=None, weights=None, stats=True)
    layer = qnnx.QuantLinear(8, 8, use_bias=False, config=config, rngs=nnx.Rngs(0))
    layer.kernel.set_value(jnp.eye(8))
    cotangent = jnp.zeros((8, 8)).at[0].set(jnp.asarray(GRAD_ROW))
    qnnx.quant_value_and_grad(lambda m: jnp.sum(m(jnp.eye(8)) * cotangent))(layer)
    stats = layer.quant_stats()
    assert set(stats) == {"output_grads"}
    values = [getattr(stats["output_grads"], f) for f in ("saturated", "underflow", "subnormal")]
    scale = np.float32(1000.0) * (np.float32(1.01) / np.float32(ag.E5M2.max_value))
    np.testing.assert_array_equal(
        [*values, stats["output_grads"].nan, stats["output_grads"].scale],
        np.float32([0, 2 / 8, 2 / 64, 0, scale]),
    )


def test_helper_passes_aux_through():
    layer = qnnx.QuantLinear(5, 3, rngs=nnx.Rngs(0))
    x = BATCHES[0]
    (loss, y), grads, state = qnnx.quant_value_and_grad(
        lambda m: (jnp.sum(m(x) ** 2), m(x)), has_aux=True
    )(layer)
    assert loss == jnp.sum(y**2)
    assert set(grads) == {"kernel", "bias"}
    assert int(state["dot_general"]["inputs"].get_value().count) == 2  # two forward calls
