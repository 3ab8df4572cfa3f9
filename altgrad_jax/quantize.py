"""Fake quantization: round to a format's grid and back, with a straight-through gradient.

``quantize(x, fmt, scale)`` returns ``round_fmt(x / scale) * scale`` in x's dtype. The rounding is
the integer kernel of :mod:`altgrad_jax.bits` (bit-exact round-to-nearest-even, checked against
ml_dtypes), so the forward pass is exact; the backward pass is the straight-through estimator
(Bengio et al., 2013): d quantize / dx = 1, optionally zeroed where x saturated.

``fmt`` may be a :class:`FloatFormat` (static: everything format-specific folds into constants)
or a :class:`FormatParams` of arrays (traced: one compiled program serves every format, and
``vmap`` can run over a stack of formats).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from altgrad_jax._checks import check_choice
from altgrad_jax.bits import ROUNDING_MODES, Rounding, round_float32
from altgrad_jax.blocks import quantize_blocks
from altgrad_jax.formats import (
    BlockFormat,
    FloatFormat,
    FormatLike,
    FormatParams,
    as_params,
    get_format,
)

__all__ = ["quantize", "random_bits"]

# The input dtypes quantize computes exactly: each widens to float32 without rounding.
_EXACT_INPUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 random bits for stochastic rounding, cheap enough to run at memory speed.

    One draw from ``key`` seeds a counter-based hash of the element index (two rounds of
    multiply / xor-shift, the "lowbias32" mixer of C. Wellons' hash prospector): far cheaper than
    threefry per element, and ample for rounding decisions. Same key, same bits.
    """
    seed = jax.random.bits(key, (2,), jnp.uint32)
    size = int(np.prod(shape, dtype=np.int64))
    if size >= 2**32:
        raise ValueError(f"stochastic rounding supports up to 2**32 elements, got {size}")
    h = jax.lax.iota(jnp.uint32, size).reshape(shape) * jnp.uint32(0x9E3779B9) + seed[0]
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x7FEB352D)
    h = (h ^ (h >> 15)) ^ seed[1]
    h = h * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


@jax.custom_jvp
def _straight_through(x: jax.Array, quantized: jax.Array) -> jax.Array:
    return quantized


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    _x, quantized = primals
    x_dot, _ = tangents
    return quantized, x_dot


@jax.custom_jvp
def _clipped_straight_through(x: jax.Array, quantized: jax.Array, inside: jax.Array) -> jax.Array:
    return quantized


@_clipped_straight_through.defjvp
def _clipped_straight_through_jvp(primals, tangents):
    _x, quantized, inside = primals
    x_dot = tangents[0]
    return quantized, jnp.where(inside, x_dot, jnp.zeros_like(x_dot))


def _check_scale(scale) -> None:
    """Raises for a concrete scale that is not positive and finite (traced scales pass)."""
    if isinstance(scale, jax.core.Tracer):
        return
    values = np.asarray(scale, dtype=np.float64)
    if values.size and not (np.all(values > 0) and np.all(np.isfinite(values))):
        bad = values[~((values > 0) & np.isfinite(values))].ravel()[0]
        raise ValueError(f"scale must be positive and finite, got {bad}")


def _check_input(x: jax.Array, fmt: FloatFormat | None) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantize takes floating-point input, got dtype {x.dtype}")
    if x.dtype not in _EXACT_INPUT_DTYPES:
        raise TypeError(
            f"quantize computes in float32 and supports float32, bfloat16 and float16 input; "
            f"got {x.dtype} (cast it first)"
        )
    if fmt is None or x.dtype == jnp.float32:
        return
    info = jnp.finfo(x.dtype)
    fits = (
        fmt.mantissa_bits <= info.nmant
        and fmt.max_value <= float(info.max)
        and fmt.min_subnormal >= float(info.smallest_subnormal)
    )
    if not fits:
        raise ValueError(
            f"{fmt.name} values are not all representable in {x.dtype}, so the result would be "
            f"rounded again; quantize a float32 copy instead"
        )


def quantize(
    x: jax.Array,
    fmt: FormatLike,
    scale: float | jax.Array = 1.0,
    *,
    rounding: Rounding = "nearest",
    key: jax.Array | None = None,
    clip_gradient: bool = False,
    axis: int | tuple[int, ...] | None = None,
) -> jax.Array:
    """Fake-quantizes ``x``: ``round_fmt(x / scale) * scale``, same shape and dtype as ``x``.

    With a :class:`~altgrad_jax.formats.BlockFormat` the scales come from the blocks along
    ``axis`` (default: the last axis, or the last two for 2-D tiles), see
    :mod:`altgrad_jax.blocks`; ``scale`` must then stay 1.

    ``x / scale`` is computed as ``x * (1 / scale)`` in float32, which is what XLA compiles the
    division by a scalar to anyway; it is exact for power-of-two scales.

    Args:
      x: float32, bfloat16 or float16 array (the smaller dtypes widen to float32 exactly).
      fmt: a format, its name, or :class:`FormatParams` arrays for a traced format.
      scale: positive scale, a scalar or anything that broadcasts against ``x``; no gradient
        flows into it. Concrete scales are checked (positive, finite) at trace time.
      rounding: "nearest" (ties to the even code), "stochastic" (unbiased, needs ``key``) or
        "toward_zero".
      key: PRNG key for stochastic rounding; the same key gives the same result.
      clip_gradient: zero the gradient where ``|x / scale|`` exceeded ``max_value`` (saturated)
        instead of passing it straight through. Off by default.

    Returns:
      The quantized array. Finite overflow and inf saturate to ``±max_value * scale`` (inf stays
      inf in formats with inf), NaN stays NaN.
    """
    check_choice("rounding", rounding, ROUNDING_MODES)
    if rounding == "stochastic" and key is None:
        raise ValueError("rounding='stochastic' needs a PRNG key: quantize(..., key=key)")
    x = jnp.asarray(x)
    if not isinstance(fmt, FormatParams) and isinstance(get_format(fmt), BlockFormat):
        return _quantize_blocked(x, get_format(fmt), scale, rounding, key, axis)
    if axis is not None:
        raise ValueError(f"axis={axis!r} is for block formats; {fmt!r} scales the whole tensor")
    params = as_params(fmt)
    static_fmt = None if isinstance(fmt, FormatParams) else get_format(fmt)
    _check_input(x, static_fmt)
    _check_scale(scale)
    unit_scale = isinstance(scale, (int, float)) and scale == 1

    x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
    # XLA compiles a division by a broadcast scalar into a multiplication by its reciprocal;
    # doing so explicitly gives the same bits eagerly, under jit, and for traced formats.
    scaled = x32 if unit_scale else x32 * (1 / jnp.asarray(scale, jnp.float32))
    noise = random_bits(key, scaled.shape) if rounding == "stochastic" else None
    rounded = round_float32(scaled, params, rounding, noise)
    back = rounded if unit_scale else rounded * jnp.asarray(scale, jnp.float32)
    quantized = back.astype(x.dtype)
    if not clip_gradient:
        return _straight_through(x, quantized)
    return _clipped_straight_through(x, quantized, jnp.abs(scaled) <= params.max_value)


def _quantize_blocked(x, fmt: BlockFormat, scale, rounding, key, axis) -> jax.Array:
    if not (isinstance(scale, (int, float)) and scale == 1):
        raise ValueError(
            f"{fmt.name} takes its scales from its blocks; do not pass scale={scale!r}"
        )
    _check_input(x, fmt.element)
    x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
    noise = random_bits(key, x32.shape) if rounding == "stochastic" else None
    quantized = quantize_blocks(x32, fmt, axis, rounding, noise).astype(x.dtype)
    return _straight_through(x, quantized)
