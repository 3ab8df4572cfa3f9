"""ULP-aware updates: steps measured in grid steps of the weight format, not in real distance.

The project this library grew from had a "manifold-aware" optimizer that multiplied the gradient
by the stiffness ``2**(floor(log2|w|) - M)`` (the weight's ULP) *before* Adam. Adam divides by
the root mean square of what it is fed, so a per-weight factor that changes slowly cancels: the
result is plain Adam (with an epsilon that now varies per weight). :func:`scale_by_stiffness`
keeps that variant for reproduction.

The effective place for the ULP is *after* the optimizer: :func:`scale_by_ulp` reads the
incoming updates as numbers of grid steps and multiplies them by the grid spacing at each
weight, so ``k`` moves a weight exactly ``k`` representable values (within a binade; one step
is exact across binade edges too). :func:`grid_sgd` goes further and does SGD on the index of
the sorted grid itself, rounding fractional steps stochastically, so every step lands on the
grid and small gradients move weights in expectation.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from altgrad_jax.bits import power_of_two, ulp
from altgrad_jax.formats import FloatFormat, as_params
from altgrad_jax.optim._common import (
    LeafFormat,
    check_scale,
    flatten_params,
    iter_leaves,
    max_value,
    rebox,
    resolve_scale,
    unbox,
)
from altgrad_jax.quantize import quantize, random_bits
from altgrad_jax.rules import FormatSpec, check_format_spec

__all__ = [
    "GridSGDState",
    "grid_sgd",
    "grid_to_rung",
    "rung_to_grid",
    "scale_by_stiffness",
    "scale_by_ulp",
]

_U32 = jnp.uint32


def _map_leaves(fmt: FormatSpec, updates: Any, params: Any, fn, dtype=None) -> Any:
    """Applies ``fn(index, u, w, leaf_format)`` to leaves with a format; others pass through.

    Results take ``dtype(w)`` if given, else the update's dtype; boxed updates (NNX variables,
    Linen partitioning) stay boxed.
    """
    layout = flatten_params(params)[3]
    out = layout.flatten_up_to(updates)
    for i, _, w, leaf_fmt in iter_leaves(fmt, params):
        if leaf_fmt is not None:
            u = unbox(out[i])
            to = jnp.asarray(u).dtype if dtype is None else dtype(w)
            out[i] = rebox(out[i], fn(i, u, w, leaf_fmt).astype(to))
    return layout.unflatten(out)


def _spacing_toward(w: jax.Array, direction: jax.Array, fmt: LeafFormat) -> jax.Array:
    """Grid spacing next to ``w`` on the side ``direction`` points to (unit-scale values).

    Moving toward zero from a power of two enters the binade below, whose spacing is half, so
    the spacing is taken just below |w| there.
    """
    a = jnp.abs(w).astype(jnp.float32)
    toward_zero = (direction * w < 0) & (a > 0)
    below = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(a, _U32) - 1, jnp.float32)
    return ulp(jnp.where(toward_zero, below, a), fmt)


def scale_by_ulp(
    fmt: FormatSpec, *, scale: float | Literal["pow2"] = "pow2"
) -> optax.GradientTransformation:
    """Reads updates as numbers of grid steps and turns them into real steps: ``u * ulp(w)``.

    Put it after the optimizer's normalisation, e.g. ``chain(scale_by_adam(), scale(-k),
    scale_by_ulp(fmt))`` moves each weight about ``k`` representable values per step whatever
    its magnitude. For weights on the grid an integer ``k`` lands exactly ``k`` values away
    within a binade, and ``k = ±1`` is exact everywhere (away from the format's ends).

    Args:
      fmt: a format, its name, traced ``FormatParams``, or a rule ``(path, leaf) -> format``.
      scale: "pow2" (the grid of :func:`low_precision_storage`) or a fixed positive float.
    """
    fmt = check_format_spec(fmt)
    scale = check_scale(scale)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_ulp needs params: update(updates, state, params)")

        def leaf(_, u, w, leaf_fmt):
            w32, u32 = jnp.asarray(w, jnp.float32), jnp.asarray(u, jnp.float32)
            s = resolve_scale(scale, w32, leaf_fmt)
            return u32 * (_spacing_toward(w32 / s, u32, leaf_fmt) * s)

        return _map_leaves(fmt, updates, params, leaf), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def scale_by_stiffness(
    fmt: FormatSpec, *, scale: float | Literal["pow2"] = 1.0
) -> optax.GradientTransformation:
    """The original "manifold-aware" step: gradients times ``2**(floor(log2|w|) - M)``.

    Meant to go *before* the optimizer, as the original did. Kept for reproduction: Adam's
    normalisation cancels the factor (see the module docstring), so ``chain(scale_by_stiffness(
    fmt), adam(lr))`` behaves like ``adam(lr)``. The exponent is clipped to the format's binades.

    Args:
      fmt: a format, its name, traced ``FormatParams``, or a rule ``(path, leaf) -> format``.
      scale: the weights' scale; 1.0 (unscaled, as the original) by default.
    """
    fmt = check_format_spec(fmt)
    scale = check_scale(scale)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_stiffness needs params: update(updates, state, params)")

        def leaf(_, g, w, leaf_fmt):
            w32 = jnp.asarray(w, jnp.float32)
            s = resolve_scale(scale, w32, leaf_fmt)
            return jnp.asarray(g, jnp.float32) * (ulp(w32 / s, leaf_fmt) * s)

        return _map_leaves(fmt, updates, params, leaf), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


# ------------------------------------------------------------------------------ grid rungs
def _rung_constants(fmt: LeafFormat) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(M, float32 bits of 2**emin, 2**M, quantum 2**(emin - M)) of a signed format with zero."""
    p = as_params(fmt)
    m = jnp.asarray(p.mantissa_bits, jnp.int32)
    min_normal_bits = jnp.asarray(p.min_normal_field, _U32) << 23
    first_normal_rung = jnp.left_shift(1, m)
    quantum = power_of_two(jnp.asarray(p.min_normal_field, jnp.int32) - 127 - m)
    return m, min_normal_bits, first_normal_rung, quantum


def grid_to_rung(x: jax.Array, fmt: LeafFormat) -> jax.Array:
    """Signed index of grid values along the sorted grid (0 at zero): the magnitude code.

    ``x`` must be on the (unit-scale) grid of a signed format with a zero; int32.
    """
    m, min_normal_bits, first_normal_rung, quantum = _rung_constants(fmt)
    a = jnp.abs(x).astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(a, _U32)
    low = (a / quantum).astype(jnp.int32)
    high = first_normal_rung + ((bits - min_normal_bits) >> (23 - m).astype(_U32)).astype(jnp.int32)
    magnitude = jnp.where(bits < min_normal_bits, low, high)
    return jnp.where(x < 0, -magnitude, magnitude)


def rung_to_grid(rung: jax.Array, fmt: LeafFormat) -> jax.Array:
    """Inverse of :func:`grid_to_rung`: the grid value at a signed rung (float32)."""
    m, min_normal_bits, first_normal_rung, quantum = _rung_constants(fmt)
    r = jnp.abs(rung).astype(jnp.int32)
    low = r.astype(jnp.float32) * quantum
    high_bits = min_normal_bits + ((r - first_normal_rung).astype(_U32) << (23 - m).astype(_U32))
    high = jax.lax.bitcast_convert_type(high_bits, jnp.float32)
    magnitude = jnp.where(r < first_normal_rung, low, high)
    return jnp.where(rung < 0, -magnitude, magnitude)


def _float32_or_wider(w: Any) -> Any:
    return jnp.promote_types(jnp.asarray(w).dtype, jnp.float32)


class GridSGDState(NamedTuple):
    """State of :func:`grid_sgd`: the PRNG key for rounding fractional rungs."""

    key: jax.Array


def grid_sgd(
    learning_rate: float | jax.Array,
    fmt: FormatSpec,
    *,
    scale: float | Literal["pow2"] = "pow2",
    seed: int | jax.Array = 0,
) -> optax.GradientTransformation:
    """SGD on the rung index of the format's sorted grid, fractional rungs rounded stochastically.

    Each weight moves ``-learning_rate * g`` rungs (representable values), rounded up or down
    with probabilities that make the move unbiased, and clipped to the format's ends. The new
    weight is always a grid value, so no update stalls in expectation, whatever the binade.

    Args:
      learning_rate: rungs per unit of gradient.
      fmt: a signed format with a zero (a format, its name or traced ``FormatParams``), or a
        rule ``(path, leaf) -> format | None``; other leaves get no update.
      scale: "pow2" (the grid of :func:`low_precision_storage`) or a fixed positive float.
      seed: PRNG seed (an int or a key).

    Returns:
      A transformation whose updates are ``Q_grid(w) moved - w``.
    """
    fmt = check_format_spec(fmt)
    scale = check_scale(scale)

    def init_fn(params):
        for _, _, _, leaf_fmt in iter_leaves(fmt, params):
            if isinstance(leaf_fmt, FloatFormat) and not (leaf_fmt.signed and leaf_fmt.has_zero):
                raise ValueError(f"grid_sgd needs a signed format with a zero, got {leaf_fmt}")
        return GridSGDState(jax.random.key(seed) if isinstance(seed, int) else seed)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("grid_sgd needs params: update(updates, state, params)")
        key, step_key = jax.random.split(state.key)
        lr = jnp.asarray(learning_rate, jnp.float32)

        def leaf(i, g, w, leaf_fmt):
            w32 = jnp.asarray(w, jnp.float32)
            s = resolve_scale(scale, w32, leaf_fmt)
            rung = grid_to_rung(quantize(w32, leaf_fmt, s) / s, leaf_fmt)
            step = -lr * jnp.asarray(g, jnp.float32)
            uniform = (random_bits(jax.random.fold_in(step_key, i), w32.shape) >> 8).astype(
                jnp.float32
            ) * jnp.float32(2.0**-24)
            limit = grid_to_rung(max_value(leaf_fmt), leaf_fmt)
            moved = jnp.clip(jnp.floor(step + uniform), -2 * limit, 2 * limit).astype(jnp.int32)
            target = rung_to_grid(jnp.clip(rung + moved, -limit, limit), leaf_fmt) * s
            return target - w32

        # float32 moves (as the storage's): w + (target - w) is then a float32 sum.
        moves = _map_leaves(fmt, updates, params, leaf, _float32_or_wider)
        return moves, GridSGDState(key)

    return optax.GradientTransformation(init_fn, update_fn)
