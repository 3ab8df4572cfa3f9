"""The sweep's char transformer: plain Flax, causal, quantized from outside by library rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altgrad_jax import E4M3
from altgrad_jax.experiments.model import CharTransformer, ModelConfig
from altgrad_jax.experiments.train import dense_rules
from altgrad_jax.linen import QUANT_STATE, QUANT_STATS, quant_rules

CONFIG = ModelConfig(vocab_size=11, context=8, d_model=16, n_heads=2, n_layers=1)
DENSE = ("block_0/qkv", "block_0/proj", "block_0/fc", "block_0/out", "head")


def test_model_is_causal():
    model = CharTransformer(CONFIG)
    tokens = jnp.arange(8, dtype=jnp.int32)[None] % 11
    params = model.init(jax.random.PRNGKey(0), tokens)["params"]
    apply = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    logits = apply(tokens)
    assert logits.shape == (1, 8, 11)
    changed = tokens.at[0, 5].set(10)
    np.testing.assert_array_equal(apply(changed)[:, :5], logits[:, :5])


def test_dense_rules_quantize_every_dense_layer_and_nothing_else():
    model = CharTransformer(CONFIG)
    tokens = jnp.arange(8, dtype=jnp.int32)[None] % 11
    plain = model.init(jax.random.PRNGKey(0), tokens)
    with quant_rules(dense_rules(E4M3)):
        variables = model.init(jax.random.PRNGKey(0), tokens)
    # Same parameters (same paths, same initialisation) as the plain model.
    leaves = jax.tree.leaves(plain["params"]), jax.tree.leaves(variables["params"])
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_array_equal(a, b)
    state = variables[QUANT_STATE]
    quantized = {"/".join(k[:-2]) for k in _flat_keys(state)}
    assert quantized == set(DENSE)
    for path in DENSE:
        node = state
        for part in path.split("/"):
            node = node[part]
        assert set(node["dot_general"]) == {"inputs", "output_grads_stats"}  # weights: on grid

    @jax.jit
    def apply(variables):
        with quant_rules(dense_rules(E4M3)):
            return model.apply(variables, tokens, mutable=[QUANT_STATE, QUANT_STATS])

    logits, out = apply(variables)
    float_logits = model.apply(plain, tokens)
    assert not np.array_equal(logits, float_logits)
    np.testing.assert_allclose(logits, float_logits, atol=0.05)
    assert int(out[QUANT_STATS]["head"]["dot_general"]["inputs"][0].count("entries")) == 8 * 16


def _flat_keys(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flat_keys(value, (*prefix, key))
    else:
        yield prefix


def test_model_config_is_validated():
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(vocab_size=5, d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="n_layers"):
        ModelConfig(vocab_size=5, n_layers=0)
