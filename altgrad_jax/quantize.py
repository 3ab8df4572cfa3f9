"""Fake quantization: round to a format's grid and back, with a straight-through gradient.

``quantize(x, fmt, scale)`` returns ``round_fmt(x / scale) * scale`` in x's dtype. The rounding is
the integer kernel of :mod:`altgrad_jax.bits` (bit-exact round-to-nearest-even, checked against
ml_dtypes), so the forward pass is exact; the backward pass is the straight-through estimator
(Bengio et al., 2013): d quantize / dx = 1, optionally zeroed where x saturated.

``fmt`` may be a :class:`FloatFormat` (static: everything format-specific folds into constants)
or a :class:`FormatParams` of arrays (traced: one compiled program serves every format, and
``vmap`` can run over a stack of formats).

The scale, exact whatever the device does with subnormals. Devices flush float32 subnormals in
float multiplies (XLA:CPU does, GPUs do in fast modes), which would turn ``1e-40 / 3`` into 0 and
E8M0's code 0, ``2**-127``, into 0. Two paths give the same bits:

* the float path, ``y = x * (1 / scale)`` and ``q * scale`` as plain float32 multiplies, taken
  only where no flush can change the result: the scale is normal with ``scale * min_value >=
  2**-124``, the format signed with a zero and ``min_value >= 2**-124``, and the rounding
  nearest or toward zero. Then every product that could be flushed (or that a subnormal ``x``
  would give) lies below ``min_value / 4`` and rounds to the same signed zero either way, and
  ``q * scale`` is never subnormal. This is the common case and runs at the speed of two
  multiplies. The test is on scalars (a static choice, or one ``lax.cond`` for traced scales
  and formats);
* the exact path elsewhere: the scale is split from its bits as ``scale = m * 2**k`` with ``m``
  in ``[1, 2)`` (:func:`altgrad_jax.bits.split_scale`), and both multiplies go through
  :func:`altgrad_jax.bits.scale_float32`, which multiplies normalised significands (normal
  floats only) and applies ``2**k`` on the exponent field in integers, rounding into float32's
  subnormal range exactly once.

Both compute:

* forward ``y = x * (1 / scale)``: ``x * r * 2**-k`` with ``r = 1 / m`` rounded to float32,
  rounded once: bit for bit IEEE float32 ``x * (1 / scale)`` with gradual underflow whenever
  ``1 / scale`` is a float32 normal (every scale up to ``2**126``). For a power of two
  ``r = 1`` and it is exact. A ``y`` beyond float32's range becomes float32's largest finite
  value, so a finite ``x`` saturates to ``max_value`` instead of reaching inf through the scale;
* back, ``q * scale`` rounded once, which is IEEE float32 ``q * scale`` exactly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from altgrad_jax._checks import check_choice
from altgrad_jax._eager import is_traced
from altgrad_jax.bits import ROUNDING_MODES, Rounding, round_float32, scale_float32, split_scale
from altgrad_jax.blocks import element_params, quantize_blocks
from altgrad_jax.formats import (
    ANY_FORMAT,
    BlockFormat,
    BlockParams,
    FormatLike,
    FormatParams,
    as_params,
    get_format,
)

__all__ = ["quantize", "quantize_flax", "random_bits"]

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
      fmt: a format, its name, or :class:`FormatParams` arrays for a traced format (a block
        format with a traced element: :class:`~altgrad_jax.formats.BlockParams`).
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
    traced = fmt if isinstance(fmt, (FormatParams, BlockParams)) else None
    static = None if traced is not None else get_format(fmt)
    unit_scale = isinstance(scale, (int, float)) and scale == 1
    block = _block_format(static, traced)
    if block is not None:
        if not unit_scale:
            raise ValueError(
                f"{block.name} takes its scales from its blocks; do not pass scale={scale!r}"
            )
        name = block.element.name if isinstance(block, BlockFormat) else None
        _check_input(x, element_params(block), name)
    else:
        if axis is not None:
            raise ValueError(f"axis={axis!r} is for block formats; {fmt!r} scales the whole tensor")
        _check_input(x, as_params(fmt), None if traced is not None else static.name)
    concrete_scale = None if unit_scale else _check_scale(scale, x.shape)
    args = (x, None if unit_scale else scale, key, traced)
    options = {"fmt": static, "rounding": rounding, "clip_gradient": clip_gradient, "axis": axis}
    if not is_traced(args):  # eagerly: one compiled program (see altgrad_jax._eager)
        return _quantize_compiled(*args, **options)
    return _quantize(*args, **options, concrete_scale=concrete_scale)


def _block_format(static: Any, traced: Any) -> BlockFormat | BlockParams | None:
    """The block format among a static format and traced parameters, if it is one."""
    if isinstance(traced, BlockParams):
        return traced
    return static if isinstance(static, BlockFormat) else None


def _quantize(x, scale, key, traced, *, fmt, rounding, clip_gradient, axis, concrete_scale=None):
    """quantize after validation; ``scale`` None is the unit scale, ``traced`` the traced
    format's parameters (then ``fmt`` is None)."""
    x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
    block = _block_format(fmt, traced)
    if block is not None:
        noise = random_bits(key, x32.shape) if rounding == "stochastic" else None
        quantized = quantize_blocks(x32, block, axis, rounding, noise).astype(x.dtype)
        return _straight_through(x, quantized)
    params = traced if traced is not None else as_params(fmt)
    if scale is None:
        noise = random_bits(key, x32.shape) if rounding == "stochastic" else None
        scaled = x32
        back = round_float32(scaled, params, rounding, noise)
    else:
        back, scaled = _round_scaled(
            x32, scale, concrete_scale, params, rounding, key, clip_gradient
        )
    quantized = back.astype(x.dtype)
    if not clip_gradient:
        return _straight_through(x, quantized)
    return _clipped_straight_through(x, quantized, jnp.abs(scaled) <= params.max_value)


_quantize_compiled = jax.jit(
    _quantize, static_argnames=("fmt", "rounding", "clip_gradient", "axis")
)


def _round_scaled(x32, scale, concrete, params, rounding, key, return_scaled: bool):
    """``(round(x * (1 / scale)) * scale, x * (1 / scale) or None)``: the float path where float
    arithmetic is provably exact on every device, else the exact-scaling path.

    Float multiplies agree with IEEE gradual underflow unless an operand or a result is a float32
    subnormal. Back, ``q * scale`` with ``|q| >= min_value`` is normal when ``scale * min_value
    >= 2**-126``. Forward, a subnormal ``x`` (read as 0 by a DAZ device) or a subnormal product
    (flushed to 0) is harmless when it rounds to a signed zero anyway: with ``scale * min_value
    >= 2**-124`` and ``min_value >= 2**-124`` every such product is below ``min_value / 4``, so
    nearest and toward-zero rounding give ``±0`` from it and from its flushed value alike (in a
    signed format with a zero). Stochastic rounding rounds every nonzero tiny value up with
    probability at least ``2**-32``, so its forward multiply is always exact. The condition is
    on scalars: a static choice for concrete scales and formats, else one ``lax.cond``.
    """
    k, inverse, factor = _scale_parts(scale, concrete)
    scale32 = jnp.asarray(scale if concrete is None else concrete, jnp.float32)
    if concrete is None:  # a traced scale that is not positive and finite gives NaN
        bits = jax.lax.bitcast_convert_type(scale32, jnp.int32)
        valid = jnp.all((bits > 0) & (bits < 0x7F800000))  # integers: subnormal scales valid
    else:
        valid = True

    def exact_forward(x32):
        return scale_float32(x32, inverse, -k, overflow=_F32_MAX_BITS)

    def float_forward(x32):
        y = x32 * (1 / scale32)
        if params.has_inf is False:  # the kernel saturates inf like any overflow
            return y
        # A finite x beyond float32's range after scaling saturates as in scale_float32.
        return jnp.where(jnp.isinf(x32), x32, jnp.clip(y, -_F32_MAX, _F32_MAX))

    def branch(forward, float_back):
        def run(x32, key):
            scaled = forward(x32)
            noise = random_bits(key, scaled.shape) if rounding == "stochastic" else None
            rounded = round_float32(scaled, params, rounding, noise)
            if float_back:  # taken only for valid scales
                back = rounded * scale32
            else:
                back = jnp.where(valid, scale_float32(rounded, factor, k), jnp.float32(jnp.nan))
            return back, (scaled if return_scaled else None)

        return run

    # The smallest positive value: the quantum above zero, or the lowest power of two.
    min_bits = jnp.where(jnp.asarray(params.has_zero), params.tiny_high, params.tiny_low)
    min_value = jax.lax.bitcast_convert_type(jnp.asarray(min_bits, jnp.uint32), jnp.float32)
    floor = np.float32(2.0**-124)
    float_back_ok = (
        valid
        & jnp.all(scale32 >= np.float32(_F32_MIN_NORMAL))
        & jnp.all(scale32 * min_value >= np.float32(_F32_MIN_NORMAL))
    )
    float_forward_ok = (
        float_back_ok
        & (rounding != "stochastic")
        & jnp.asarray(params.signed)
        & jnp.asarray(params.has_zero)
        & (min_value >= floor)
        & jnp.all(scale32 * min_value >= floor)
        & jnp.all(scale32 < np.float32(2.0**126))
    )
    fast = branch(exact_forward if rounding == "stochastic" else float_forward, True)
    exact = branch(exact_forward, False)
    pred = float_back_ok if rounding == "stochastic" else float_forward_ok
    if not isinstance(pred, jax.core.Tracer):  # concrete scale and format: chosen now
        return (fast if bool(pred) else exact)(x32, key)
    return jax.lax.cond(pred, fast, exact, x32, key)


def quantize_flax(
    x: jax.Array,
    fmt: FormatLike,
    scale: jax.Array,
    *,
    rounding: Rounding = "nearest",
    key: jax.Array | None = None,
) -> jax.Array:
    """Flax's ``fp8_ops.qdq`` on any per-tensor format: ``clip(x / scale) -> round -> * scale``.

    The float arithmetic of ``flax.linen.fp8_ops.quantize`` / ``dequantize``, in x's dtype (Flax
    computes in the kernel's dtype, which ``nn.Dense`` promotes x to): Flax's division by the
    scale broadcast to x's shape (compiled as the device compiles Flax's: XLA:CPU turns it into
    ``x * (1 / scale)``), a clip to ``±max_value`` (so inf saturates even in formats with inf),
    the rounding of :func:`altgrad_jax.bits.round_float32` (Flax's cast, for "nearest"; any
    rounding here) and a float multiply back. Devices that flush float32 subnormals flush them
    here as they do in Flax; that cannot change an FP8 result (the quotients it would flush
    round to zero anyway) but, unlike :func:`quantize`, the result is not independent of the
    device for formats that reach float32's subnormals. The gradient is straight through, as
    Flax's ``in_qdq``.
    """
    check_choice("rounding", rounding, ROUNDING_MODES)
    if rounding == "stochastic" and key is None:
        raise ValueError("rounding='stochastic' needs a PRNG key: quantize_flax(..., key=key)")
    x = jnp.asarray(x)
    if not isinstance(fmt, FormatParams) and isinstance(get_format(fmt), BlockFormat):
        raise ValueError(f"quantize_flax takes per-tensor formats; {fmt!r} scales its blocks")
    params = as_params(fmt)
    _check_input(x, params, None if isinstance(fmt, FormatParams) else get_format(fmt).name)
    _check_scale(scale, x.shape)
    plain = jax.lax.stop_gradient(x)
    scale = jnp.asarray(scale).astype(x.dtype)
    limit = jnp.asarray(params.max_value).astype(x.dtype)
    scaled = jnp.clip(plain / jnp.broadcast_to(scale, x.shape), -limit, limit).astype(jnp.float32)
    noise = random_bits(key, scaled.shape) if rounding == "stochastic" else None
    rounded = round_float32(scaled, params, rounding, noise).astype(x.dtype)
    return _straight_through(x, rounded * jnp.broadcast_to(scale, x.shape))
