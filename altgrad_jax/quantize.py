"""Fake quantization: round to a format's grid and back, with a straight-through gradient.

``quantize(x, fmt, scale)`` returns ``round_fmt(x / scale) * scale`` in x's dtype. The rounding is
the integer kernel of :mod:`altgrad_jax.bits` (bit-exact round-to-nearest-even, checked against
ml_dtypes), so the forward pass is exact; the backward pass is the straight-through estimator
(Bengio et al., 2013): d quantize / dx = 1, optionally zeroed where x saturated.

``fmt`` may be a :class:`FloatFormat` (static: everything format-specific folds into constants)
or a :class:`FormatParams` of arrays (traced: one compiled program serves every format, and
``vmap`` can run over a stack of formats).

The scale, without float arithmetic on subnormals. Devices flush float32 subnormals in float
multiplies (XLA:CPU does, GPUs do in fast modes), which would turn ``1e-40 / 3`` into 0 and E8M0's
code 0, ``2**-127``, into 0. So a scale is split from its bits as ``scale = m * 2**k`` with
``m`` in ``[1, 2)`` (:func:`altgrad_jax.bits.split_scale`), and both multiplies go through
:func:`altgrad_jax.bits.scale_float32`, which multiplies normalised significands (normal floats
only) and applies ``2**k`` on the exponent field in integers, rounding into float32's subnormal
range exactly once:

* forward ``y = x * (1 / scale)`` is ``x * r * 2**-k`` with ``r = 1 / m`` rounded to float32,
  rounded once: bit for bit IEEE float32 ``x * (1 / scale)`` with gradual underflow whenever
  ``1 / scale`` is a float32 normal (every scale up to ``2**126``). For a power of two
  ``r = 1`` and it is exact (integer arithmetic only for concrete scales); a ``y`` beyond
  float32's range becomes float32's largest finite value, so a finite ``x`` saturates to
  ``max_value`` instead of reaching inf through the scale;
* back, ``q * scale = q * m * 2**k`` rounded once, which is IEEE float32 ``q * scale`` exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from altgrad_jax._checks import check_choice
from altgrad_jax.bits import ROUNDING_MODES, Rounding, round_float32, scale_float32, split_scale
from altgrad_jax.blocks import quantize_blocks
from altgrad_jax.formats import (
    ANY_FORMAT,
    BlockFormat,
    FormatLike,
    FormatParams,
    as_params,
    get_format,
)

__all__ = ["quantize", "random_bits"]

# The input dtypes quantize computes exactly: each widens to float32 without rounding.
_EXACT_INPUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_F32_MAX_BITS = 0x7F7FFFFF


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


_F32_MIN_NORMAL = 2.0**-126
_F32_MAX = float(np.finfo(np.float32).max)


def _check_scale(scale, x_shape: tuple[int, ...]) -> np.ndarray | None:
    """Checks a scale against ``x``; returns it as float32 NumPy when concrete (else None).

    A scale must broadcast *to* ``x``'s shape (it may not grow the result). A concrete scale is
    checked as it will be used, in float32: positive, finite and normal (2**-126 to float32's
    max). A value that float32 turns into 0, a subnormal or inf (``1e-50``, ``1e-45``, ``1e39``)
    would otherwise silently give zeros or NaN.
    """
    shape = np.shape(scale)
    try:
        fits = np.broadcast_shapes(shape, x_shape) == tuple(x_shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"scale of shape {shape} does not broadcast to x's shape {tuple(x_shape)}; a scale "
            f"must be a scalar or have a shape that broadcasts to x's (it never grows x)"
        )
    if isinstance(scale, jax.core.Tracer):
        return None
    values = np.asarray(scale, dtype=np.float64)
    with np.errstate(over="ignore", under="ignore"):
        as_f32 = values.astype(np.float32)
    good = (as_f32 >= _F32_MIN_NORMAL) & (as_f32 <= _F32_MAX)  # False for NaN
    if not np.all(good):
        bad = values[~good].ravel()[0]
        raise ValueError(
            f"scale must be positive, finite and a normal float32 (2**-126 <= scale <= "
            f"{_F32_MAX:.6g}); got {float(bad)!r}, which is {float(as_f32[~good].ravel()[0])!r} "
            f"in float32"
        )
    return as_f32


def _scale_parts(scale, concrete: np.ndarray | None):
    """``(k, 1 / m, m)`` for ``scale = m * 2**k`` (``m`` in [1, 2)); the factors are None when
    the scale is a concrete power of two, so that path is integer arithmetic only."""
    k, m = split_scale(scale if concrete is None else concrete)
    if concrete is not None and np.all((concrete.view(np.uint32) & 0x7FFFFF) == 0):
        return k, None, None
    return k, 1 / m, m


def _check_input(x: jax.Array, params: FormatParams, name: str | None) -> None:
    """Raises unless ``x`` is float32, or a smaller float dtype holding every value of the
    format (for traced formats, ``name`` None: of every format its static bounds cover)."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantize takes floating-point input, got dtype {x.dtype}")
    if x.dtype not in _EXACT_INPUT_DTYPES:
        raise TypeError(
            f"quantize computes in float32 and supports float32, bfloat16 and float16 input; "
            f"got {x.dtype} (cast it first)"
        )
    if x.dtype == jnp.float32 or params.bounds is None:
        return
    info = jnp.finfo(x.dtype)
    if params.bounds.fits(info.nmant, float(info.max), float(info.smallest_subnormal)):
        return
    if name is not None:
        raise ValueError(
            f"{name} values are not all representable in {x.dtype}, so the result would be "
            f"rounded again; quantize a float32 copy instead"
        )
    if params.bounds == ANY_FORMAT:
        raise ValueError(
            f"traced FormatParams from as_arrays() may hold any format, so they take float32 "
            f"input only, not {x.dtype}; name the formats they may hold with "
            f"format_params(fmt).as_arrays(within=(...)) or quantize a float32 copy"
        )
    raise ValueError(
        f"the traced format's bounds {params.bounds} do not fit {x.dtype} (some value of a "
        f"format they cover is not representable in it); quantize a float32 copy instead"
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

    ``x / scale`` is computed as ``x * (1 / scale)`` in float32 (what XLA compiles a division by
    a scalar to anyway), exactly as IEEE arithmetic with gradual underflow rounds it, whatever
    the device does with subnormals (see the module docstring); it is exact for power-of-two
    scales.

    Args:
      x: float32, bfloat16 or float16 array (the smaller dtypes widen to float32 exactly).
      fmt: a format, its name, or :class:`FormatParams` arrays for a traced format.
      scale: positive scale, a scalar or an array that broadcasts *to* ``x``'s shape (checked at
        trace time); no gradient flows into it. Concrete scales must be positive, finite and
        normal in float32 (``ValueError`` otherwise); a traced scale that is not positive and
        finite gives NaN (a traced subnormal scale, such as E8M0's ``2**-127``, is exact).
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
    _check_input(x, params, None if isinstance(fmt, FormatParams) else get_format(fmt).name)
    concrete_scale = _check_scale(scale, x.shape)
    unit_scale = isinstance(scale, (int, float)) and scale == 1

    x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
    if unit_scale:
        scaled = x32
    else:
        k, inverse, factor = _scale_parts(scale, concrete_scale)
        scaled = scale_float32(x32, inverse, -k, overflow=_F32_MAX_BITS)
    noise = random_bits(key, scaled.shape) if rounding == "stochastic" else None
    rounded = round_float32(scaled, params, rounding, noise)
    if unit_scale:
        back = rounded
    else:
        back = scale_float32(rounded, factor, k)
        if concrete_scale is None:  # a traced scale that is not positive and finite: NaN
            bits = jax.lax.bitcast_convert_type(jnp.asarray(scale, jnp.float32), jnp.int32)
            valid = (bits > 0) & (bits < 0x7F800000)  # integers: a subnormal scale is valid
            back = jnp.where(valid, back, jnp.float32(jnp.nan))
    quantized = back.astype(x.dtype)
    if not clip_gradient:
        return _straight_through(x, quantized)
    return _clipped_straight_through(x, quantized, jnp.abs(scaled) <= params.max_value)


def _quantize_blocked(x, fmt: BlockFormat, scale, rounding, key, axis) -> jax.Array:
    if not (isinstance(scale, (int, float)) and scale == 1):
        raise ValueError(
            f"{fmt.name} takes its scales from its blocks; do not pass scale={scale!r}"
        )
    _check_input(x, as_params(fmt.element), fmt.element.name)
    x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
    noise = random_bits(key, x32.shape) if rounding == "stochastic" else None
    quantized = quantize_blocks(x32, fmt, axis, rounding, noise).astype(x.dtype)
    return _straight_through(x, quantized)
