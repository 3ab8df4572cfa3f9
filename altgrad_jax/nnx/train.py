"""One-call gradients for NNX models with quantized layers: loss, grads and new quant state.

The output-gradient entries of each layer's state (:class:`OutputGradState` histories, delayed
scaling, and :class:`OutputGradStats` probes) are differentiated alongside the parameters; their
cotangents carry this step's output-gradient amax and statistics (see
:mod:`altgrad_jax.quant_dot`) and become the next state by
:func:`altgrad_jax.quant_dot.next_entry`, the same rule Linen's helper applies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from altgrad_jax.nnx.modules import IN_QUANT_GRAD, OutputGradState, OutputGradStats, QuantState
from altgrad_jax.quant_dot import next_entry
from altgrad_jax.rules import path_str

__all__ = ["quant_value_and_grad"]


def quant_value_and_grad(fun: Callable[..., Any], has_aux: bool = False) -> Callable[..., Any]:
    """Like ``nnx.value_and_grad`` (w.r.t. ``nnx.Param``) for a model with quantized layers.

    Args:
      fun: ``fun(model, *args) -> loss`` (or ``(loss, aux)`` with ``has_aux``).
      has_aux: whether ``fun`` also returns auxiliary data.

    Returns:
      ``f(model, *args) -> (loss, grads, quant_state)``: ``grads`` an ``nnx.State`` of the
      parameters, ``quant_state`` the new ``nnx.state(model, QuantState)``. As with
      ``nnx.value_and_grad``, the model's non-parameter state (histories, RNG counts, stats) is
      updated to what the forward and backward passes produced, including the output-gradient
      entries.
    """
    backward = nnx.Any(OutputGradState, OutputGradStats)
    diff = nnx.DiffState(0, nnx.Any(nnx.Param, backward))
    value_and_grad = nnx.value_and_grad(fun, argnums=diff, has_aux=has_aux, allow_int=True)

    def wrapped(model: nnx.Module, *args, **kwargs):
        token = IN_QUANT_GRAD.set(True)
        try:
            value, all_grads = value_and_grad(model, *args, **kwargs)
        finally:
            IN_QUANT_GRAD.reset(token)
        # As the forward pass left it ("flax" scaling stores the output-gradient scale there).
        forward_state = nnx.state(model, backward)
        grads, cotangents = nnx.split_state(all_grads, nnx.Param, backward)

        def advance(path, forward: nnx.Variable, cotangent: nnx.Variable) -> nnx.Variable:
            name = path_str(path).rsplit("/", 1)[-1]
            return forward.replace(next_entry(name, forward.get_value(), cotangent.get_value()))

        is_variable = lambda n: isinstance(n, nnx.Variable)  # noqa: E731
        new_state = jax.tree_util.tree_map_with_path(
            advance, forward_state, cotangents, is_leaf=is_variable
        )
        nnx.update(model, new_state)
        return value, grads, nnx.state(model, QuantState)

    return wrapped
