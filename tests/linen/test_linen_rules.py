"""quant_rules: path-selected quantization of an unmodified Linen model via interception."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altgrad_jax.config import QuantConfig
from altgrad_jax.linen import QUANT_STATE, QuantDense, QuantEinsum, quant_rules
from altgrad_jax.rules import PathRules


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.Dense(8, name="query")(x)
        v = nn.DenseGeneral((2, 4), name="value")(x).reshape((*x.shape[:-1], 8))
        mixed = nn.Einsum((8, 8), "bi,io->bo", name="mix")(q * v)
        return nn.Dense(3, name="head")(nn.relu(mixed))


class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Block(name="attn")(x)


X = jax.random.normal(jax.random.key(0), (5, 6)) * 3


def _init(rules):
    with quant_rules(rules):
        return Model().init(jax.random.key(1), X)


def _apply(rules, variables):
    with quant_rules(rules):
        return Model().apply(variables, X, mutable=[QUANT_STATE])


def test_unmatched_layers_are_bit_identical_to_plain_flax():
    plain = Model().init(jax.random.key(1), X)
    variables = _init(PathRules(default=None))
    assert set(variables) == {"params"}
    y, state = _apply(PathRules(default=None), variables)
    np.testing.assert_array_equal(y, Model().apply(plain, X))
    assert state == {}

    # Quantize only "mix": everything up to it is plain Flax, bit for bit.
    rules = PathRules((("mix", QuantConfig()),))
    variables = _init(rules)
    jax.tree.map(np.testing.assert_array_equal, variables["params"], plain["params"])
    assert list(variables[QUANT_STATE]["attn"]) == ["mix"]
    _, inter = Model().apply(
        plain, X, capture_intermediates=lambda m, _: m.name in ("query", "value")
    )
    with quant_rules(rules):
        _, inter_q = Model().apply(
            variables,
            X,
            mutable=[QUANT_STATE, "intermediates"],
            capture_intermediates=lambda m, _: m.name in ("query", "value"),
        )
    jax.tree.map(np.testing.assert_array_equal, inter["intermediates"], inter_q["intermediates"])


class Handwritten(nn.Module):
    """The same model with the quantized layers written by hand."""

    config: QuantConfig

    @nn.compact
    def __call__(self, x):
        q = QuantDense(8, config=self.config, name="query")(x)
        v = nn.DenseGeneral((2, 4), name="value")(x).reshape((*x.shape[:-1], 8))
        mixed = QuantEinsum((8, 8), "bi,io->bo", config=self.config, name="mix")(q * v)
        return nn.Dense(3, name="head")(nn.relu(mixed))


def test_matched_layers_equal_the_quantized_modules():
    config = QuantConfig.uniform("E3M4", "E5M2")
    rules = PathRules((("value|head", None), ("attn/", config)))
    plain = Model().init(jax.random.key(1), X)
    y, state = _apply(rules, plain | {QUANT_STATE: _init(rules)[QUANT_STATE]})
    hand = Handwritten(config)
    hand_vars = {"params": plain["params"]["attn"]}
    hand_vars[QUANT_STATE] = hand.init(jax.random.key(1), X)[QUANT_STATE]
    y_hand, hand_state = hand.apply(hand_vars, X, mutable=[QUANT_STATE])
    np.testing.assert_array_equal(y, y_hand)
    assert sorted(state[QUANT_STATE]["attn"]) == ["mix", "query"]
    jax.tree.map(np.testing.assert_array_equal, state[QUANT_STATE]["attn"], hand_state[QUANT_STATE])
    assert not np.array_equal(y, Model().apply(plain, X))


def test_rule_value_must_be_a_config():
    with pytest.raises(TypeError, match="attn/query"):
        with quant_rules(PathRules((("query", "E4M3"),))):
            Model().init(jax.random.key(1), X)


def test_rules_work_under_jit_and_grad():
    rules = PathRules(default=QuantConfig())
    variables = jax.jit(lambda: _init(rules))()

    @jax.jit
    def loss(params, state):
        with quant_rules(rules):
            y, _ = Model().apply({"params": params, QUANT_STATE: state}, X, mutable=[QUANT_STATE])
        return jnp.sum(y**2)

    grads = jax.grad(loss)(variables["params"], variables[QUANT_STATE])
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))
