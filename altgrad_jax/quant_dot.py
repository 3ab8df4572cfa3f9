"""The framework-neutral core of a quantized matmul, written once for Linen, NNX and the sweep.

A quantized contraction ``contract(x, w)`` (a ``dot_general``, an ``einsum``, any bilinear op)
is computed as

    y = contract(quantize(x, fi, sx), quantize(w, fw, sw))

with ``sx, sw`` from each role's amax history (:func:`altgrad_jax.scaling.scale_and_update`), and
the cotangent ``dy`` of ``y`` is replaced by ``quantize(dy, fg, sg)`` inside a custom VJP, so both
operand gradients see the quantized output gradient: ``dx = contract^T(q(dy), q(w))``,
``dw = contract^T(q(x), q(dy))`` (the operands' own quantizers are straight-through).

**Static policy, runtime format.** A :class:`~altgrad_jax.config.TensorQuant` holds the policy
(rounding, scaling, history length...) and a format. The policy is static (hashable, it shapes the
program); the format may be a :class:`~altgrad_jax.formats.FloatFormat` (folded into constants) or
traced :class:`~altgrad_jax.formats.FormatParams` arrays. In the backward quantizer the policy is a
non-differentiable argument of the custom VJP and a traced format an ordinary primal input (its
cotangent is None), so one compiled train step serves every format.

**State.** :class:`QuantDotState` is the one layer-state object: an amax history per quantized
forward role, the output-gradient history (delayed scaling only) and a statistics probe. Linen and
NNX store its fields under the same names (``inputs``, ``weights``, ``output_grads``,
``output_grads_stats``), so checkpoints map by name between them.

Output-gradient scale ``sg``:

* "current" scaling takes it from ``max|dy|`` alone; the backward pass needs no state.
* "delayed" scaling takes it from the role's history of earlier steps. The backward pass cannot
  write state, so the history is an input of the custom VJP and its *cotangent* carries this
  step's ``max|dy|`` (in slot 0, other slots zero). :func:`next_state` records it; the
  ``quant_value_and_grad`` helpers of Linen and NNX call it, so a train step returns the new state
  explicitly and optimizers never see it. A layer applied k times in one step adds k amaxes (an
  overestimate: never overflows).

**Statistics** are exact counts (:class:`QuantStats`) that add across layers and steps. Those of
the output gradient leave the backward pass as the cotangent of a float32 probe, each count split
into two 16-bit halves so that float32 carries it exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from altgrad_jax._pytree import pytree_dataclass
from altgrad_jax.bits import _as_f32
from altgrad_jax.config import ROLES, QuantConfig, TensorQuant
from altgrad_jax.formats import FloatFormat, FormatParams, as_params
from altgrad_jax.quantize import quantize
from altgrad_jax.scaling import AmaxHistory, compute_scale, scale_and_update

# The adapters (linen/, nnx/) also use initial_entry, next_entry and state_names.
__all__ = [
    "STAT_NAMES",
    "QuantDotState",
    "QuantStats",
    "next_state",
    "quantize_output_grad",
    "quantized_contract",
    "tensor_stats",
]

# The counts of a QuantStats, in order. ``nonfinite_amax`` counts tensors (not entries) whose
# amax was inf or NaN.
STAT_NAMES: tuple[str, ...] = (
    "entries",
    "nonzero",
    "underflow",
    "saturated",
    "subnormal",
    "nan",
    "nonfinite_amax",
)
_NUM_STATS = len(STAT_NAMES)
_HALF = 1 << 16


@pytree_dataclass
class QuantStats:
    """What quantization did to one tensor (or, summed, to many): exact counts.

    Attributes:
      counts: uint32 ``[len(STAT_NAMES)]``: entries; nonzero entries; nonzero entries that became
        zero (underflow); entries with ``|x / scale| > max_value`` (saturated: clamped, or inf);
        nonzero results below the format's smallest normal (subnormal); NaN entries; and how
        many tensors had a non-finite amax.
      scale: float32, the scale used (for sums: the largest one).

    ``a + b`` adds the counts (layers, steps); the rates are properties.
    """

    counts: jax.Array
    scale: jax.Array

    @classmethod
    def zeros(cls) -> QuantStats:
        return cls(jnp.zeros((_NUM_STATS,), jnp.uint32), jnp.zeros((), jnp.float32))

    def __add__(self, other: QuantStats) -> QuantStats:
        return QuantStats(self.counts + other.counts, jnp.maximum(self.scale, other.scale))

    def count(self, name: str) -> jax.Array:
        """The count called ``name`` (one of :data:`STAT_NAMES`)."""
        return self.counts[..., STAT_NAMES.index(name)]

    def _rate(self, part: str, whole: str) -> jax.Array:
        whole_count = self.count(whole).astype(jnp.float32)
        part_count = self.count(part).astype(jnp.float32)
        return jnp.where(whole_count > 0, part_count / jnp.maximum(whole_count, 1), 0.0)

    @property
    def saturated(self) -> jax.Array:
        """Fraction of entries that saturated."""
        return self._rate("saturated", "entries")

    @property
    def underflow(self) -> jax.Array:
        """Fraction of nonzero entries that became zero."""
        return self._rate("underflow", "nonzero")

    @property
    def subnormal(self) -> jax.Array:
        """Fraction of entries stored as subnormals."""
        return self._rate("subnormal", "entries")

    @property
    def nan(self) -> jax.Array:
        """Fraction of entries that are NaN."""
        return self._rate("nan", "entries")

    def to_probe(self) -> jax.Array:
        """The counts as float32 16-bit halves (exact through float32 cotangent sums) + scale."""
        high = (self.counts >> 16).astype(jnp.float32)
        low = (self.counts & jnp.uint32(_HALF - 1)).astype(jnp.float32)
        return jnp.concatenate([high, low, jnp.reshape(self.scale, (1,))])

    @classmethod
    def from_probe(cls, probe: jax.Array) -> QuantStats:
        """Inverse of :meth:`to_probe` (also of summed probes: halves add exactly)."""
        high = probe[:_NUM_STATS].astype(jnp.uint32)
        low = probe[_NUM_STATS : 2 * _NUM_STATS].astype(jnp.uint32)
        return cls((high << 16) + low, probe[2 * _NUM_STATS])


def _probe_zeros() -> jax.Array:
    return jnp.zeros((2 * _NUM_STATS + 1,), jnp.float32)


def _min_normal(params: FormatParams) -> jax.Array:
    """The format's smallest normal value as float32 (fixed point: its quantum)."""
    field = jnp.asarray(params.min_normal_field, jnp.uint32)
    normal = _as_f32(field << 23)
    fixed_point = jnp.asarray(params.max_bits, jnp.uint32) < (field << 23)
    smallest = _as_f32(jnp.asarray(params.tiny_high, jnp.uint32))
    with_zero = jnp.where(fixed_point, smallest, normal)
    lowest = _as_f32(jnp.asarray(params.tiny_low, jnp.uint32))
    return jnp.where(jnp.asarray(params.has_zero), with_zero, lowest)


def tensor_stats(x: jax.Array, q: jax.Array, params: FormatParams, scale: jax.Array) -> QuantStats:
    """:class:`QuantStats` of ``q = quantize(x, fmt, scale)`` (``params = as_params(fmt)``)."""
    x32 = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
    q32 = jax.lax.stop_gradient(jnp.asarray(q, jnp.float32))
    scale = jnp.asarray(scale, jnp.float32)

    def count(mask):
        return jnp.sum(mask, dtype=jnp.uint32)

    nonzero = x32 != 0
    amax = jnp.max(jnp.abs(x32), initial=0.0)
    # x * (1 / scale), as quantize computes it, so boundary cases agree with the rounding.
    counts = jnp.stack(
        [
            jnp.uint32(x32.size),
            count(nonzero),
            count(nonzero & (q32 == 0)),
            count(jnp.abs(x32 * (1 / scale)) > params.max_value),
            count((q32 != 0) & (jnp.abs(q32) < _min_normal(params) * scale)),
            count(jnp.isnan(x32)),
            (~jnp.isfinite(amax)).astype(jnp.uint32),
        ]
    )
    return QuantStats(counts, scale)


@pytree_dataclass
class QuantDotState:
    """The state of one quantized matmul: what Linen and NNX store, under these names.

    Attributes:
      inputs, weights: :class:`AmaxHistory` of the quantized forward roles (None otherwise).
      output_grads: the output-gradient history, for delayed output-gradient scaling only.
      output_grads_stats: float32 probe whose cotangent is the output gradient's statistics
        (see :meth:`QuantStats.to_probe`), when the config asks for statistics.
    """

    inputs: AmaxHistory | None = None
    weights: AmaxHistory | None = None
    output_grads: AmaxHistory | None = None
    output_grads_stats: jax.Array | None = None

    @classmethod
    def create(cls, config: QuantConfig) -> QuantDotState:
        """A fresh state with an entry for every role ``config`` keeps state for."""
        return cls(**{name: initial_entry(config, name) for name in state_names(config)})

    @property
    def grad_stats(self) -> QuantStats | None:
        """The output gradient's statistics after :func:`next_state` (None without stats)."""
        probe = self.output_grads_stats
        return None if probe is None else QuantStats.from_probe(probe)


def state_names(config: QuantConfig) -> tuple[str, ...]:
    """The :class:`QuantDotState` fields ``config`` uses, in field order."""
    names = [r for r in ROLES[:2] if config.role(r) is not None]
    grads = config.output_grads
    if grads is not None and grads.scaling == "delayed":
        names.append("output_grads")
    if config.stats and grads is not None:
        names.append("output_grads_stats")
    return tuple(names)


def initial_entry(config: QuantConfig, name: str) -> Any:
    """The initial value of the :class:`QuantDotState` field ``name`` under ``config``."""
    if name == "output_grads_stats":
        return _probe_zeros()
    tq = config.role(name)
    return AmaxHistory.create(tq.history_len, tq.amax_algorithm)


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


def _quantize_operand(
    x: jax.Array, tq: TensorQuant, history: AmaxHistory, key: jax.Array | None, with_stats: bool
) -> tuple[jax.Array, AmaxHistory, QuantStats | None]:
    """Quantizes ``x`` with the scale its history implies; returns it, the new history, stats."""
    scale, new_history = scale_and_update(
        history, x, tq.format, tq.scaling, scale_min=tq.scale_min, margin=tq.margin
    )
    q = quantize(x, tq.format, scale, rounding=tq.rounding, key=key)
    stats = tensor_stats(x, q, as_params(tq.format), scale) if with_stats else None
    return q, new_history, stats


class _GradPolicy(NamedTuple):
    """The static (hashable) part of the output-gradient role: everything but a traced format."""

    static_format: FloatFormat | None
    rounding: str
    margin: float
    scale_min: float
    amax_algorithm: str
    with_stats: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _grad_quantizer(policy: _GradPolicy, y, traced_format, history, count, probe, key):
    del policy, traced_format, history, count, probe, key
    return y


def _grad_quantizer_fwd(policy, y, traced_format, history, count, probe, key):
    del policy, probe
    return y, (traced_format, history, count, key)


def _grad_quantizer_bwd(policy: _GradPolicy, residuals, dy):
    traced_format, history, count, key = residuals
    fmt = policy.static_format if traced_format is None else traced_format
    dy_amax = jnp.max(jnp.abs(dy), initial=0.0).astype(jnp.float32)
    if history is None:
        amax = dy_amax
    else:
        amax = AmaxHistory(history, count, policy.amax_algorithm).get_amax()
    scale = compute_scale(amax, fmt, policy.scale_min, policy.margin)
    q_dy = quantize(dy, fmt, scale, rounding=policy.rounding, key=key)
    # The cotangents of the history and of the stats probe carry this step's amax and stats.
    history_ct = None if history is None else jnp.zeros_like(history).at[0].set(dy_amax)
    stats_ct = (
        tensor_stats(dy, q_dy, as_params(fmt), scale).to_probe() if policy.with_stats else None
    )
    return q_dy, None, history_ct, None, stats_ct, None


_grad_quantizer.defvjp(_grad_quantizer_fwd, _grad_quantizer_bwd)


def quantize_output_grad(
    y: jax.Array,
    tq: TensorQuant | None,
    history: AmaxHistory | None = None,
    key: jax.Array | None = None,
    stats_probe: jax.Array | None = None,
) -> jax.Array:
    """Identity on ``y``; its cotangent ``dy`` becomes ``quantize(dy, tq.format, sg)``.

    ``history`` (delayed scaling) gives ``sg`` from earlier steps and receives ``max|dy|`` as its
    cotangent; without it ``sg`` comes from ``max|dy|``. ``stats_probe`` receives the
    :class:`QuantStats` of ``dy`` (as :meth:`QuantStats.to_probe`) as its cotangent. A traced
    format reaches the backward pass as a primal input. ``tq=None`` returns ``y`` untouched.
    """
    if tq is None:
        return y
    if (tq.scaling == "delayed") != (history is not None):
        raise ValueError(
            f"output-gradient scaling {tq.scaling!r} "
            f"{'needs' if history is None else 'takes no'} history"
        )
    static = tq.format if isinstance(tq.format, FloatFormat) else None
    traced = None if static is not None else tq.format
    policy = _GradPolicy(
        static, tq.rounding, tq.margin, tq.scale_min, tq.amax_algorithm, stats_probe is not None
    )
    if history is None:
        return _grad_quantizer(policy, y, traced, None, None, stats_probe, key)
    return _grad_quantizer(policy, y, traced, history.history, history.count, stats_probe, key)


def quantized_contract(
    contract: Callable[[jax.Array, jax.Array], jax.Array],
    lhs: jax.Array,
    rhs: jax.Array,
    config: QuantConfig,
    state: QuantDotState,
    key: jax.Array | None,
) -> tuple[jax.Array, QuantDotState, dict[str, QuantStats]]:
    """``contract`` on quantized operands, with the output gradient quantized in the backward.

    Args:
      contract: the full-precision op, e.g. ``partial(lax.dot_general, dimension_numbers=...)``.
      lhs: inputs (activations); rhs: weights.
      config: the quantization config (policy static, formats static or traced).
      state: the layer's :class:`QuantDotState` (as from :meth:`QuantDotState.create`).
      key: PRNG key, required when a role rounds stochastically.

    Returns:
      ``(y, new_state, stats)``: ``new_state`` has the forward histories advanced (the
      output-gradient entries are advanced from their cotangents by :func:`next_state`);
      ``stats`` holds the forward roles' :class:`QuantStats` when ``config.stats``.
    """
    keys = role_keys(config, key)
    changes: dict[str, AmaxHistory] = {}
    stats: dict[str, QuantStats] = {}
    operands = {"inputs": lhs, "weights": rhs}
    for role, x in operands.items():
        tq = config.role(role)
        if tq is None:
            continue
        q, changes[role], role_stats = _quantize_operand(
            x, tq, getattr(state, role), keys[role], config.stats
        )
        operands[role] = q
        if role_stats is not None:
            stats[role] = role_stats
    y = contract(operands["inputs"], operands["weights"])
    y = quantize_output_grad(
        y, config.output_grads, state.output_grads, keys["output_grads"], state.output_grads_stats
    )
    return y, dataclasses.replace(state, **changes), stats


def next_entry(name: str, forward: Any, cotangent: Any) -> Any:
    """One :class:`QuantDotState` entry after a train step, by its name: forward histories as
    the forward pass left them, the output-gradient history with this step's ``max|dy|`` (its
    cotangent) recorded, the statistics probe replaced by its cotangent."""
    if name == "output_grads":
        return forward.record(cotangent.history[0])
    if name == "output_grads_stats":
        return cotangent
    return forward


def next_state(forward: QuantDotState, cotangent: QuantDotState) -> QuantDotState:
    """The state after a train step (see :func:`next_entry`); ``cotangent`` is the gradient of
    the loss with respect to the state fed to the forward pass. Read the output gradient's
    statistics with :attr:`QuantDotState.grad_stats`."""
    changes = {
        name: next_entry(name, getattr(forward, name), getattr(cotangent, name))
        for name in ("output_grads", "output_grads_stats")
        if getattr(forward, name) is not None
    }
    return dataclasses.replace(forward, **changes)
