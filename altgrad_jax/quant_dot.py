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
forward role, the output-gradient history (delayed and "flax" scaling only) and a statistics
probe. Linen and NNX store its fields under the same names (``inputs``, ``weights``,
``output_grads``, ``output_grads_stats``), so checkpoints map by name between them.

Output-gradient scale ``sg``:

* "current" scaling takes it from ``max|dy|`` alone; the backward pass needs no state.
* "delayed" scaling takes it from the role's history of earlier steps. The backward pass cannot
  write state, so the history is an input of the custom VJP and its *cotangent* carries this
  step's ``max|dy|`` (in slot 0, other slots zero). :func:`next_state` records it; the
  ``quant_value_and_grad`` helpers of Linen and NNX call it, so a train step returns the new state
  explicitly and optimizers never see it. A layer applied k times in one step adds k amaxes (an
  overestimate: never overflows).
* "flax" scaling (``flax.linen.fp8_ops``) is delayed too, and its scale depends only on the
  state from before the step (:meth:`~altgrad_jax.scaling.ScaledAmaxHistory.next_scale`), so
  the forward pass computes it and stores it in its new state, and the backward pass uses the
  same value; the amax comes back through the cotangent as above. Flax instead returns its
  scales and histories as "gradients" of an ``_overwrite_with_gradient`` collection.

**Statistics** are exact counts (:class:`QuantStats`) that add across layers and steps. Those of
the output gradient leave the backward pass as the cotangent of a float32 probe, each count split
into two 16-bit halves so that float32 carries it exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from altgrad_jax._pytree import pytree_dataclass
from altgrad_jax.bits import _as_f32
from altgrad_jax.blocks import BlockLike, block_amax, block_scales, element_params, normalize_axes
from altgrad_jax.config import ROLES, QuantConfig, TensorQuant
from altgrad_jax.formats import BlockFormat, BlockParams, FloatFormat, FormatParams, as_params
from altgrad_jax.quantize import quantize, quantize_flax
from altgrad_jax.scaling import (
    AmaxHistory,
    ScaledAmaxHistory,
    amax_and_finite,
    compute_scale,
    finite_amax,
    scale_and_update,
)

# The adapters (linen/, nnx/) also use initial_entry, next_entry and state_names.
__all__ = [
    "STAT_NAMES",
    "ContractionAxes",
    "QuantDotState",
    "QuantStats",
    "next_state",
    "quantize_output_grad",
    "quantized_contract",
    "random_hadamard",
    "tensor_stats",
]

# The counts of a QuantStats, in order. ``nonfinite_amax`` counts tensors (not entries) whose
# amax was inf or NaN; the block counts are zero for per-tensor formats.
STAT_NAMES: tuple[str, ...] = (
    "entries",
    "nonzero",
    "underflow",
    "saturated",
    "subnormal",
    "nan",
    "nonfinite_amax",
    "blocks",
    "saturated_blocks",
    "flushed_blocks",
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
        many tensors had a non-finite amax; for block formats also the number of blocks, of
        blocks with a saturated element (only the "floor" rule saturates) and of nonzero
        blocks that became all zero (flushed).
      scale: float32, the scale used (for sums and block formats: the largest one).

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

    @property
    def saturated_blocks(self) -> jax.Array:
        """Fraction of blocks with a saturated element (block formats)."""
        return self._rate("saturated_blocks", "blocks")

    @property
    def flushed_blocks(self) -> jax.Array:
        """Fraction of blocks flushed to zero (block formats)."""
        return self._rate("flushed_blocks", "blocks")

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
            jnp.uint32(0),
            jnp.uint32(0),
            jnp.uint32(0),
        ]
    )
    return QuantStats(counts, jnp.max(scale, initial=0.0))


def block_stats(x: jax.Array, q: jax.Array, fmt: BlockLike, axis: int) -> QuantStats:
    """:class:`QuantStats` of ``q = quantize(x, fmt, axis=axis)`` (1-D blocks along ``axis``,
    or tiles over the last two axes), block counts included."""
    scales = block_scales(x, fmt, axis=None if len(fmt.block_shape) == 2 else axis)
    axes = normalize_axes(fmt, x.ndim, None if len(fmt.block_shape) == 2 else axis)
    expanded = scales
    for a, size in zip(axes, fmt.block_shape, strict=True):
        expanded = jnp.repeat(expanded, size, axis=a)[
            tuple(slice(0, x.shape[d]) if d == a else slice(None) for d in range(x.ndim))
        ]
    params = element_params(fmt)
    stats = tensor_stats(x, q, params, jnp.where(jnp.isfinite(expanded), expanded, 1.0))
    x32 = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
    q32 = jax.lax.stop_gradient(jnp.asarray(q, jnp.float32))
    saturated = jnp.abs(x32 * (1 / expanded)) > params.max_value
    any_saturated = block_amax(saturated.astype(jnp.float32), fmt, axes) > 0
    nonzero_block = block_amax(x32, fmt, axes) > 0
    flushed = nonzero_block & (block_amax(q32, fmt, axes) == 0)
    extra = jnp.stack(
        [
            jnp.uint32(scales.size),
            jnp.sum(any_saturated, dtype=jnp.uint32),
            jnp.sum(flushed, dtype=jnp.uint32),
        ]
    )
    return QuantStats(stats.counts.at[-3:].set(extra), jnp.max(scales, initial=0.0))


@pytree_dataclass
class QuantDotState:
    """The state of one quantized matmul: what Linen and NNX store, under these names.

    Attributes:
      inputs, weights: :class:`AmaxHistory` of the quantized forward roles (None otherwise;
        a :class:`~altgrad_jax.scaling.ScaledAmaxHistory` with "flax" scaling).
      output_grads: the output-gradient history, for delayed and "flax" output-gradient
        scaling only.
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
    """The :class:`QuantDotState` fields ``config`` uses, in field order (block formats keep
    no history: their scales come from the blocks of each tensor)."""
    names = [r for r in ROLES[:2] if config.role(r) is not None and not _is_block(config.role(r))]
    grads = config.output_grads
    if grads is not None and grads.scaling != "current":
        names.append("output_grads")
    if config.stats and grads is not None:
        names.append("output_grads_stats")
    return tuple(names)


def initial_entry(config: QuantConfig, name: str) -> Any:
    """The initial value of the :class:`QuantDotState` field ``name`` under ``config``."""
    if name == "output_grads_stats":
        return _probe_zeros()
    tq = config.role(name)
    history = ScaledAmaxHistory if tq.scaling == "flax" else AmaxHistory
    return history.create(tq.history_len, tq.amax_algorithm)


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
    if config.hadamard is not None:
        if key is None:
            raise ValueError(
                f"hadamard={config.hadamard} draws random signs from the RNG stream "
                f"{config.rng_stream!r}; provide it"
            )
        keys["hadamard"] = jax.random.fold_in(key, len(ROLES))
    return keys


def _quantize_operand(
    x: jax.Array, tq: TensorQuant, history: AmaxHistory, key: jax.Array | None, with_stats: bool
) -> tuple[jax.Array, AmaxHistory, QuantStats | None]:
    """Quantizes ``x`` with the scale its history implies; returns it, the new history, stats."""
    scale, new_history = scale_and_update(
        history, x, tq.format, tq.scaling, scale_min=tq.scale_min, margin=tq.margin
    )
    q = (quantize_flax if tq.scaling == "flax" else quantize)(
        x, tq.format, scale, rounding=tq.rounding, key=key
    )
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
def _grad_quantizer(policy: _GradPolicy, y, traced_format, history, count, scale, probe, key):
    del policy, traced_format, history, count, scale, probe, key
    return y


def _grad_quantizer_fwd(policy, y, traced_format, history, count, scale, probe, key):
    del policy, probe
    return y, (traced_format, history, count, scale, key)


def _grad_quantizer_bwd(policy: _GradPolicy, residuals, dy):
    traced_format, history, count, flax_scale, key = residuals
    fmt = policy.static_format if traced_format is None else traced_format
    # The finite amax: an inf or NaN in dy stays visible in dy itself, never in the scale
    # (a non-finite amax is not recorded either; see AmaxHistory.record).
    dy_amax, finite = amax_and_finite(dy)
    if flax_scale is not None:  # Flax's out_qdq: the forward pass took it from the window
        scale = flax_scale
        q_dy = quantize_flax(dy, fmt, scale, rounding=policy.rounding, key=key)
    else:
        if history is None:
            amax = finite
        else:
            amax = AmaxHistory(history, count, policy.amax_algorithm).get_amax(empty=finite)
        scale = compute_scale(amax, fmt, policy.scale_min, policy.margin)
        q_dy = quantize(dy, fmt, scale, rounding=policy.rounding, key=key)
    # The cotangents of the history and of the stats probe carry this step's amax and stats.
    history_ct = None if history is None else jnp.zeros_like(history).at[0].set(dy_amax)
    stats_ct = (
        tensor_stats(dy, q_dy, as_params(fmt), scale).to_probe() if policy.with_stats else None
    )
    return q_dy, None, history_ct, None, None, stats_ct, None


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
    cotangent; without it ``sg`` comes from ``max|dy|``. With "flax" scaling ``history`` is a
    :class:`~altgrad_jax.scaling.ScaledAmaxHistory` and ``sg`` its ``next_scale``.
    ``stats_probe`` receives the :class:`QuantStats` of ``dy`` (as :meth:`QuantStats.to_probe`)
    as its cotangent. A traced format reaches the backward pass as a primal input. ``tq=None``
    returns ``y`` untouched.
    """
    if tq is None:
        return y
    if (tq.scaling != "current") != (history is not None):
        raise ValueError(
            f"output-gradient scaling {tq.scaling!r} "
            f"{'needs' if history is None else 'takes no'} history"
        )
    if (tq.scaling == "flax") != isinstance(history, ScaledAmaxHistory):
        raise TypeError(
            "output-gradient scaling 'flax' (and only it) takes a ScaledAmaxHistory, got "
            f"{type(history).__name__} with scaling {tq.scaling!r}"
        )
    static = tq.format if isinstance(tq.format, FloatFormat) else None
    traced = None if static is not None else tq.format
    policy = _GradPolicy(
        static, tq.rounding, tq.margin, tq.scale_min, tq.amax_algorithm, stats_probe is not None
    )
    if history is None:
        return _grad_quantizer(policy, y, traced, None, None, None, stats_probe, key)
    scale = history.next_scale(tq.format, tq.margin) if tq.scaling == "flax" else None
    return _grad_quantizer(
        policy, y, traced, history.history, history.count, scale, stats_probe, key
    )


def quantized_contract(
    contract: Callable[[jax.Array, jax.Array], jax.Array],
    lhs: jax.Array,
    rhs: jax.Array,
    config: QuantConfig,
    state: QuantDotState,
    key: jax.Array | None,
    axes: ContractionAxes | Callable[[], ContractionAxes] | None = None,
) -> tuple[jax.Array, QuantDotState, dict[str, QuantStats]]:
    """``contract`` on quantized operands, with the output gradient quantized in the backward.

    With a block format in any role, each of the three GEMMs of training quantizes its own
    operands from the high-precision tensors along *its* contraction axes (``axes``): forward
    x and W along K; input gradient dY and W along N; weight gradient x and dY along the
    tokens. Per-tensor roles are quantized once and shared by the GEMMs that use them.

    Args:
      contract: the full-precision op, e.g. ``partial(lax.dot_general, dimension_numbers=...)``.
      lhs: inputs (activations); rhs: weights.
      config: the quantization config (policy static, formats static or traced).
      state: the layer's :class:`QuantDotState` (as from :meth:`QuantDotState.create`).
      key: PRNG key, required when a role rounds stochastically.
      axes: the contraction's :class:`ContractionAxes` (or a function giving them), needed by
        block formats only; the library's layers pass them.

    Returns:
      ``(y, new_state, stats)``: ``new_state`` has the forward histories advanced and, with
      "flax" output-gradient scaling, this step's output-gradient scale stored (the
      output-gradient entries are advanced from their cotangents by :func:`next_state`);
      ``stats`` holds the forward roles' :class:`QuantStats` when ``config.stats``.
    """
    keys = role_keys(config, key)
    if config.hadamard is not None or any(_is_block(config.role(r)) for r in ROLES):
        if axes is None:
            raise ValueError(
                "block formats quantize along the contraction axes of each GEMM; this op did "
                "not say which they are (use the library's layers, or pass axes=)"
            )
        return _block_contract(contract, lhs, rhs, config, state, keys, axes)
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
    grads = config.output_grads
    y = quantize_output_grad(
        y, grads, state.output_grads, keys["output_grads"], state.output_grads_stats
    )
    if grads is not None and grads.scaling == "flax":
        scale = state.output_grads.next_scale(grads.format, grads.margin)
        changes["output_grads"] = state.output_grads.replace(scale=scale)
    return y, dataclasses.replace(state, **changes), stats


# ----------------------------------------------------------------------------- block formats
class ContractionAxes(NamedTuple):
    """Which axes a bilinear op contracts, so block formats can block along them.

    ``lhs``/``rhs`` are the operands' contracted axes; ``out_lhs``/``out_rhs`` the output axes
    that come from the operands' free axes (the "tokens" and the output features);
    ``lhs_batch``/``rhs_batch``/``out_batch`` the batch axes, shared by both operands and the
    output (attention's batch and heads). Every GEMM of training blocks each batch element on
    its own: a block never spans two of them (2-D tiles neither).
    """

    lhs: tuple[int, ...]
    rhs: tuple[int, ...]
    out_lhs: tuple[int, ...]
    out_rhs: tuple[int, ...]
    lhs_batch: tuple[int, ...] = ()
    rhs_batch: tuple[int, ...] = ()
    out_batch: tuple[int, ...] = ()

    @classmethod
    def of_dot_general(cls, lhs_ndim: int, rhs_ndim: int, dimension_numbers) -> ContractionAxes:
        """The axes of ``lax.dot_general`` (output: batch, lhs free, rhs free)."""
        (lc, rc), (lb, rb) = dimension_numbers
        lc, lb = (tuple(a % lhs_ndim for a in axes) for axes in (lc, lb))
        rc, rb = (tuple(a % rhs_ndim for a in axes) for axes in (rc, rb))
        n_batch = len(lb)
        n_lhs_free = lhs_ndim - len(lc) - n_batch
        n_rhs_free = rhs_ndim - len(rc) - n_batch
        return cls(
            lc,
            rc,
            tuple(range(n_batch, n_batch + n_lhs_free)),
            tuple(range(n_batch + n_lhs_free, n_batch + n_lhs_free + n_rhs_free)),
            lb,
            rb,
            tuple(range(n_batch)),
        )

    @classmethod
    def of_einsum(
        cls, subscripts: str, lhs_ndim: int | None = None, rhs_ndim: int | None = None
    ) -> ContractionAxes:
        """The axes of ``jnp.einsum(subscripts, lhs, rhs)``: labels in both operands and the
        output are batch axes, in both operands only contracted; ``...`` (which needs the
        operands' ``ndim``) stands for leading axes, batch where both operands have them."""
        inputs, out = subscripts.replace(" ", "").split("->")
        left, right = inputs.split(",")
        if "..." in subscripts:
            if lhs_ndim is None or rhs_ndim is None:
                raise ValueError(f"einsum {subscripts!r} has '...': pass the operands' ndim")
            n_left = lhs_ndim - len(left.replace("...", ""))
            n_right = rhs_ndim - len(right.replace("...", ""))
            dims = [chr(0x100 + i) for i in range(max(n_left, n_right))]  # labels of '...'
            left = left.replace("...", "".join(dims[len(dims) - n_left :]))
            right = right.replace("...", "".join(dims[len(dims) - n_right :]))
            out = out.replace("...", "".join(dims))
        shared = set(left) & set(right)
        batch = [c for c in out if c in shared]
        return cls(
            tuple(i for i, c in enumerate(left) if c in shared and c not in out),
            tuple(i for i, c in enumerate(right) if c in shared and c not in out),
            tuple(i for i, c in enumerate(out) if c in left and c not in shared),
            tuple(i for i, c in enumerate(out) if c in right and c not in shared),
            tuple(left.index(c) for c in batch),
            tuple(right.index(c) for c in batch),
            tuple(out.index(c) for c in batch),
        )


def free_axes(
    ndim: int, contracted: tuple[int, ...], batch: tuple[int, ...] = ()
) -> tuple[int, ...]:
    """The axes of an ``ndim``-D operand that are neither contracted nor batch axes."""
    return tuple(a for a in range(ndim) if a not in contracted and a not in batch)


def quantize_along(
    x: jax.Array,
    tq: TensorQuant,
    axes: tuple[int, ...],
    key: jax.Array | None,
    batch: tuple[int, ...] = (),
) -> jax.Array:
    """``x`` in the block format of ``tq`` with 1-D blocks along ``axes`` (several axes are
    merged into one, in order), or 2-D tiles over (the other axes, ``axes``) merged, each
    element of the ``batch`` axes on its own."""
    fmt = tq.format
    rest = free_axes(x.ndim, axes, batch)
    order = (*batch, *rest, *axes)
    moved = jnp.transpose(x, order)
    lead = moved.shape[: len(batch) + len(rest)]
    merged = math.prod(moved.shape[len(lead) :])
    if len(fmt.block_shape) == 2:
        flat = moved.reshape(*lead[: len(batch)], math.prod(lead[len(batch) :]), merged)
        q = quantize(flat, fmt, rounding=tq.rounding, key=key, axis=(-2, -1))
    else:
        flat = moved.reshape(*lead, merged)
        q = quantize(flat, fmt, rounding=tq.rounding, key=key, axis=-1)
    return jnp.transpose(q.reshape(moved.shape), np.argsort(order))


class _BlockPolicy(NamedTuple):
    """The static part of a block-format GEMM (hashable: a non-differentiable argument)."""

    contract: Callable[[jax.Array, jax.Array], jax.Array]
    axes: ContractionAxes
    inputs: TensorQuant | None
    weights: TensorQuant | None
    output_grads: TensorQuant | None
    with_stats: bool
    hadamard: int | None = None


def _is_block(tq: TensorQuant | None) -> bool:
    return tq is not None and isinstance(tq.format, (BlockFormat, BlockParams))


def _hoisted(tq: TensorQuant | None) -> tuple[TensorQuant | None, list | None]:
    """A role's policy with the arrays of a traced format taken out (None in their place), and
    those arrays: the policy is a static argument of the block GEMM's custom VJP (hashable, no
    tracers), the arrays are primal inputs, as the output-gradient quantizer passes them."""
    if tq is None or isinstance(tq.format, (FloatFormat, BlockFormat)):
        return tq, None
    leaves, treedef = jax.tree.flatten(tq.format)
    return dataclasses.replace(tq, format=treedef.unflatten([None] * len(leaves))), leaves


def _with_formats(policy: _BlockPolicy, formats: tuple) -> _BlockPolicy:
    """``policy`` with the traced formats of :func:`_hoisted` put back."""
    roles = {}
    for name, leaves in zip(("inputs", "weights", "output_grads"), formats, strict=True):
        tq = getattr(policy, name)
        if leaves is not None:
            treedef = jax.tree.structure(tq.format, is_leaf=lambda node: node is None)
            roles[name] = dataclasses.replace(tq, format=treedef.unflatten(leaves))
    return policy._replace(**roles)


def _operand(x, tq, fixed, axes, key, batch=()):
    """One GEMM's copy of an operand: per-tensor roles are quantized once (``fixed``), block
    roles along this GEMM's contraction ``axes`` (per ``batch`` element), from the
    high-precision ``x``."""
    if fixed is not None:
        return fixed
    if _is_block(tq):
        return quantize_along(x, tq, axes, key, batch)
    return x


def _fold(key, i):
    return None if key is None else jax.random.fold_in(key, i)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _block_gemm(
    policy: _BlockPolicy, lhs, rhs, lhs_fixed, rhs_fixed, probe, keys, hadamard_key, formats
):
    del probe, hadamard_key
    policy = _with_formats(policy, formats)
    ax = policy.axes
    ql = _operand(lhs, policy.inputs, lhs_fixed, ax.lhs, _fold(keys[0], 0), ax.lhs_batch)
    qr = _operand(rhs, policy.weights, rhs_fixed, ax.rhs, _fold(keys[1], 0), ax.rhs_batch)
    return policy.contract(ql, qr)


def _block_gemm_fwd(policy, lhs, rhs, lhs_fixed, rhs_fixed, probe, keys, hadamard_key, formats):
    y = _block_gemm(policy, lhs, rhs, lhs_fixed, rhs_fixed, probe, keys, hadamard_key, formats)
    return y, (lhs, rhs, lhs_fixed, rhs_fixed, keys, hadamard_key, formats)


def _block_gemm_bwd(policy: _BlockPolicy, residuals, dy):
    lhs, rhs, lhs_fixed, rhs_fixed, keys, hadamard_key, formats = residuals
    policy = _with_formats(policy, formats)
    ax, tg = policy.axes, policy.output_grads
    stats = None
    dy_for_weights, lhs_for_weights = dy, lhs
    if policy.hadamard is not None:
        # The same orthogonal R on the tokens of x and dY: (R x)^T (R dY) = x^T dY.
        rotation = random_hadamard(policy.hadamard, hadamard_key)
        tokens = free_axes(lhs.ndim, ax.lhs, ax.lhs_batch)
        lhs_for_weights = _rotate_tokens(lhs, tokens, rotation)
        dy_for_weights = _rotate_tokens(dy, ax.out_lhs, rotation)
        lhs_fixed = None  # a per-tensor copy must be requantized after the rotation
    if _is_block(tg):
        # dY along N for the input gradient, along the tokens for the weight gradient.
        dy_n = quantize_along(dy, tg, ax.out_rhs, _fold(keys[2], 1), ax.out_batch)
        dy_t = quantize_along(dy_for_weights, tg, ax.out_lhs, _fold(keys[2], 2), ax.out_batch)
        if policy.with_stats:
            stats = _merged_block_stats(dy, dy_n, tg, ax.out_rhs, ax.out_batch)
    elif tg is not None:
        scale = compute_scale(finite_amax(dy), tg.format, tg.scale_min, tg.margin)
        dy_n = dy_t = quantize(dy, tg.format, scale, rounding=tg.rounding, key=_fold(keys[2], 1))
        if policy.with_stats:
            stats = tensor_stats(dy, dy_n, as_params(tg.format), scale)
        if policy.hadamard is not None:
            dy_t = _per_tensor(dy_for_weights, tg, _fold(keys[2], 2))
    else:
        dy_n, dy_t = dy, dy_for_weights
    # W along N for the input gradient, x along the tokens for the weight gradient.
    w_n = _operand(
        rhs,
        policy.weights,
        rhs_fixed,
        free_axes(rhs.ndim, ax.rhs, ax.rhs_batch),
        _fold(keys[1], 1),
        ax.rhs_batch,
    )
    inputs = policy.inputs
    if policy.hadamard is not None and inputs is not None and not _is_block(inputs):
        x_t = _per_tensor(lhs_for_weights, inputs, _fold(keys[0], 1))
    else:
        x_t = _operand(
            lhs_for_weights,
            inputs,
            lhs_fixed,
            free_axes(lhs.ndim, ax.lhs, ax.lhs_batch),
            _fold(keys[0], 1),
            ax.lhs_batch,
        )
    _, lhs_vjp = jax.vjp(lambda a: policy.contract(a, w_n), lhs)
    _, rhs_vjp = jax.vjp(lambda b: policy.contract(x_t, b), rhs)
    (dx,) = lhs_vjp(dy_n)
    (dw,) = rhs_vjp(dy_t)
    probe_ct = None if stats is None else stats.to_probe()
    return dx, dw, None, None, probe_ct, None, None, None


_block_gemm.defvjp(_block_gemm_fwd, _block_gemm_bwd)


def _per_tensor(x: jax.Array, tq: TensorQuant, key: jax.Array | None) -> jax.Array:
    """``x`` with a current per-tensor scale (the rotated copies of the weight-gradient GEMM)."""
    scale = compute_scale(finite_amax(x), tq.format, tq.scale_min, tq.margin)
    return quantize(x, tq.format, scale, rounding=tq.rounding, key=key)


def random_hadamard(size: int, key: jax.Array) -> jax.Array:
    """``H diag(s) / sqrt(size)``: a Sylvester Hadamard matrix with random signs ``s`` from
    ``key``; orthogonal (float32)."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < size:
        h = np.block([[h, h], [h, -h]])
    signs = jnp.where(jax.random.bernoulli(key, 0.5, (size,)), 1.0, -1.0)
    return jnp.asarray(h) * signs[None, :] / jnp.sqrt(jnp.float32(size))


def _rotate_tokens(x: jax.Array, tokens: tuple[int, ...], rotation: jax.Array) -> jax.Array:
    """``rotation`` applied to consecutive groups of the (merged) token axes of ``x``."""
    size = rotation.shape[0]
    rest = free_axes(x.ndim, tokens)
    order = (*tokens, *rest)
    moved = jnp.transpose(x, order)
    count = math.prod(moved.shape[: len(tokens)])
    if count % size:
        raise ValueError(
            f"hadamard={size} needs a multiple of {size} tokens in the weight-gradient GEMM, "
            f"got {count}"
        )
    grouped = moved.reshape(count // size, size, -1)
    rotated = jnp.einsum("ij,gjk->gik", rotation, grouped, precision=jax.lax.Precision.HIGHEST)
    return jnp.transpose(rotated.reshape(moved.shape), np.argsort(order))


def _merged_block_stats(x, q, tq, axes, batch=()) -> QuantStats:
    """:func:`block_stats` of a tensor blocked along (possibly several, merged) ``axes``, per
    element of the ``batch`` axes (as :func:`quantize_along` blocks it)."""
    rest = free_axes(x.ndim, axes, batch)
    order = (*batch, *rest, *axes)
    shape = (math.prod(x.shape[a] for a in batch), math.prod(x.shape[a] for a in rest), -1)
    flat = lambda t: jnp.transpose(t, order).reshape(shape)  # noqa: E731
    return block_stats(flat(x), flat(q), tq.format, -1)


def _block_contract(contract, lhs, rhs, config, state, keys, axes):
    """:func:`quantized_contract` when some role has a block format."""
    axes = axes() if callable(axes) else axes
    changes: dict[str, AmaxHistory] = {}
    stats: dict[str, QuantStats] = {}
    fixed: dict[str, jax.Array | None] = {"inputs": None, "weights": None}
    operands = (
        ("inputs", lhs, axes.lhs, axes.lhs_batch),
        ("weights", rhs, axes.rhs, axes.rhs_batch),
    )
    for role, x, contracted, batch in operands:
        tq = config.role(role)
        if tq is None:
            continue
        if _is_block(tq):
            if config.stats:
                q = quantize_along(x, tq, contracted, _fold(keys[role], 0), batch)
                stats[role] = _merged_block_stats(x, q, tq, contracted, batch)
            continue
        fixed[role], changes[role], role_stats = _quantize_operand(
            x, tq, getattr(state, role), keys[role], config.stats
        )
        if role_stats is not None:
            stats[role] = role_stats
    grads = config.output_grads
    if grads is not None and not _is_block(grads) and grads.scaling != "current":
        raise ValueError(
            "with block formats the output gradient's per-tensor scale is current; "
            f"output-gradient scaling {grads.scaling!r} is not supported there"
        )
    probe = state.output_grads_stats
    roles = [_hoisted(config.role(r)) for r in ROLES]
    policy = _BlockPolicy(
        contract, axes, *(tq for tq, _ in roles), probe is not None, config.hadamard
    )
    formats = tuple(leaves for _, leaves in roles)
    role_keys_ = (keys["inputs"], keys["weights"], keys["output_grads"])
    hadamard_key = keys.get("hadamard")
    y = _block_gemm(
        policy,
        lhs,
        rhs,
        fixed["inputs"],
        fixed["weights"],
        probe,
        role_keys_,
        hadamard_key,
        formats,
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
