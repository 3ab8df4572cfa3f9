"""``QuantConfig.flax_fp8()`` trains exactly as ``flax.linen.fp8_ops.Fp8DotGeneralOp``.

Flax's scale formula and quantize-dequantize against Flax's own functions, then six SGD steps of
a two-layer MLP in Linen and NNX against Flax's FP8 op: every forward output, every gradient,
every scale and every amax history, bit for bit.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.linen import fp8_ops

import altgrad_jax as ag
from altgrad_jax import linen as qlinen
from altgrad_jax import nnx as qnnx
from altgrad_jax.config import QuantConfig, TensorQuant
from altgrad_jax.quant_dot import ContractionAxes, QuantDotState, quantized_contract
from altgrad_jax.quantize import quantize_flax
from altgrad_jax.scaling import AmaxHistory, ScaledAmaxHistory, flax_scale, scale_and_update

STEPS, LR, HISTORY = 6, 0.5, 4
CONFIG = QuantConfig.flax_fp8(history_len=HISTORY)
FLAX_STATE = fp8_ops.OVERWRITE_WITH_GRADIENT
# Flax's variable names for each of our roles: (scale, amax history).
FLAX_NAMES = {
    "inputs": ("input_scale", "input_amax_history"),
    "weights": ("kernel_scale", "kernel_amax_history"),
    "output_grads": ("output_grad_scale", "output_grad_amax_history"),
}


def _assert_bits(ours, theirs, what):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.dtype == theirs.dtype, what
    bits = {np.float32: np.uint32, jnp.bfloat16: np.uint16}[ours.dtype.type]
    np.testing.assert_array_equal(ours.view(bits), theirs.view(bits), err_msg=what)


@pytest.mark.parametrize(("fmt", "dtype"), [("E4M3", jnp.float8_e4m3fn), ("E5M2", jnp.float8_e5m2)])
def test_flax_scale_is_flax_compute_scale(fmt, dtype):
    tiny = np.float32(2.0**-140)  # max / amax overflows: scale 0, in Flax too
    amax = jnp.array([0.0, 3.0, 1e-3, 448.0, 6e4, 1e30, tiny, np.inf, np.nan], jnp.float32)
    previous = jnp.array([1.0, 0.3, 7e-5, 2.0, 1e-6, 0.1, 5.0, 0.7, 3e-3], jnp.float32)
    fp8_max = fp8_ops.get_fp8_max(dtype, jnp.float32)
    theirs = jax.jit(jax.vmap(fp8_ops.compute_scale, (0, 0, None)))(amax, previous, fp8_max)
    ours = jax.jit(jax.vmap(lambda a, p: flax_scale(a, p, fmt)))(amax, previous)
    _assert_bits(ours, theirs, fmt)
    assert ours[0] == 1.0 and ours[1] == np.float32(1) / (fp8_max / np.float32(3)) and ours[6] == 0


@pytest.mark.parametrize(("fmt", "dtype"), [("E4M3", jnp.float8_e4m3fn), ("E5M2", jnp.float8_e5m2)])
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_quantize_flax_is_flax_qdq(fmt, dtype, x_dtype):
    x = jax.random.normal(jax.random.key(0), (4096,)) * 300
    x = x.at[:4].set(jnp.array([np.inf, -np.inf, 1e30, -0.0])).astype(x_dtype)
    flax_qdq = jax.jit(fp8_ops.qdq, static_argnums=(1, 3))
    our_qdq = jax.jit(quantize_flax, static_argnums=1)
    for scale in (jnp.float32(1.0), jnp.float32(0.0123457), jnp.float32(3.3e-6)):
        ours, theirs = our_qdq(x, fmt, scale), flax_qdq(x, dtype, scale, x_dtype)
        _assert_bits(ours, theirs, f"{fmt} {x_dtype.__name__} scale {scale}")
    # inf saturates even in E5M2, which has inf, as Flax clips before the cast.
    saturated = jnp.asarray(ag.get_format(fmt).max_value, x_dtype) * scale.astype(x_dtype)
    assert ours[0] == -ours[1] == saturated


def test_quantize_flax_gradient_is_straight_through():
    x = jnp.array([1e6, 0.3, -2.0])
    grad = jax.jit(jax.grad(lambda x: jnp.sum(quantize_flax(x, "E4M3", jnp.float32(0.5)) * x)))(x)
    np.testing.assert_array_equal(grad, quantize_flax(x, "E4M3", jnp.float32(0.5)) + x)


def test_flax_scaling_keeps_the_scale_and_the_window_on_a_non_finite_amax():
    history = ScaledAmaxHistory.create(4)
    scale, history = scale_and_update(history, jnp.array([2.0, -5.0]), ag.E4M3, "flax")
    assert scale == 1.0  # Flax's first step: empty window, initial scale
    scale, history = scale_and_update(history, jnp.array([1.0, 3.0]), ag.E4M3, "flax")
    assert scale == np.float32(1) / (np.float32(448) / np.float32(5))
    for bad in (np.inf, np.nan):
        kept, after = scale_and_update(history, jnp.array([bad, 1.0]), ag.E4M3, "flax")
        # This step's scale is the one Flax takes too (from the window before the tensor) ...
        assert kept == history.next_scale(ag.E4M3) and after.scale == kept
        # ... but the amax is not recorded (Flax would keep the scale for history_len steps).
        np.testing.assert_array_equal(after.history, history.history)
        assert after.count == history.count


def test_flax_scaling_needs_a_scaled_history():
    with pytest.raises(TypeError, match="ScaledAmaxHistory"):
        scale_and_update(AmaxHistory.create(4), jnp.ones(3), ag.E4M3, "flax")


def test_flax_output_grads_with_block_formats_are_refused():
    config = QuantConfig("MXFP8_E4M3", "MXFP8_E4M3", TensorQuant("E5M2", scaling="flax"))
    x, w = jnp.ones((4, 32)), jnp.ones((32, 8))
    axes = ContractionAxes.of_dot_general(2, 2, (((1,), (0,)), ((), ())))
    with pytest.raises(ValueError, match="'flax' is not supported"):
        quantized_contract(jnp.dot, x, w, config, QuantDotState.create(config), None, axes)


class MLP(nn.Module):
    dot_general_cls: object

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, dot_general_cls=self.dot_general_cls)(x))
        return nn.Dense(4, dot_general_cls=self.dot_general_cls)(x)


def _flax_op():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Fp8DotGeneralOp is deprecated
        return fp8_ops.Fp8DotGeneralOp(amax_history_length=HISTORY)


def _batches():
    """Inputs of growing range (the scales move every step) and targets."""
    keys = jax.random.split(jax.random.key(1), 2 * STEPS)
    xs = [jax.random.normal(keys[i], (8, 12)) * (1.5**i) for i in range(STEPS)]
    ys = [jax.random.normal(keys[STEPS + i], (8, 4)) for i in range(STEPS)]
    return xs, ys


def _mse(out, y):
    return jnp.mean((out - y) ** 2)


def _sgd(params, grads):
    return jax.tree.map(lambda p, g: p - LR * g, params, grads)


def _train_flax(xs, ys):
    model = MLP(_flax_op)
    variables = jax.jit(model.init)(jax.random.key(0), xs[0])

    @jax.jit
    def step(params, fp8, x, y):
        def loss(params, fp8):
            out = model.apply({"params": params, FLAX_STATE: fp8}, x)
            return _mse(out, y), out

        (_, out), (grads, fp8) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, fp8)
        return out, grads, fp8

    params, fp8, history = variables["params"], variables[FLAX_STATE], []
    for x, y in zip(xs, ys, strict=True):
        out, grads, fp8 = step(params, fp8, x, y)
        history.append((out, grads, fp8))
        params = _sgd(params, grads)
    return variables["params"], history


def _train_linen(xs, ys):
    model = MLP(qlinen.quant_dot_general_cls(CONFIG))
    variables = jax.jit(model.init)(jax.random.key(0), xs[0])

    def loss(params, quant_state, x, y):
        out, state = model.apply(
            {"params": params, "quant_state": quant_state}, x, mutable=["quant_state"]
        )
        return _mse(out, y), (state["quant_state"], out)

    step = jax.jit(qlinen.quant_value_and_grad(loss, has_aux=True))
    params, quant_state, history = variables["params"], variables["quant_state"], []
    for x, y in zip(xs, ys, strict=True):
        (_, out), grads, quant_state = step(params, quant_state, x, y)
        history.append((out, grads, quant_state))
        params = _sgd(params, grads)
    return variables["params"], history


def _assert_state(entry: ScaledAmaxHistory, flax_op: dict, role: str, step: int):
    scale_name, history_name = FLAX_NAMES[role]
    _assert_bits(entry.scale.reshape(1), flax_op[scale_name], f"step {step} {scale_name}")
    # Flax's window is a rotating buffer (slot 0 newest, then oldest to newer), ours newest
    # first: the same values in another order.
    flax_history = np.flip(np.roll(np.asarray(flax_op[history_name]), -1))
    _assert_bits(entry.history, flax_history, f"step {step} {history_name}")


@pytest.fixture(scope="module")
def runs():
    xs, ys = _batches()
    return xs, ys, _train_flax(xs, ys), _train_linen(xs, ys)


def test_linen_trains_as_flax_fp8_ops_bit_for_bit(runs):
    _, _, (flax_init, flax_run), (init, run) = runs
    jax.tree.map(lambda a, b: _assert_bits(a, b, "init"), init, flax_init)
    for step, ((out, grads, state), (f_out, f_grads, f_fp8)) in enumerate(
        zip(run, flax_run, strict=True)
    ):
        _assert_bits(out, f_out, f"step {step} output")
        for layer in ("Dense_0", "Dense_1"):
            for name in ("kernel", "bias"):
                _assert_bits(
                    grads[layer][name], f_grads[layer][name], f"step {step} {layer} {name}"
                )
            ops = state[layer]["dot_general"]
            for role in FLAX_NAMES:
                _assert_state(ops[role], f_fp8[layer]["Fp8DotGeneralOp_0"], role, step)
    # The scales did move: the comparison is not between constants.
    scales = {float(s[2]["Dense_0"]["dot_general"]["inputs"].scale) for s in run}
    assert len(scales) == STEPS


def test_nnx_trains_as_flax_fp8_ops_bit_for_bit(runs):
    xs, ys, (flax_init, flax_run), _ = runs

    class NnxMLP(nnx.Module):
        def __init__(self):
            self.Dense_0 = qnnx.QuantLinear(12, 16, config=CONFIG, rngs=nnx.Rngs(0))
            self.Dense_1 = qnnx.QuantLinear(16, 4, config=CONFIG, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.Dense_1(nnx.relu(self.Dense_0(x)))

    model = NnxMLP()
    for layer in ("Dense_0", "Dense_1"):
        for name in ("kernel", "bias"):
            getattr(getattr(model, layer), name).set_value(flax_init[layer][name])

    def loss(model, x, y):
        out = model(x)
        return _mse(out, y), out

    @nnx.jit
    def step(model, x, y):
        (_, out), grads, state = qnnx.quant_value_and_grad(loss, has_aux=True)(model, x, y)
        return out, grads, state

    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        out, grads, state = step(model, x, y)
        f_out, f_grads, f_fp8 = flax_run[i]
        _assert_bits(out, f_out, f"step {i} output")
        for layer in ("Dense_0", "Dense_1"):
            for name in ("kernel", "bias"):
                _assert_bits(grads[layer][name][...], f_grads[layer][name], f"{i} {name}")
                param = getattr(getattr(model, layer), name)
                param.set_value(param[...] - LR * grads[layer][name][...])
            for role in FLAX_NAMES:
                entry = state[layer]["dot_general"][role].get_value()
                _assert_state(entry, f_fp8[layer]["Fp8DotGeneralOp_0"], role, i)
