"""One-call gradients for NNX models with quantized layers: loss, grads and new quant state.

The output-gradient histories (:class:`OutputGradState`, delayed scaling) are differentiated
alongside the parameters; their cotangents carry this step's output-gradient amax (see
:mod:`altgrad_jax.quant_dot`) and are recorded into the histories here. With ``config.stats``
the :class:`OutputGradStats` variables are differentiated too: their cotangents are the output
gradients' statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from altgrad_jax.nnx.modules import OutputGradState, OutputGradStats, QuantState
from altgrad_jax.quant_dot import record_output_grad_amax
from altgrad_jax.scaling import AmaxHistory

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
      statistics.
    """
    diff = nnx.DiffState(0, nnx.Any(nnx.Param, OutputGradState, OutputGradStats))
    value_and_grad = nnx.value_and_grad(fun, argnums=diff, has_aux=has_aux, allow_int=True)

    def wrapped(model: nnx.Module, *args, **kwargs):
        grad_state = nnx.state(model, OutputGradState)
        value, all_grads = value_and_grad(model, *args, **kwargs)
        grads, grad_cotangent, grad_stats = nnx.split_state(
            all_grads, nnx.Param, OutputGradState, OutputGradStats
        )
        new_grad_state = jax.tree.map(
            record_output_grad_amax,
            grad_state,
            grad_cotangent,
            is_leaf=lambda n: isinstance(n, AmaxHistory),
        )
        nnx.update(model, new_grad_state, grad_stats)
        return value, grads, nnx.state(model, QuantState)

    return wrapped
