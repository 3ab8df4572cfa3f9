"""Linen QuantDotGeneral / QuantDense / QuantEinsum against the formulas they promise."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import altgrad_jax as ag
from altgrad_jax.config import QuantConfig, TensorQuant
from altgrad_jax.linen import (
    QUANT_STATE,
    QUANT_STATS,
    QuantDense,
    QuantDotGeneral,
    QuantEinsum,
    quant_value_and_grad,
)
from altgrad_jax.quant_dot import QuantStats


def expected_scale(amaxes, scaling, window=16, fmt=ag.E4M3, margin=1.01, empty=None):
    """The documented scale, from the list of amaxes seen so far (this tensor's last).

    ``amax * (margin / max_value)`` with the factor rounded once to float32, as compute_scale
    documents. An empty window (delayed scaling's first step) scales from this tensor.
    """
    seen = amaxes if scaling == "current" else amaxes[:-1]
    recent = seen[-window:]
    if empty is None:  # scale_and_update: an empty window scales from this tensor
        empty = amaxes[-1]
    amax = np.float32(max(recent)) if recent else np.float32(empty)
    factor = np.float32(margin) / np.float32(fmt.max_value)
    return max(amax * factor, np.float32(1e-10))


def amax(x):
    return float(np.max(np.abs(np.asarray(x))))


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_dense_forward_equals_formula_over_steps(scaling):
    config = QuantConfig.uniform(scaling=scaling, history_len=2)
    layer = QuantDense(6, config=config)
    keys = jax.random.split(jax.random.key(0), 5)
    xs = [
        jax.random.normal(k, (4, 5)) * f
        for k, f in zip(keys, (1.0, 7.0, 0.1, 2.0, 0.5), strict=True)
    ]
    variables = layer.init(jax.random.key(1), xs[0])
    params, state = variables["params"], variables[QUANT_STATE]
    x_amaxes, w_amaxes = [], []
    for step, x in enumerate(xs):
        params = jax.tree.map(lambda p, s=step: p * (1.0 + 0.5 * s), params)
        y, updates = layer.apply({"params": params, QUANT_STATE: state}, x, mutable=[QUANT_STATE])
        state = updates[QUANT_STATE]
        x_amaxes.append(amax(x))
        w_amaxes.append(amax(params["kernel"]))
        sx = expected_scale(x_amaxes, scaling, window=2)
        sw = expected_scale(w_amaxes, scaling, window=2)
        qx = ag.quantize(x, ag.E4M3, sx)
        qw = ag.quantize(params["kernel"], ag.E4M3, sw)
        np.testing.assert_array_equal(y, jnp.dot(qx, qw) + params["bias"])
        history = state["dot_general"]["inputs"]
        np.testing.assert_array_equal(history.history, np.float32(([*x_amaxes[::-1], 0])[:2]))


def test_einsum_forward_equals_formula():
    layer = QuantEinsum((5, 3, 2), "bi,ijk->bjk")
    x = jax.random.normal(jax.random.key(0), (4, 5)) * 3
    variables = layer.init(jax.random.key(1), x)
    params = variables["params"]
    y, _ = layer.apply(variables, x, mutable=[QUANT_STATE])
    qx = ag.quantize(x, ag.E4M3, expected_scale([amax(x)], "current"))
    qw = ag.quantize(params["kernel"], ag.E4M3, expected_scale([amax(params["kernel"])], "current"))
    np.testing.assert_array_equal(y, jnp.einsum("bi,ijk->bjk", qx, qw) + params["bias"])
    assert jax.tree.map(jnp.shape, params) == {"kernel": (5, 3, 2), "bias": (3, 2)}


def test_quant_dense_params_match_nn_dense_and_init_does_not_record():
    x = jnp.ones((2, 3))
    plain = nn.Dense(4).init(jax.random.key(0), x)
    variables = QuantDense(4).init(jax.random.key(0), x)
    assert jax.tree.structure(variables["params"]) == jax.tree.structure(plain["params"])
    np.testing.assert_array_equal(variables["params"]["kernel"], plain["params"]["kernel"])
    history = variables[QUANT_STATE]["dot_general"]["inputs"]
    assert int(history.count) == 0
    # Without a mutable quant_state the layer still runs (inference), scaling from the state.
    y = QuantDense(4).apply(variables, x)
    assert y.shape == (2, 4)


def test_dense_general_takes_the_dot_general_cls():
    layer = nn.DenseGeneral((2, 3), axis=(-2, -1), dot_general_cls=QuantDotGeneral)
    x = jax.random.normal(jax.random.key(0), (4, 5, 6))
    variables = layer.init(jax.random.key(1), x)
    y, _ = layer.apply(variables, x, mutable=[QUANT_STATE])
    kernel = variables["params"]["kernel"]
    qx = ag.quantize(x, ag.E4M3, expected_scale([amax(x)], "current"))
    qw = ag.quantize(kernel, ag.E4M3, expected_scale([amax(kernel)], "current"))
    np.testing.assert_array_equal(y, jnp.einsum("bij,ijkl->bkl", qx, qw))


def _vjp(layer, variables, x, dy):
    @jax.jit  # one program, not the layer's backward pass dispatched op by op
    def pullback(x, params, dy):
        def f(x, params):
            return layer.apply({**variables, "params": params}, x)

        return jax.vjp(f, x, params)[1](dy)

    return pullback(x, variables["params"], dy)


def test_operand_gradients_are_straight_through():
    layer = QuantDense(3, config=QuantConfig(output_grads=None))
    x = jax.random.normal(jax.random.key(0), (4, 5)) * 4
    variables = layer.init(jax.random.key(1), x)
    dy = jax.random.normal(jax.random.key(2), (4, 3))
    dx, dparams = _vjp(layer, variables, x, dy)
    kernel = variables["params"]["kernel"]
    qx = ag.quantize(x, ag.E4M3, expected_scale([amax(x)], "current"))
    qw = ag.quantize(kernel, ag.E4M3, expected_scale([amax(kernel)], "current"))
    np.testing.assert_allclose(dx, dy @ qw.T, rtol=1e-6)
    np.testing.assert_allclose(dparams["kernel"], qx.T @ dy, rtol=1e-6)
    np.testing.assert_allclose(dparams["bias"], dy.sum(0), rtol=1e-6)


def _identity_layer(output_grads):
    """Full-precision operands and an identity kernel: operand gradients are q(dy) exactly."""
    config = QuantConfig(inputs=None, weights=None, output_grads=output_grads)
    return QuantDense(6, use_bias=False, kernel_init=nn.initializers.ones, config=config)


def test_output_cotangent_is_quantized_with_current_scale():
    layer = _identity_layer("E5M2")
    eye = jnp.eye(6)
    variables = layer.init(jax.random.key(0), eye)
    variables = {**variables, "params": {"kernel": eye}}
    dy = jax.random.normal(jax.random.key(1), (6, 6)) * jnp.logspace(-9, 2, 6)
    dx, dparams = _vjp(layer, variables, eye, dy)
    expected = ag.quantize(dy, ag.E5M2, ag.compute_scale(amax(dy), ag.E5M2))
    assert not np.array_equal(expected, dy)
    np.testing.assert_array_equal(dx, expected)
    np.testing.assert_array_equal(dparams["kernel"], expected)


def test_delayed_output_grad_scale_comes_from_the_helper_state():
    layer = _identity_layer(TensorQuant("E5M2", scaling="delayed", history_len=3))
    eye = jnp.eye(6)
    variables = layer.init(jax.random.key(0), eye)
    params, state = {"kernel": eye}, variables[QUANT_STATE]

    def loss_fn(params, state, c):
        y, updates = layer.apply({"params": params, QUANT_STATE: state}, eye, mutable=[QUANT_STATE])
        return jnp.sum(y * c), updates[QUANT_STATE]

    step = jax.jit(quant_value_and_grad(loss_fn))
    dy_amaxes = []
    for i, factor in enumerate((1.0, 1e3, 0.01, 5.0, 2e-3)):
        c = jax.random.normal(jax.random.key(i), (6, 6)) * factor
        _, grads, state = step(params, state, c)
        dy_amaxes.append(amax(c))
        # An empty delayed window (step 1) scales from this gradient, as scale_and_update does.
        sg = expected_scale(dy_amaxes, "delayed", window=3, fmt=ag.E5M2)
        np.testing.assert_array_equal(grads["kernel"], ag.quantize(c, ag.E5M2, sg))
        history = state["dot_general"]["output_grads"]
        np.testing.assert_array_equal(history.history, np.float32(([*dy_amaxes[::-1], 0, 0])[:3]))


def test_stochastic_rounding_needs_its_rng_stream():
    layer = QuantDense(3, config=QuantConfig.uniform(rounding="stochastic"))
    x = jax.random.normal(jax.random.key(0), (4, 5))
    with pytest.raises(ValueError, match="'quant'"):
        layer.init(jax.random.key(1), x)
    variables = layer.init({"params": jax.random.key(1), "quant": jax.random.key(2)}, x)
    with pytest.raises(ValueError, match="rounding='stochastic'"):
        layer.apply(variables, x)

    def run(seed):
        return layer.apply(variables, x, rngs={"quant": jax.random.key(seed)})

    np.testing.assert_array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


def test_statistics_on_hand_built_inputs():
    config = QuantConfig.uniform("E4M3", None, scaling="delayed", stats=True)
    layer = QuantDense(1, use_bias=False, kernel_init=nn.initializers.ones, config=config)
    s0 = expected_scale([1.0, 0.0], "delayed")  # after one step of amax 1.0
    scaled = [500, -1000, 1e6, 600, 1e-5, -1e-6, 0.004, -0.01, np.nan, 3.0]
    x = jnp.asarray([scaled], jnp.float32) * s0
    variables = layer.init(jax.random.key(0), x)
    _, first = layer.apply(
        {"params": variables["params"], QUANT_STATE: variables[QUANT_STATE]},
        jnp.ones_like(x),
        mutable=[QUANT_STATE],
    )
    _, out = layer.apply(
        {"params": variables["params"], QUANT_STATE: first[QUANT_STATE]},
        x,
        mutable=[QUANT_STATE, QUANT_STATS],
    )
    (inputs,) = out[QUANT_STATS]["dot_general"]["inputs"]
    fractions = (inputs.saturated, inputs.underflow, inputs.subnormal, inputs.nan)
    np.testing.assert_array_equal(fractions, np.float32([0.4, 0.2, 0.2, 0.1]))
    assert inputs.scale == s0
    (weights,) = out[QUANT_STATS]["dot_general"]["weights"]
    np.testing.assert_array_equal(
        (weights.saturated, weights.underflow, weights.subnormal, weights.nan, weights.scale),
        np.float32([0, 0, 0, 0, s0]),
    )


def test_statistics_are_off_by_default():
    x = jnp.ones((2, 3))
    variables = QuantDense(4).init(jax.random.key(0), x)
    _, out = QuantDense(4).apply(variables, x, mutable=True)
    assert set(out) == {"params", QUANT_STATE}


class MLP(nn.Module):
    config: QuantConfig

    @nn.compact
    def __call__(self, x):
        x = nn.relu(QuantDense(32, config=self.config)(x))
        return QuantDense(1, config=self.config)(x)


def test_mlp_trains_under_jit_with_state_changing_and_one_compile():
    grads_tq = TensorQuant("E5M2", scaling="delayed")
    model = MLP(QuantConfig(output_grads=grads_tq))
    w_true = jax.random.normal(jax.random.key(0), (8, 1))
    variables = model.init(jax.random.key(1), jnp.ones((1, 8)))
    params, state = variables["params"], variables[QUANT_STATE]
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    traces = []

    def loss_fn(params, state, x, y):
        out, updates = model.apply({"params": params, QUANT_STATE: state}, x, mutable=[QUANT_STATE])
        return jnp.mean((out - y) ** 2), updates[QUANT_STATE]

    @jax.jit
    def train_step(params, state, opt_state, key):
        traces.append(None)
        x = jax.random.normal(key, (64, 8))
        loss, grads, state = quant_value_and_grad(loss_fn)(params, state, x, x @ w_true)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), state, opt_state, loss

    losses = []
    for key in jax.random.split(jax.random.key(2), 60):
        new = train_step(params, state, opt_state, key)
        is_history = lambda n: isinstance(n, ag.AmaxHistory)  # noqa: E731
        for old, fresh in zip(
            *(jax.tree.leaves(s, is_leaf=is_history) for s in (state, new[1])), strict=True
        ):
            assert not np.array_equal(old.history, fresh.history)
        params, state, opt_state, loss = new
        losses.append(float(loss))
    assert len(traces) == 1
    assert np.mean(losses[-5:]) < 0.2 * np.mean(losses[:5])


GRAD_ROW = [1000.0, 1e-8, -1e-9, 5e-7, -8e-7, 1.0, 2.0, 3.0]


def grad_stats_cotangent():
    """An 8 x 8 cotangent: 2 of its 8 nonzero entries underflow in E5M2, 2 of 64 land in
    subnormals."""
    return jnp.zeros((8, 8)).at[0].set(jnp.asarray(GRAD_ROW))


def expected_grad_stats():
    scale = expected_scale([1000.0], "current", fmt=ag.E5M2)
    return np.float32([0, 2 / 8, 2 / 64, 0, scale])


def test_output_gradient_statistics_come_back_from_the_helper():
    config = QuantConfig(inputs=None, weights=None, stats=True)
    layer = QuantDense(8, use_bias=False, config=config)
    eye = jnp.eye(8)
    state = layer.init(jax.random.key(0), eye)[QUANT_STATE]

    def loss_fn(params, state, c):
        y, updates = layer.apply({"params": params, QUANT_STATE: state}, eye, mutable=[QUANT_STATE])
        return jnp.sum(y * c), updates[QUANT_STATE]

    params = {"kernel": eye}
    _, _, state = quant_value_and_grad(loss_fn)(params, state, grad_stats_cotangent())
    stats = QuantStats.from_probe(state["dot_general"]["output_grads_stats"])
    values = (stats.saturated, stats.underflow, stats.subnormal, stats.nan, stats.scale)
    np.testing.assert_array_equal(values, expected_grad_stats())


def test_helper_passes_aux_through_and_matches_jax_grad():
    layer = QuantDense(3)
    x = jax.random.normal(jax.random.key(0), (4, 5))
    variables = layer.init(jax.random.key(1), x)

    def loss_fn(params, state):
        y, updates = layer.apply({"params": params, QUANT_STATE: state}, x, mutable=[QUANT_STATE])
        return jnp.sum(y**2), (updates[QUANT_STATE], y)

    (loss, y), grads, state = quant_value_and_grad(loss_fn, has_aux=True)(
        variables["params"], variables[QUANT_STATE]
    )
    expected_loss, expected_grads = jax.value_and_grad(lambda p: loss_fn(p, state)[0])(
        variables["params"]
    )
    assert loss == expected_loss and y.shape == (4, 3)
    jax.tree.map(np.testing.assert_array_equal, grads, expected_grads)
    assert int(state["dot_general"]["inputs"].count) == 1


def test_stochastic_output_gradient_is_on_the_grid_and_keyed():
    layer = _identity_layer(TensorQuant("E5M2", rounding="stochastic"))
    eye = jnp.eye(6)
    rngs = {"params": jax.random.key(0), "quant": jax.random.key(1)}
    variables = {**layer.init(rngs, eye), "params": {"kernel": eye}}
    dy = jax.random.normal(jax.random.key(2), (6, 6))

    def grad_kernel(seed):
        def f(params):
            return layer.apply({**variables, "params": params}, eye, rngs={"quant": seed})

        _, vjp = jax.vjp(f, variables["params"])
        return vjp(dy)[0]["kernel"]

    first = grad_kernel(jax.random.key(3))
    sg = ag.compute_scale(amax(dy), ag.E5M2)
    np.testing.assert_array_equal(ag.quantize(first, ag.E5M2, sg), first)
    down = ag.quantize(dy, ag.E5M2, sg, rounding="toward_zero")
    assert np.all(np.abs(first) >= np.abs(down)) and np.any(first != down)
    np.testing.assert_array_equal(first, grad_kernel(jax.random.key(3)))
    assert not np.array_equal(first, grad_kernel(jax.random.key(4)))


@settings(max_examples=12, deadline=None)
@given(
    fmt=st.sampled_from(["E2M5", "E3M4", "E4M3", "E5M2", "E2M1", "E3M2", "FP16", "BF16"]),
    scaling=st.sampled_from(["current", "delayed"]),
    log_size=st.floats(-6, 6),
)
def test_forward_formula_holds_for_any_format(fmt, scaling, log_size):
    config = QuantConfig.uniform(fmt, None, scaling=scaling)
    x = jax.random.normal(jax.random.key(0), (3, 4)) * np.float32(10.0**log_size)
    kernel = jax.random.normal(jax.random.key(1), (4, 2))
    layer = QuantDotGeneral(config)
    dims = (((1,), (0,)), ((), ()))
    state = layer.init(jax.random.key(2), x, kernel, dims)
    y, _ = layer.apply(state, x, kernel, dims, mutable=[QUANT_STATE])
    fmt = ag.get_format(fmt)
    sx = expected_scale([amax(x)], scaling, fmt=fmt)
    sw = expected_scale([amax(kernel)], scaling, fmt=fmt)
    expected = jnp.dot(ag.quantize(x, fmt, sx), ag.quantize(kernel, fmt, sw))
    np.testing.assert_array_equal(y, expected)
