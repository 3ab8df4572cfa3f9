"""The quantized char transformer: statistics, backward quantization, causality."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altgrad_jax import E4M3, E5M2, compute_scale, format_params, quantize
from altgrad_jax.experiments.model import (
    NUM_STATS,
    CharTransformer,
    ModelConfig,
    Quant,
    quantize_cotangent,
    tensor_stats,
)


def test_tensor_stats_counts_underflow_and_saturation_exactly():
    x = jnp.array([0.0, 1e-6, -1e-6, 1.0, 500.0, -1000.0], jnp.float32)
    q = quantize(x, E4M3)
    stats = tensor_stats(x, q, jnp.float32(1.0), E4M3)
    # 6 entries, 5 nonzero, two below E4M3's smallest subnormal (2**-9), two beyond 448.
    np.testing.assert_array_equal(stats, [6, 5, 2, 2])
    traced = tensor_stats(x, q, jnp.float32(1.0), format_params(E4M3).as_arrays())
    np.testing.assert_array_equal(traced, stats)


@pytest.mark.parametrize("traced", [False, True])
def test_quantize_cotangent_quantizes_the_gradient_and_reports_it(traced):
    fmt = format_params(E5M2).as_arrays() if traced else E5M2
    y = jnp.linspace(-1.0, 1.0, 7)
    cotangent = jnp.array([1e-10, 0.3, -0.7, 1.1, 0.0, 2.5, -3.3], jnp.float32)

    def f(y, probe):
        return jnp.sum(quantize_cotangent(y, fmt, probe) * cotangent)

    grad_y, grad_probe = jax.grad(f, argnums=(0, 1))(y, jnp.zeros((NUM_STATS,)))
    scale = compute_scale(jnp.max(jnp.abs(cotangent)), E5M2)
    expected = quantize(cotangent, E5M2, scale)
    np.testing.assert_array_equal(grad_y, expected)
    np.testing.assert_array_equal(grad_probe, tensor_stats(cotangent, expected, scale, E5M2))
    assert grad_probe[2] == 1  # 1e-10 underflows at this scale


def test_model_is_causal_and_quantized_forward_differs_from_float():
    config = ModelConfig(vocab_size=11, context=8, d_model=16, n_heads=2, n_layers=1)
    model = CharTransformer(config)
    tokens = jnp.arange(8, dtype=jnp.int32)[None] % 11
    params = model.init(jax.random.PRNGKey(0), tokens)["params"]
    apply = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    logits = apply(tokens)
    assert logits.shape == (1, 8, 11)
    changed = tokens.at[0, 5].set(10)
    np.testing.assert_array_equal(apply(changed)[:, :5], logits[:, :5])
    q = Quant(E4M3, jnp.zeros((NUM_STATS,)), weights=True)
    quantized, state = jax.jit(
        lambda tokens: model.apply({"params": params}, tokens, q, mutable=["qstats"])
    )(tokens)
    assert not np.array_equal(quantized, logits)
    np.testing.assert_allclose(quantized, logits, atol=0.05)
    assert "weights" in state["qstats"]["head"] and "activations" in state["qstats"]["head"]


def test_model_config_is_validated():
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(vocab_size=5, d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="n_layers"):
        ModelConfig(vocab_size=5, n_layers=0)
