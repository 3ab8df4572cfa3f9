"""NNX layers keep Flax's signatures and hooks, and share state names with the Linen layers."""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from altgrad_jax import linen as qlinen
from altgrad_jax import nnx as qnnx
from altgrad_jax.config import QuantConfig, TensorQuant

CONFIG = QuantConfig(
    inputs="E4M3", weights="E4M3", output_grads=TensorQuant("E5M2", scaling="delayed"), stats=True
)


def _params(signature: inspect.Signature) -> dict[str, inspect.Parameter]:
    return {
        name: p
        for name, p in signature.parameters.items()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


@pytest.mark.parametrize(
    ("ours", "flax_cls", "args"),
    [
        (qnnx.QuantLinear, nnx.Linear, (3, 4)),
        (qnnx.QuantEinsum, nnx.Einsum, ("bi,io->bo", (3, 4), (4,))),
    ],
)
def test_signatures_follow_flax(ours, flax_cls, args):
    # __call__ is Flax's own (not overridden), so out_sharding & co. can never drift.
    assert ours.__call__ is flax_cls.__call__
    flax_params = _params(inspect.signature(flax_cls.__init__))
    own = _params(inspect.signature(ours.__init__))
    # Every Flax constructor argument is accepted, explicitly or through **kwargs, and a layer
    # built with Flax's defaults holds the same attributes as Flax's.
    assert set(own) - set(flax_params) == {"config"}
    layer, plain = ours(*args, rngs=nnx.Rngs(0)), flax_cls(*args, rngs=nnx.Rngs(0))
    for name in flax_params:
        if name in ("self", "rngs", "dot_general", "einsum_op") or not hasattr(plain, name):
            continue
        assert getattr(layer, name) == getattr(plain, name), name
    np.testing.assert_array_equal(layer.kernel[...], plain.kernel[...])


def test_flax_arguments_reach_the_quantized_op():
    x = jax.random.normal(jax.random.key(0), (2, 3))
    calls = []

    def my_dot_general(lhs, rhs, dimension_numbers, **kwargs):
        calls.append(sorted(kwargs))
        return lax.dot_general(lhs, rhs, dimension_numbers, **kwargs) + 1.0

    highest = lax.Precision.HIGHEST
    layer = qnnx.QuantLinear(3, 4, dot_general=my_dot_general, precision=highest, rngs=nnx.Rngs(0))
    plain = qnnx.QuantLinear(3, 4, precision=highest, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(layer(x, out_sharding=None), plain(x) + 1.0)
    assert calls == [["precision"]]  # options that are None are left out for user ops
    typed = qnnx.QuantLinear(3, 4, preferred_element_type=jnp.float32, rngs=nnx.Rngs(0))
    assert typed(x).dtype == jnp.float32


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = qlinen.QuantDense(8, config=CONFIG, name="hidden")(x)
        return qlinen.QuantEinsum((8, 2), "bi,io->bo", config=CONFIG, name="out")(jax.nn.relu(x))


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = qnnx.QuantLinear(4, 8, config=CONFIG, rngs=rngs)
        self.out = qnnx.QuantEinsum("bi,io->bo", (8, 2), (2,), config=CONFIG, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


@jax.jit  # one program per model, not op-by-op dispatch
def _linen_step(variables, x):
    def loss_fn(params, state):
        y, new = LinenMLP().apply(
            {"params": params, qlinen.QUANT_STATE: state}, x, mutable=[qlinen.QUANT_STATE]
        )
        return jnp.sum(jnp.sin(y)), new[qlinen.QUANT_STATE]

    return qlinen.quant_value_and_grad(loss_fn)(variables["params"], variables[qlinen.QUANT_STATE])


def test_a_linen_checkpoint_restores_into_the_nnx_model_by_name():
    xs = [jax.random.normal(jax.random.key(i), (5, 4)) * (i + 1) for i in range(3)]
    variables = LinenMLP().init(jax.random.key(0), xs[0])
    for x in xs[:2]:
        _, _, state = _linen_step(variables, x)
        variables = {"params": variables["params"], qlinen.QUANT_STATE: state}
    # The Linen checkpoint, as pure dicts, loads into the NNX model path for path.
    model = NNXMLP(nnx.Rngs(1))
    nnx_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    nnx_quant = nnx.to_pure_dict(nnx.state(model, qnnx.QuantState))
    flat = jax.tree_util.tree_flatten_with_path
    assert [p for p, _ in flat(nnx_quant)[0]] == [
        p for p, _ in flat(variables[qlinen.QUANT_STATE])[0]
    ]
    assert jax.tree.structure(nnx_params) == jax.tree.structure(variables["params"])
    nnx.update(model, variables["params"], variables[qlinen.QUANT_STATE])
    # ... and both continue with the same numbers.
    loss, grads, state = _linen_step(variables, xs[2])
    nnx_step = nnx.jit(qnnx.quant_value_and_grad(lambda m, x: jnp.sum(jnp.sin(m(x)))))
    nnx_loss, nnx_grads, nnx_state = nnx_step(model, xs[2])
    assert loss == nnx_loss
    for a, b in zip(
        jax.tree.leaves((grads, state)),
        jax.tree.leaves((nnx.to_pure_dict(nnx_grads), nnx.to_pure_dict(nnx_state))),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
