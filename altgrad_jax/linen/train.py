"""One-call gradients for Linen models with quantized layers: loss, grads and new quant state.

Forward histories come back from ``apply(..., mutable=["quant_state"])``; output-gradient
histories (delayed scaling) come back as the cotangent of the ``quant_state`` input (see
:mod:`altgrad_jax.quant_dot`). :func:`quant_value_and_grad` differentiates with respect to both
``params`` and ``quant_state`` and folds the two into the next state, so nothing is hidden and the
train step stays one pure function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from altgrad_jax.quant_dot import next_entry
from altgrad_jax.rules import path_str
from altgrad_jax.scaling import AmaxHistory

__all__ = ["merge_quant_state", "quant_value_and_grad"]


def _is_entry(node: Any) -> bool:
    return isinstance(node, AmaxHistory)


def merge_quant_state(forward_state: Any, state_cotangent: Any) -> Any:
    """The next quant state: :func:`altgrad_jax.quant_dot.next_entry` on every entry.

    Forward histories as returned, output-gradient ones with this step's amax recorded, and the
    output-gradient statistics probes (``output_grads_stats``) replaced by their cotangents.

    Args:
      forward_state: ``quant_state`` returned by ``apply(..., mutable=[...])``.
      state_cotangent: the gradient of the loss with respect to the input ``quant_state``.
    """

    def merge(path, forward, cotangent):
        return next_entry(path_str(path).rsplit("/", 1)[-1], forward, cotangent)

    return jax.tree_util.tree_map_with_path(
        merge, forward_state, state_cotangent, is_leaf=_is_entry
    )


def quant_value_and_grad(fun: Callable[..., Any], has_aux: bool = False) -> Callable[..., Any]:
    """Like ``jax.value_and_grad`` for a loss that runs a model with quantized layers.

    Args:
      fun: ``fun(params, quant_state, *args) -> (loss, new_quant_state)``, or with
        ``has_aux`` ``(loss, (new_quant_state, aux))``, where ``new_quant_state`` is the
        ``"quant_state"`` collection returned by ``apply(..., mutable=["quant_state"])``.
      has_aux: whether ``fun`` also returns auxiliary data.

    Returns:
      ``f(params, quant_state, *args) -> (loss, grads, next_quant_state)`` (``loss`` is
      ``(loss, aux)`` with ``has_aux``), where ``grads`` are with respect to ``params``.

    Example::

        def loss_fn(params, quant_state, x, y):
            out, state = model.apply(
                {"params": params, "quant_state": quant_state}, x, mutable=["quant_state"]
            )
            return jnp.mean((out - y) ** 2), state["quant_state"]

        loss, grads, quant_state = quant_value_and_grad(loss_fn)(params, quant_state, x, y)
    """

    def wrapped(params, quant_state, *args, **kwargs):
        (loss, out), (grads, state_cotangent) = jax.value_and_grad(
            fun, argnums=(0, 1), has_aux=True, allow_int=True
        )(params, quant_state, *args, **kwargs)
        forward_state, aux = out if has_aux else (out, None)
        next_state = merge_quant_state(forward_state, state_cotangent)
        return ((loss, aux) if has_aux else loss), grads, next_state

    return wrapped
