"""Shared pieces of the optax transforms: per-leaf formats, grid scales, grid spacing, sums.

Formats may be static (a :class:`FloatFormat`, resolved at trace time) or traced
(:class:`FormatParams` of arrays), so one compiled train step can serve every format. Everything
here works for both: format constants are read from ``FormatParams``, which holds Python ints for
a static format (folded away) and arrays for a traced one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from altgrad_jax.formats import FloatFormat, FormatParams, format_params, get_format
from altgrad_jax.scaling import compute_scale

FormatSpec = FloatFormat | str | FormatParams | Callable[..., Any]
"""One format for every leaf, or a rule ``(path, leaf) -> format | None`` such as ``PathRules``."""

LeafFormat = FloatFormat | FormatParams
SCALE_MODES: tuple[str, ...] = ("pow2", "amax")

_U32 = jnp.uint32


def check_format_spec(fmt: FormatSpec) -> FormatSpec:
    """Validates a format spec at construction time; returns it with names resolved."""
    if isinstance(fmt, (FloatFormat, FormatParams)):
        return fmt
    if isinstance(fmt, str):
        return get_format(fmt)
    if callable(fmt):
        for _, value in getattr(fmt, "rules", ()):
            if value is not None and not isinstance(value, FormatParams):
                get_format(value)
        return fmt
    raise TypeError(
        f"format must be a FloatFormat, a format name, FormatParams or a rule "
        f"(path, leaf) -> format | None such as PathRules; got {fmt!r}"
    )


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


def leaf_format(fmt: FormatSpec, path: tuple, leaf: Any) -> LeafFormat | None:
    """The format of one leaf, or None when the leaf is skipped (rule says None, or not float)."""
    if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
        return None
    if isinstance(fmt, (FloatFormat, FormatParams)):
        return fmt
    value = fmt(path, leaf)
    if value is None or isinstance(value, FormatParams):
        return value
    return get_format(value)


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


def kernel_params(fmt: LeafFormat) -> FormatParams:
    return fmt if isinstance(fmt, FormatParams) else format_params(fmt)


def _as_f32(bits: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def max_value(fmt: LeafFormat) -> jax.Array:
    """The format's largest finite value as float32 (traced for ``FormatParams``)."""
    return _as_f32(jnp.asarray(kernel_params(fmt).max_bits, _U32))


def _floor_log2(a: jax.Array) -> jax.Array:
    """floor(log2(a)) for non-negative float32 ``a`` from its bits (int32; zero gives -150)."""
    bits = jax.lax.bitcast_convert_type(a, _U32)
    field = (bits >> 23).astype(jnp.int32)
    subnormal = (31 - jax.lax.clz(bits).astype(jnp.int32)) - 149
    return jnp.where(field > 0, field - 127, subnormal)


def power_of_two(exponent: jax.Array) -> jax.Array:
    """2**exponent as float32, exactly, for integer exponents in [-149, 127]."""
    exponent = jnp.asarray(exponent, jnp.int32)
    normal = (jnp.clip(exponent, -126, 127) + 127).astype(_U32) << 23
    subnormal = _U32(1) << jnp.clip(exponent + 149, 0, 22).astype(_U32)
    return _as_f32(jnp.where(exponent >= -126, normal, subnormal))


def _exponent_range(fmt: LeafFormat) -> tuple[jax.Array, jax.Array]:
    """(emin, emax): exponents of the lowest binade and of the one holding max_value."""
    p = kernel_params(fmt)
    emin = jnp.asarray(p.min_normal_field, jnp.int32) - 127
    emin = emin - (1 - jnp.asarray(p.has_zero, jnp.int32))
    return emin, _floor_log2(max_value(fmt))


def grid_spacing(x: jax.Array, fmt: LeafFormat) -> jax.Array:
    """The format's grid spacing at |x| (its ULP), for static or traced formats; float32.

    Equal to :func:`altgrad_jax.ulp` for finite ``x``: ``2**(e - M)`` for |x| in
    ``[2**e, 2**(e+1))``, clipped to the format's binades (the subnormal quantum below, the top
    binade above). Fixed point has one binade, so its spacing is the quantum everywhere.
    """
    p = kernel_params(fmt)
    emin, emax = _exponent_range(fmt)
    exponent = jnp.maximum(jnp.minimum(_floor_log2(jnp.abs(x).astype(jnp.float32)), emax), emin)
    return power_of_two(exponent - jnp.asarray(p.mantissa_bits, jnp.int32))


def pow2_scale(amax: jax.Array, fmt: LeafFormat) -> jax.Array:
    """The smallest power of two ``s`` with ``amax / s <= max_value`` (1.0 for zero or non-finite).

    Weights stored at this scale never saturate, a power of two rescales them exactly, and the
    scale is a function of the weights alone, so the storage, the monitor and the ULP-aware
    transforms agree on the grid without sharing state.
    """
    amax = jnp.asarray(amax, jnp.float32)
    ratio = amax / max_value(fmt)
    mantissa, exponent = jnp.frexp(ratio)
    ceil_log2 = jnp.where(mantissa == 0.5, exponent - 1, exponent)
    usable = (ratio > 0) & jnp.isfinite(ratio)
    return jnp.where(usable, power_of_two(jnp.clip(ceil_log2, -126, 127)), jnp.float32(1.0))


def resolve_scale(scale: float | str, x: jax.Array, fmt: LeafFormat) -> jax.Array | float:
    """The quantization scale of ``x``: fixed, :func:`pow2_scale` or the seed's amax scaling."""
    if not isinstance(scale, str):
        return scale
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
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


def safe_ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, 0 where the denominator is 0."""
    numerator = jnp.asarray(numerator, jnp.float32)
    denominator = jnp.asarray(denominator, jnp.float32)
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)
