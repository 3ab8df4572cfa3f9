"""The framework-neutral core of a quantized matmul, shared by the Linen and NNX modules.

A quantized contraction ``contract(x, w)`` (a ``dot_general`` or an ``einsum``) is computed as

    y = contract(quantize(x, fi, sx), quantize(w, fw, sw))

with ``sx, sw`` from each role's amax history (:func:`altgrad_jax.scaling.scale_and_update`), and
the cotangent ``dy`` of ``y`` is replaced by ``quantize(dy, fg, sg)`` inside a custom VJP, so both
operand gradients see the quantized output gradient. The operand gradients are straight-through:
``dx = contract^T(q(dy), q(w))``, ``dw = contract^T(q(x), q(dy))``.

Output-gradient scale ``sg``:

* "current" scaling takes it from ``max|dy|`` alone; the backward pass needs no state.
* "delayed" scaling takes it from the role's history of earlier steps. The backward pass cannot
  write state, so the history array is an input of the custom VJP and its *cotangent* carries
  this step's ``max|dy|`` (in slot 0, other slots zero), the trick Flax ``fp8_ops`` uses.
  :func:`record_output_grad_amax` turns those cotangents into the new histories; the Linen and NNX
  ``quant_value_and_grad`` helpers call it, so a train step returns the new state explicitly.
  A layer applied k times in one step adds k amaxes (an overestimate: never overflows).

Statistics of the output gradient leave the backward pass the same way: with ``config.stats`` a
:class:`QuantStats` "probe" (:data:`OUTPUT_GRAD_STATS`, its value unused) is an input of the
custom VJP and its cotangent is the gradient's :class:`QuantStats`; the helpers return it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

from altgrad_jax.config import ROLES, QuantConfig, TensorQuant
from altgrad_jax.quantize import quantize
from altgrad_jax.scaling import AmaxHistory, compute_scale, scale_and_update

__all__ = [
    "OUTPUT_GRAD_STATE",
    "OUTPUT_GRAD_STATS",
    "QuantStats",
    "create_history",
    "empty_stats",
    "grad_stats_enabled",
    "quantize_output_grad",
    "quantize_tensor",
    "quantized_contract",
    "record_output_grad_amax",
    "role_keys",
    "state_roles",
    "tensor_stats",
]

# Name of the state entry that holds the output-gradient history (delayed scaling only).
OUTPUT_GRAD_STATE = "output_grads"
# Name of the state entry whose cotangent carries the output-gradient statistics.
OUTPUT_GRAD_STATS = "output_grads_stats"


@flax.struct.dataclass
class QuantStats:
    """What quantization did to one tensor; fractions are of all its elements.

    Attributes:
      saturated: ``|x / scale| > max_value`` (clamped to the range, or inf).
      underflow: nonzero ``x`` that became zero.
      subnormal: nonzero results below ``min_normal`` (in scaled units).
      nan: NaN entries.
      scale: the scale used.
    """

    saturated: jax.Array
    underflow: jax.Array
    subnormal: jax.Array
    nan: jax.Array
    scale: jax.Array


def tensor_stats(x: jax.Array, q: jax.Array, tq: TensorQuant, scale: jax.Array) -> QuantStats:
    """:class:`QuantStats` of ``q = quantize(x, tq.format, scale)``."""
    fmt = tq.format
    x32 = jnp.asarray(x, jnp.float32)
    q32 = jnp.asarray(q, jnp.float32)
    scale = jnp.asarray(scale, jnp.float32)

    def frac(mask):
        return jnp.mean(mask, dtype=jnp.float32)

    # x * (1 / scale), as quantize computes it, so boundary cases agree with the rounding.
    return QuantStats(
        saturated=frac(jnp.abs(x32 * (1 / scale)) > fmt.max_value),
        underflow=frac((x32 != 0) & (q32 == 0)),
        subnormal=frac((q32 != 0) & (jnp.abs(q32) < fmt.min_normal * scale)),
        nan=frac(jnp.isnan(x32)),
        scale=scale,
    )


def create_history(tq: TensorQuant) -> AmaxHistory:
    """A fresh amax history for a role."""
    return AmaxHistory.create(tq.history_len, tq.amax_algorithm)


def state_roles(config: QuantConfig) -> tuple[str, ...]:
    """The roles that keep an amax history: quantized inputs and weights, delayed output grads."""
    roles = [r for r in ROLES[:2] if config.role(r) is not None]
    grads = config.output_grads
    if grads is not None and grads.scaling == "delayed":
        roles.append(OUTPUT_GRAD_STATE)
    return tuple(roles)


def role_keys(config: QuantConfig, key: jax.Array | None) -> dict[str, jax.Array | None]:
    """One PRNG key per stochastically rounded role, derived from ``key``."""
    keys: dict[str, jax.Array | None] = dict.fromkeys(ROLES)
    for i, role in enumerate(ROLES):
        tq = config.role(role)
        if tq is not None and tq.rounding == "stochastic":
            if key is None:
                raise ValueError(
                    f"rounding='stochastic' for {role} needs the RNG stream "
                    f"{config.rng_stream!r}; provide it (Linen: rngs={{{config.rng_stream!r}: key}}"
                    f", NNX: nnx.Rngs({config.rng_stream}=seed))"
                )
            keys[role] = jax.random.fold_in(key, i)
    return keys


def quantize_tensor(
    x: jax.Array,
    tq: TensorQuant,
    history: AmaxHistory,
    key: jax.Array | None,
    with_stats: bool,
) -> tuple[jax.Array, AmaxHistory, QuantStats | None]:
    """Quantizes ``x`` with the scale its history implies; returns it, the new history, stats."""
    scale, new_history = scale_and_update(
        history, x, tq.format, tq.scaling, scale_min=tq.scale_min, margin=tq.margin
    )
    q = quantize(x, tq.format, scale, rounding=tq.rounding, key=key)
    stats = tensor_stats(x, q, tq, scale) if with_stats else None
    return q, new_history, stats


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _output_grad_quantizer(tq: TensorQuant, with_stats: bool, y, history, count, probe, key):
    del history, count, probe, key
    return y


def _output_grad_quantizer_fwd(tq, with_stats, y, history, count, probe, key):
    del probe
    return y, (history, count, key)


def _output_grad_quantizer_bwd(tq, with_stats, residuals, dy):
    history, count, key = residuals
    dy_amax = jnp.max(jnp.abs(dy)).astype(jnp.float32)
    if history is None:
        amax = dy_amax
    else:
        amax = AmaxHistory(history, count, tq.amax_algorithm).get_amax()
    scale = compute_scale(amax, tq.format, tq.scale_min, tq.margin)
    q_dy = quantize(dy, tq.format, scale, rounding=tq.rounding, key=key)
    # The cotangents of the history and of the stats probe carry this step's amax and stats.
    history_ct = None if history is None else jnp.zeros_like(history).at[0].set(dy_amax)
    stats_ct = tensor_stats(dy, q_dy, tq, scale) if with_stats else None
    return q_dy, history_ct, None, stats_ct, None


_output_grad_quantizer.defvjp(_output_grad_quantizer_fwd, _output_grad_quantizer_bwd)


def quantize_output_grad(
    y: jax.Array,
    tq: TensorQuant | None,
    history: AmaxHistory | None = None,
    key: jax.Array | None = None,
    stats_probe: QuantStats | None = None,
) -> jax.Array:
    """Identity on ``y``; its cotangent ``dy`` becomes ``quantize(dy, tq.format, sg)``.

    ``history`` (delayed scaling) gives ``sg`` from earlier steps and receives ``max|dy|`` as its
    cotangent; without it ``sg`` comes from ``max|dy|``. ``stats_probe`` (any
    :class:`QuantStats`, its value unused) receives the :class:`QuantStats` of ``dy`` as its
    cotangent. ``tq=None`` returns ``y`` untouched.
    """
    if tq is None:
        return y
    if (tq.scaling == "delayed") != (history is not None):
        raise ValueError(
            f"output-gradient scaling {tq.scaling!r} "
            f"{'needs' if history is None else 'takes no'} history"
        )
    with_stats = stats_probe is not None
    if history is None:
        return _output_grad_quantizer(tq, with_stats, y, None, None, stats_probe, key)
    return _output_grad_quantizer(
        tq, with_stats, y, history.history, history.count, stats_probe, key
    )


def empty_stats() -> QuantStats:
    """Zero fractions and a unit scale: the initial value of a stats probe or variable."""
    zero = jnp.zeros((), jnp.float32)
    return QuantStats(zero, zero, zero, zero, jnp.ones((), jnp.float32))


def grad_stats_enabled(config: QuantConfig) -> bool:
    """Whether the config asks for statistics of a quantized output gradient."""
    return config.stats and config.output_grads is not None


def quantized_contract(
    contract: Callable[[jax.Array, jax.Array], jax.Array],
    lhs: jax.Array,
    rhs: jax.Array,
    config: QuantConfig,
    histories: dict[str, AmaxHistory],
    key: jax.Array | None,
    grad_stats_probe: QuantStats | None = None,
) -> tuple[jax.Array, dict[str, AmaxHistory], dict[str, QuantStats]]:
    """``contract`` on quantized operands, with the output gradient quantized in the backward.

    Args:
      contract: the full-precision op, e.g. ``partial(lax.dot_general, dimension_numbers=...)``.
      lhs: inputs (activations); rhs: weights.
      config: the quantization config (static).
      histories: the amax histories of :func:`state_roles` (by role name).
      key: PRNG key, required when a role rounds stochastically.
      grad_stats_probe: see :func:`quantize_output_grad`; given when ``config.stats``.

    Returns:
      ``(y, new_histories, stats)``; ``new_histories`` has the forward roles updated (the
      output-gradient history is updated from its cotangent), ``stats`` is empty unless
      ``config.stats``.
    """
    keys = role_keys(config, key)
    new_histories = dict(histories)
    stats: dict[str, QuantStats] = {}
    operands = {"inputs": lhs, "weights": rhs}
    for role, x in operands.items():
        tq = config.role(role)
        if tq is None:
            continue
        q, new_histories[role], role_stats = quantize_tensor(
            x, tq, histories[role], keys[role], config.stats
        )
        operands[role] = q
        if role_stats is not None:
            stats[role] = role_stats
    y = contract(operands["inputs"], operands["weights"])
    y = quantize_output_grad(
        y,
        config.output_grads,
        histories.get(OUTPUT_GRAD_STATE),
        keys["output_grads"],
        grad_stats_probe,
    )
    return y, new_histories, stats


def record_output_grad_amax(history: AmaxHistory, cotangent: AmaxHistory) -> AmaxHistory:
    """The output-gradient history after a step whose backward pass gave ``cotangent``."""
    return history.record(cotangent.history[0])
