"""Shared pieces of the optax transforms: per-leaf formats, grid scales, sums.

Formats may be static (a :class:`FloatFormat`, resolved at trace time) or traced
(:class:`FormatParams` of arrays), so one compiled train step can serve every format. Everything
here works for both: format constants are read from ``FormatParams``, which holds Python ints for
a static format (folded away) and arrays for a traced one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from altgrad_jax.bits import power_of_two
from altgrad_jax.formats import FloatFormat, FormatParams, as_params
from altgrad_jax.rules import FormatSpec, leaf_format
from altgrad_jax.scaling import compute_scale

LeafFormat = FloatFormat | FormatParams
SCALE_MODES: tuple[str, ...] = ("pow2", "amax")


def check_scale(scale: float | str) -> float | str:
    """Validates a scale option: a positive float, "pow2" or "amax"."""
    if isinstance(scale, str):
        if scale not in SCALE_MODES:
            raise ValueError(f"unknown scale {scale!r}; expected a positive float or {SCALE_MODES}")
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < jnp.inf:
        raise ValueError(
            f"scale must be a positive finite float or one of {SCALE_MODES}, got {scale!r}"
        )
    return float(scale)


def iter_leaves(
    fmt: FormatSpec, params: Any
) -> Iterator[tuple[int, tuple, Any, LeafFormat | None]]:
    """Yields ``(index, path, leaf, format)`` over the flattened ``params``."""
    for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0]):
        yield i, path, leaf, leaf_format(fmt, path, leaf)


def find_states(opt_state: Any, state_type: type) -> list[Any]:
    """All states of ``state_type`` anywhere inside a (nested) optax state, in tree order."""
    found = jax.tree_util.tree_leaves(opt_state, is_leaf=lambda node: isinstance(node, state_type))
    return [node for node in found if isinstance(node, state_type)]


def max_value(fmt: LeafFormat) -> jax.Array:
    """The format's largest finite value as float32 (traced for ``FormatParams``)."""
    return as_params(fmt).max_value


def pow2_scale(amax: jax.Array, fmt: LeafFormat) -> jax.Array:
    """The smallest power of two ``s`` with ``amax / s <= max_value``.

    Weights stored at this scale never saturate, a power of two rescales them exactly, and the
    scale is a function of the weights alone, so the storage, the monitor and the ULP-aware
    transforms agree on the grid without sharing state. A zero (or non-finite) amax has no
    range to fit and falls back to a unit one, ``amax = 1``: formats that differ only by a power
    of two (E1M6 and E0M7) then keep the same grid even for all-zero tensors.
    """
    amax = jnp.asarray(amax, jnp.float32)
    ratio = amax / max_value(fmt)
    usable = (ratio > 0) & jnp.isfinite(ratio)
    ratio = jnp.where(usable, ratio, 1 / max_value(fmt))
    mantissa, exponent = jnp.frexp(ratio)
    ceil_log2 = jnp.where(mantissa == 0.5, exponent - 1, exponent)
    return power_of_two(jnp.clip(ceil_log2, -126, 127))


def resolve_scale(scale: float | str, x: jax.Array, fmt: LeafFormat) -> jax.Array | float:
    """The quantization scale of ``x``: fixed, :func:`pow2_scale` or the seed's amax scaling."""
    if not isinstance(scale, str):
        return scale
    amax = jnp.max(jnp.abs(x), initial=0.0).astype(jnp.float32)
    return pow2_scale(amax, fmt) if scale == "pow2" else compute_scale(amax, fmt)


class RunningSum(NamedTuple):
    """A float32 sum with Kahan compensation, so long runs of small terms are not lost."""

    total: jax.Array
    compensation: jax.Array

    @classmethod
    def zero(cls) -> RunningSum:
        return cls(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))

    def add(self, value: jax.Array) -> RunningSum:
        y = jnp.asarray(value, jnp.float32) - self.compensation
        total = self.total + y
        return RunningSum(total, (total - self.total) - y)
