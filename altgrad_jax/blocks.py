"""Block-scaled (microscaling) quantization: MXFP8/6/4, NVFP4 and DeepSeek-style tiles.

A :class:`~altgrad_jax.formats.BlockFormat` cuts a tensor into blocks along one axis
(consecutive ``block_size`` elements; a last, shorter block is a block of its own, as if
zero-padded) or into 2-D tiles over two axes, and gives each block a scale ``s`` from its amax
``a = max|x|``; the elements are ``round_element(x / s) * s``.

**Power-of-two scales** (E8M0: ``s = 2**k``, ``k`` clamped to the scale format's range, [-127,
127] for E8M0). Write ``a = 2**e * (1 + f)`` and the element's ``max = 2**m * (1 + g)`` (``e``,
``m`` integers, ``f``, ``g`` the 23-bit fractions of their float32 significands). Then

* ``floor`` (OCP MX v1.0): ``k = e - m``; elements beyond the element range saturate;
* ``ceil``: ``k = e + [f > 0] - m``;
* ``rceil`` (default): the smallest ``k`` with ``a <= max * 2**k``, which is ``e - m + [f > g]``:
  nothing saturates (NVIDIA's MXFP8 recipe; the OCP rule "can lead to divergence");
* ``even`` (torchao): ``a`` rounded half-up to the element's ``M`` mantissa bits first, then
  ``floor``.

All four read ``e`` and ``f`` off the bits of ``a`` (``clz`` for float32 subnormals), so no
``log2`` can misround near a power of two and the scale is never computed through bfloat16 (a
known double-rounding bug). An all-zero block gets the smallest ``k`` and stays zero; a block
holding a NaN or an inf reads all NaN (its scale would be code 0xFF, NaN). E8M0's smallest
scale ``2**-127`` is a float32 subnormal.

**Scale formats with mantissa bits** (NVFP4's E4M3): ``s_b = round_nearest_E4M3(a / max / s_t)``
("nearest"; "rceil" rounds up instead, so nothing saturates), with the float32 tensor scale
``s_t = amax_tensor / (scale_max * max)`` (``tensor_scale=True``; the amax of the finite entries,
1 for an all-zero tensor), and ``s = s_t * s_b``. A block scale that would round to zero is
clamped to the scale format's smallest positive value (E4M3: ``2**-9``, a subnormal, as
Transformer Engine allows), so finite input never divides by zero: blocks far below the
tensor's range flush to zero instead of turning NaN.

**float32 scales** (``scale_format=None``, DeepSeek-V3): ``s = a / max``, at least the smallest
positive float32 (1 for an all-zero block).

Each division by a scalar above is a multiplication by its float32 reciprocal (``a * (1 / max)``),
which is what XLA compiles a division by a constant to: so a format whose element is traced
(:meth:`~altgrad_jax.formats.BlockFormat.as_arrays`, one program for every element format of a
layout) gives the same bits as the static one.

References: OCP Microscaling Formats (MX) v1.0 (2023); Mishra et al., "Recipes for Pre-training
LLMs with MXFP8" (2025); NVIDIA, "Pretraining LLMs with NVFP4" (2025); DeepSeek-V3 report (2024).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from altgrad_jax.bits import (
    Rounding,
    _as_f32,
    _as_u32,
    power_of_two,
    round_float32,
    scale_float32,
    split_scale,
    ulp,
)
from altgrad_jax.formats import BlockFormat, BlockParams, FloatFormat, FormatParams, format_params

__all__ = [
    "block_amax",
    "block_grid",
    "block_scales",
    "element_params",
    "normalize_axes",
    "quantize_blocks",
]

BlockAxes = int | tuple[int, ...] | None
BlockLike = BlockFormat | BlockParams
"""A block format, static or with a traced element (:meth:`BlockFormat.as_arrays`)."""


def normalize_axes(fmt: BlockLike, ndim: int, axis: BlockAxes) -> tuple[int, ...]:
    """The blocked axes of an ``ndim``-dimensional tensor, non-negative, one per block dim.

    ``axis=None`` means the last axis (1-D blocks) or the last two (tiles). Raises for a tensor
    with fewer dimensions than the blocks, or an axis out of range.
    """
    rank = len(fmt.block_shape)
    if axis is None:
        axis = tuple(range(-rank, 0))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if len(axes) != rank:
        raise ValueError(
            f"{fmt.name} has {rank}-D blocks {fmt.block_shape}, so it needs {rank} axis(es); "
            f"got axis={axis!r}"
        )
    if ndim < rank:
        raise ValueError(f"{fmt.name} has {rank}-D blocks; a {ndim}-D tensor cannot hold them")
    normalized = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for a {ndim}-D tensor")
        normalized.append(a % ndim)
    if len(set(normalized)) != rank:
        raise ValueError(f"block axes must differ, got {axis!r}")
    return tuple(normalized)


def _to_blocks(
    x: jax.Array, axes: tuple[int, ...], block_shape: tuple[int, ...]
) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """``x`` as ``[..., blocks..., block elements]`` and the inverse of that rearrangement."""
    rest = [d for d in range(x.ndim) if d not in axes]
    moved = jnp.transpose(x, (*rest, *axes))
    lead = moved.shape[: len(rest)]
    sizes = moved.shape[len(rest) :]
    counts = [-(-n // b) for n, b in zip(sizes, block_shape, strict=True)]
    pad = [(0, 0)] * len(rest) + [
        (0, c * b - n) for c, b, n in zip(counts, block_shape, sizes, strict=True)
    ]
    padded = jnp.pad(moved, pad)
    split = [v for c, b in zip(counts, block_shape, strict=True) for v in (c, b)]
    shaped = padded.reshape(*lead, *split)
    k = len(block_shape)
    # [..., c0, b0, c1, b1] -> [..., c0, c1, b0, b1]
    order = list(range(len(lead))) + [len(lead) + 2 * i for i in range(k)]
    order += [len(lead) + 2 * i + 1 for i in range(k)]
    blocks = jnp.transpose(shaped, order).reshape(*lead, *counts, math.prod(block_shape))

    def restore(y: jax.Array) -> jax.Array:
        y = y.reshape(*lead, *counts, *block_shape)
        inverse = np.argsort(order)
        y = jnp.transpose(y, inverse).reshape(padded.shape)
        y = y[tuple(slice(0, n) for n in moved.shape)]
        return jnp.transpose(y, np.argsort((*rest, *axes)))

    return blocks, restore


def _log2_parts(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(e, f)`` with ``value = 2**e * (1 + f / 2**23)`` for positive float32 magnitudes given as
    bits (int32 ``e``; uint32 23-bit fraction ``f``); subnormals normalised with ``clz``."""
    field = (a >> 23).astype(jnp.int32)
    lead = 31 - jax.lax.clz(a).astype(jnp.int32)
    shift = jnp.clip(23 - lead, 0, 23).astype(jnp.uint32)
    fraction = jnp.where(field > 0, a, a << shift) & jnp.uint32(0x7FFFFF)
    exponent = jnp.where(field > 0, field - 127, lead - 149)
    return exponent, fraction


def element_params(fmt: BlockLike) -> FormatParams:
    """The element format's kernel constants: Python ints for a :class:`BlockFormat` (folded at
    trace time), the traced arrays of a :class:`BlockParams`."""
    return format_params(fmt.element) if isinstance(fmt, BlockFormat) else fmt.element


def _max_parts(p: FormatParams) -> tuple[int | jax.Array, int | jax.Array]:
    """``(m, g)`` of the element's ``max = 2**m * (1 + g / 2**23)`` (ints when static)."""
    if isinstance(p.max_bits, int):
        return (p.max_bits >> 23) - 127, p.max_bits & 0x7FFFFF
    bits = jnp.asarray(p.max_bits, jnp.uint32)
    return (bits >> 23).astype(jnp.int32) - 127, bits & jnp.uint32(0x7FFFFF)


def _half_at_mantissa(p: FormatParams) -> int | jax.Array:
    """Half a unit of the element's last mantissa bit in a 23-bit fraction (0 for M >= 23)."""
    if isinstance(p.mantissa_bits, int):
        return 1 << (22 - p.mantissa_bits) if p.mantissa_bits < 23 else 0
    mantissa = jnp.asarray(p.mantissa_bits, jnp.uint32)
    half = jnp.uint32(1) << (jnp.uint32(22) - jnp.minimum(mantissa, jnp.uint32(22)))
    return jnp.where(mantissa < 23, half, jnp.uint32(0))


def _pow2_exponent(amax: jax.Array, fmt: BlockLike) -> jax.Array:
    """The block exponent ``k`` of a power-of-two scale (see the module docstring)."""
    scale_fmt = fmt.scale_format
    p = element_params(fmt)
    m, g = _max_parts(p)
    a = _as_u32(amax)
    e, f = _log2_parts(a)
    if fmt.scale_rule == "floor":
        k = e - m
    elif fmt.scale_rule == "ceil":
        k = e + (f > 0).astype(jnp.int32) - m
    elif fmt.scale_rule == "rceil":
        k = e - m + (f > jnp.uint32(g)).astype(jnp.int32)
    else:  # even: round half up at the element's mantissa width, keep the exponent
        k = e + ((f + jnp.uint32(_half_at_mantissa(p))) >> 23).astype(jnp.int32) - m
    k_min = math.frexp(scale_fmt.smallest_positive)[1] - 1
    k_max = math.frexp(scale_fmt.max_value)[1] - 1
    return jnp.clip(jnp.where(a == 0, k_min, k), k_min, k_max)


def _round_up(x: jax.Array, fmt: FloatFormat) -> jax.Array:
    """The smallest value of ``fmt`` at or above positive ``x`` (saturating at max)."""
    nearest = round_float32(x, format_params(fmt))
    above = jnp.minimum(nearest + ulp(nearest, fmt), jnp.float32(fmt.max_value))
    return jnp.where(nearest < x, above, nearest)


def _tensor_amax(x: jax.Array, fmt: BlockLike) -> jax.Array | None:
    """The tensor's finite amax, only for formats with a tensor scale (NVFP4); else None."""
    return _finite_amax(x) if fmt.tensor_scale else None


def _finite_amax(x: jax.Array) -> jax.Array:
    """The largest finite ``|x|`` (0 for none), as an integer max of bits (see :func:`_amax`)."""
    magnitudes = _as_u32(jnp.asarray(x, jnp.float32)) & jnp.uint32(0x7FFFFFFF)
    finite = jnp.where(magnitudes < jnp.uint32(0x7F800000), magnitudes, jnp.uint32(0))
    return _as_f32(jnp.max(finite, initial=jnp.uint32(0)))


def _scales(amax: jax.Array, fmt: BlockLike, tensor_amax: jax.Array | None) -> jax.Array:
    """float32 block scales from block amaxes (finite, >= 0) and the tensor's finite amax."""
    element_max = element_params(fmt).max_value
    scale_fmt = fmt.scale_format
    if scale_fmt is None:
        smallest = jnp.float32(np.finfo(np.float32).smallest_subnormal)
        return jnp.where(amax > 0, jnp.maximum(amax * (1 / element_max), smallest), 1.0)
    if scale_fmt.is_power_of_two:
        if fmt.tensor_scale:
            raise ValueError(f"{fmt.name}: a tensor scale needs a scale format with mantissa bits")
        return power_of_two(_pow2_exponent(amax, fmt))
    tensor = jnp.float32(1.0)
    if fmt.tensor_scale:
        levels = jnp.float32(scale_fmt.max_value) * element_max  # float32, as NVFP4 has it
        tensor = jnp.where(tensor_amax > 0, tensor_amax * (1 / levels), 1.0)
    ratio = amax * (1 / element_max) * (1 / tensor)
    if fmt.scale_rule == "rceil":
        block = _round_up(ratio, scale_fmt)
    else:
        block = round_float32(ratio, format_params(scale_fmt))
    block = jnp.maximum(block, jnp.float32(scale_fmt.smallest_positive))
    return tensor * block


def _compiled(fn: Callable) -> Callable:
    """``fn(x, fmt, axis, ...)`` with the axes checked (errors raised at the call) and run under
    ``jit`` with the format (unless its element is traced: :class:`BlockParams` is data), the
    axes and the rounding static.

    The roundings work on bits, hundreds of primitives: eagerly, each would be dispatched (and
    compiled) on its own; this way an eager call costs one compile per format, axes and shape,
    and inside a traced function the call is inlined.
    """
    names = list(inspect.signature(fn).parameters)

    def compiled(static: list[str]) -> Callable:
        argnums = [names.index(name) for name in static]
        return jax.jit(fn, static_argnums=argnums, static_argnames=static)

    options = [name for name in ("axis", "rounding") if name in names]
    static_format, traced_format = compiled(["fmt", *options]), compiled(options)

    @functools.wraps(fn)
    def call(x: jax.Array, fmt: BlockLike, axis: BlockAxes = None, *args, **kwargs):
        jitted = traced_format if isinstance(fmt, BlockParams) else static_format
        return jitted(x, fmt, normalize_axes(fmt, jnp.ndim(x), axis), *args, **kwargs)

    return call


@_compiled
def block_amax(x: jax.Array, fmt: BlockLike, axis: BlockAxes = None) -> jax.Array:
    """``max|x|`` per block (NaN where a block holds a NaN, inf where it holds an inf), float32,
    shaped like :func:`block_scales`."""
    axes = normalize_axes(fmt, x.ndim, axis)
    blocks, _ = _to_blocks(jnp.asarray(x, jnp.float32), axes, fmt.block_shape)
    amax = _amax(blocks)
    return _from_block_grid(amax, x.ndim, axes)


def _amax(blocks: jax.Array, keepdims: bool = False) -> jax.Array:
    """``max|x|`` over the last axis (NaN where it holds a NaN), as a max of the magnitudes'
    bit patterns: for non-negative floats (NaN above inf above every finite value) the integer
    order is the float order, and XLA's CPU backend vectorises an integer max where it runs a
    float max reduction as a scalar loop (~2.5x slower)."""
    magnitudes = _as_u32(blocks) & jnp.uint32(0x7FFFFFFF)
    return _as_f32(jnp.max(magnitudes, axis=-1, keepdims=keepdims))


def _from_block_grid(values: jax.Array, ndim: int, axes: tuple[int, ...]) -> jax.Array:
    """``[..., blocks...]`` back to x's axis order (each blocked axis of length #blocks)."""
    rest = [d for d in range(ndim) if d not in axes]
    return jnp.transpose(values, np.argsort((*rest, *axes)))


@_compiled
def block_scales(x: jax.Array, fmt: BlockLike, axis: BlockAxes = None) -> jax.Array:
    """The float32 scale of every block: x's shape with each blocked axis of length
    ``ceil(n / block)`` (for a tensor-scaled format, the product of tensor and block scale;
    NaN for blocks that hold a NaN or an inf)."""
    x = jnp.asarray(x, jnp.float32)
    axes = normalize_axes(fmt, x.ndim, axis)
    blocks, _ = _to_blocks(x, axes, fmt.block_shape)
    amax = _amax(blocks)
    scales = _scales(jnp.where(jnp.isfinite(amax), amax, 0.0), fmt, _tensor_amax(x, fmt))
    scales = jnp.where(jnp.isfinite(amax), scales, jnp.float32(jnp.nan))
    return _from_block_grid(scales, x.ndim, axes)


def _scaled_blocks(
    x: jax.Array, fmt: BlockLike, axis: BlockAxes, random_bits: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, Callable[[jax.Array], jax.Array]]:
    """``x`` as ``[..., blocks..., block elements]``, the block amaxes and scales (``[...,
    blocks..., 1]``), the random bits in the same layout, the way back.

    """
    x = jnp.asarray(x, jnp.float32)
    axes = normalize_axes(fmt, x.ndim, axis)
    blocks, restore = _to_blocks(x, axes, fmt.block_shape)
    amax = _amax(blocks, keepdims=True)
    scale = _scales(jnp.where(jnp.isfinite(amax), amax, 0.0), fmt, _tensor_amax(x, fmt))
    noise = None
    if random_bits is not None:
        noise, _ = _to_blocks(random_bits, axes, fmt.block_shape)
    return blocks, amax, scale, noise, restore


def _exact_round(blocks, scale, params, rounding, noise) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``round(x * (1 / s))`` with the exponent moved in integers, and ``(k, m)`` of ``s``.

    E8M0's ``2**-127`` is a float32 subnormal, which a flushing device would turn into 0, and
    ``x / s`` may be subnormal: see :mod:`altgrad_jax.quantize`.
    """
    k, m = split_scale(scale)
    scaled = scale_float32(blocks, 1 / m, -k, overflow=0x7F7FFFFF)
    return round_float32(scaled, params, rounding, noise), k, m


def _float_multiplies_exact(
    scale: jax.Array, live: jax.Array, params: FormatParams, rounding: Rounding
) -> bool | jax.Array:
    """Whether plain float32 ``x * (1 / s)`` and ``q * s`` give the bits of the exact path on
    every device, for every block that holds a nonzero finite amax (``live``; the others are
    all zero, or NaN anyway).

    The conditions of :mod:`altgrad_jax.quantize`'s float path, per block: the scale and its
    reciprocal normal; ``s * min_value >= 2**-124`` and ``min_value >= 2**-124``, so a
    subnormal ``x`` or product (flushed by FTZ / DAZ devices) rounds to a signed zero either
    way and ``q * s`` is normal for every ``|q| >= min_value``; a signed element with a zero.
    Stochastic rounding keeps the exact path.
    """
    if rounding == "stochastic":
        return False
    min_bits = jnp.where(jnp.asarray(params.has_zero), params.tiny_high, params.tiny_low)
    min_value = _as_f32(jnp.asarray(min_bits, jnp.uint32))
    s = jnp.where(live, scale, 1.0)
    floor = jnp.float32(2.0**-124)
    return (
        jnp.asarray(params.signed)
        & jnp.asarray(params.has_zero)
        & (min_value >= floor)
        & jnp.all(s >= jnp.float32(2.0**-126))
        & jnp.all(s < jnp.float32(2.0**126))
        & jnp.all(s * min_value >= floor)
    )


@_compiled
def quantize_blocks(
    x: jax.Array,
    fmt: BlockLike,
    axis: BlockAxes = None,
    rounding: Rounding = "nearest",
    random_bits: jax.Array | None = None,
) -> jax.Array:
    """float32 ``round_element(x / s) * s`` with per-block scales ``s`` (no gradient rule: see
    :func:`altgrad_jax.quantize`, which wraps this with the straight-through estimator).

    ``random_bits`` (uint32, x's shape) drive stochastic rounding of the elements. Where plain
    float multiplies are provably exact (:func:`_float_multiplies_exact`, one ``lax.cond`` on
    the whole tensor) they replace the integer scaling, with the same bits.
    """
    blocks, amax, scale, noise, restore = _scaled_blocks(x, fmt, axis, random_bits)
    params = element_params(fmt)
    finite = jnp.isfinite(amax)
    live = finite & (amax > 0)

    def exact(blocks: jax.Array, scale: jax.Array) -> jax.Array:
        rounded, k, m = _exact_round(blocks, scale, params, rounding, noise)
        return scale_float32(rounded, m, k)

    def float_path(blocks: jax.Array, scale: jax.Array) -> jax.Array:
        unit = jnp.where(live, scale, 1.0)  # an all-zero block stays zero at any scale
        return round_float32(blocks * (1 / unit), params, rounding, noise) * unit

    pred = _float_multiplies_exact(scale, live, params, rounding)
    if isinstance(pred, bool):
        q = (float_path if pred else exact)(blocks, scale)
    else:
        q = jax.lax.cond(pred, float_path, exact, blocks, scale)
    return restore(jnp.where(finite, q, jnp.float32(jnp.nan)))


@_compiled
def block_grid(x: jax.Array, fmt: BlockLike, axis: BlockAxes = None) -> tuple[jax.Array, jax.Array]:
    """``x`` rounded to nearest on its block grid, and the grid's spacing at each rounded value.

    The spacing is the element's ULP at ``q / s`` times the block's scale ``s``: how far a value
    must move, at this grid, to change its code (what the stall monitor bins updates against).
    Both float32 in x's shape; NaN in blocks that hold a NaN or an inf.
    """
    blocks, amax, scale, _, restore = _scaled_blocks(x, fmt, axis, None)
    finite = jnp.isfinite(amax)
    rounded, k, m = _exact_round(blocks, scale, element_params(fmt), "nearest", None)
    spacing = ulp(rounded, element_params(fmt))
    nan = jnp.float32(jnp.nan)
    return (
        restore(jnp.where(finite, scale_float32(rounded, m, k), nan)),
        restore(jnp.where(finite, scale_float32(spacing, m, k), nan)),
    )
