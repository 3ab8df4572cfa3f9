"""Bit-level kernels on the float32 pattern: rounding to a format, codes <-> values, ULP.

Everything is integer arithmetic on ``bitcast(x, uint32)``, so results are exact (no ``log2``,
no ``floor`` near powers of two) and independent of how a device treats float32 subnormals.

The rounding kernel works in a per-element frame in which the target format's code sits in the
high bits of ``v = |x|_bits - base``:

* normal range of the format: ``base`` is a constant and ``v = code << (23 - M)``;
* subnormal range: ``base`` is the start of x's own float32 binade, so ``v`` is x's significand
  (with its implicit bit) and the code is ``v >> s``, the shift ``s <= 23`` growing as x shrinks.

Rounding is then one add and one mask on ``v``; a carry out of the mantissa moves into the next
binade by itself. Below the smallest positive value only two candidates remain, handled apart
(stochastically with an integer threshold on 32 random bits, :func:`_tiny_threshold`).

A format whose normal range starts among float32's subnormals (``min_normal_field <= 0``, static
only) takes one more branch: there float32's bits are a linear coordinate and the shift follows
x's binade (:func:`_frame_below_float32_normals`).

Scales never go through a float multiply on a subnormal either: :func:`scale_float32` multiplies
normalised significands and moves the exponent in integers, rounding once into float32's
subnormals (see :mod:`altgrad_jax.quantize`).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from altgrad_jax._checks import check_choice, choices_of
from altgrad_jax.formats import (
    FloatFormat,
    FormatLike,
    FormatParams,
    as_params,
    format_params,
    get_format,
)

__all__ = [
    "ROUNDING_MODES",
    "Rounding",
    "from_bits",
    "power_of_two",
    "round_float32",
    "scale_float32",
    "split_scale",
    "to_bits",
    "ulp",
]

Rounding = Literal["nearest", "stochastic", "toward_zero"]
ROUNDING_MODES: tuple[str, ...] = choices_of(Rounding)

_U32 = jnp.uint32
_SIGN = 0x80000000
_ABS = 0x7FFFFFFF
_INF = 0x7F800000
_QUIET_NAN = 0x7FC00000


def _select(flag, on_true, on_false):
    """``where`` that folds away when the flag is a Python bool (static format)."""
    if isinstance(flag, (bool, np.bool_)):
        return on_true if flag else on_false
    return jnp.where(flag, on_true, on_false)


def _as_f32(bits: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _as_u32(x: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(x, _U32)


def round_float32(
    x: jax.Array,
    params: FormatParams,
    rounding: Rounding = "nearest",
    random_bits: jax.Array | None = None,
) -> jax.Array:
    """Rounds float32 ``x`` to the format described by ``params``; returns float32.

    Finite overflow and inf saturate to the largest finite value (inf stays inf in formats with
    inf); NaN stays NaN. ``random_bits`` (uint32, x's shape) drive stochastic rounding: the
    element rounds up with probability (distance to the lower neighbour) / gap, exactly (as many
    random bits are added as bits are dropped); below the smallest positive value it is exact
    to 2**-32 (see :func:`_tiny_threshold`).
    """
    p = params
    bits = _as_u32(x)
    a = bits & _U32(_ABS)
    if isinstance(p.min_normal_field, int) and p.min_normal_field <= 0:
        base, shift, v, mask, odd = _frame_below_float32_normals(a, p)
    else:
        # Frame: the normal frame's start, or x's own binade below it (see module doc).
        field = a >> 23
        if not (isinstance(p.tiny_limit, int) and p.tiny_limit > 0x7FFFFF):
            field = jnp.maximum(field, _U32(1))  # float32 subnormals share binade 1's frame
        frame = jnp.minimum(field, _U32(p.min_normal_field))
        base = (frame - 1) << 23
        shift_at_frame_start = _U32(23) - _U32(p.mantissa_bits) + _U32(p.min_normal_field)
        shift = jnp.minimum(shift_at_frame_start - frame, _U32(23))
        v = a - base
        mask = (_U32(1) << shift) - 1
        odd = (v >> shift) & 1
        if not (isinstance(p.mantissa_bits, int) and p.mantissa_bits < 23):
            odd = odd & mask  # shift 0 (M = 23): nothing to round
    if rounding == "nearest":
        # Half minus one, plus one more when the kept part is odd: ties go to the even code.
        increment = (mask >> 1) + odd
    elif rounding == "stochastic":
        increment = random_bits & mask
    elif rounding == "toward_zero":
        increment = _U32(0)
    else:
        check_choice("rounding", rounding, ROUNDING_MODES)
    out = jnp.minimum(((v + increment) & ~mask) + base, _U32(p.max_bits))

    # Below the smallest positive value (or E8M0's float32-subnormal binade): two candidates.
    if rounding == "nearest":
        up = a > _U32(p.tiny_mid)
    elif rounding == "stochastic":
        up = random_bits < _tiny_threshold(a, p)
    else:
        up = False
    tiny = jnp.where(up, _U32(p.tiny_high), _U32(p.tiny_low))
    out = jnp.where(a < _U32(p.tiny_limit), tiny, out)

    out = _select(p.has_inf, jnp.where(a == _INF, _U32(_INF), out), out)
    out = _select(p.signed, out | (bits & _U32(_SIGN)), out)
    # Values the format has no code for: negatives in unsigned formats, zero without a zero.
    if not (p.signed is True and p.has_zero is True):
        negative = (bits & _U32(_SIGN)) != 0
        invalid = (~jnp.asarray(p.signed) & negative & (a != 0)) | (
            ~jnp.asarray(p.has_zero) & (a == 0)
        )
        replacement = jnp.where(p.has_nan, _U32(_QUIET_NAN), _U32(p.tiny_low))
        out = jnp.where(invalid, replacement, out)
    return _as_f32(jnp.where(a > _INF, bits, out))


def _frame_below_float32_normals(a: jax.Array, p: FormatParams):
    """The rounding frame of a (static) format whose normal range starts below 2**-126.

    Then ``min_normal_field = f0 <= 0``. A float32 normal ``x`` lies in the format's normal
    range: the frame starts at ``f0`` and ``base = (f0 - 1) << 23`` wraps around in uint32, which
    the final ``+ base`` undoes, so the normal frame formula holds unchanged. A float32
    subnormal ``x`` has the bits ``a = |x| / 2**-149``, a *linear* coordinate: its virtual field
    is ``f = floor(log2 a) - 22``, the format's quantum there is ``2**(max(f, f0) - 127 - M)``,
    so the frame is ``base = 0`` with ``shift = max(f, f0) + 22 - M`` (>= 0, since the format's
    smallest step is a float32 value). A carry out of a binade lands on its upper power of two,
    a grid value. The parity of the kept part is the code's; for ``M = 0`` the code is the
    exponent code ``f - f0 + 1``, whose parity the linear bits do not show.
    """
    m, f0 = p.mantissa_bits, p.min_normal_field
    field = (a >> 23).astype(jnp.int32)
    below = field == 0
    virtual = 31 - jax.lax.clz(a).astype(jnp.int32) - 22
    frame = jnp.minimum(field, f0)
    base = jax.lax.bitcast_convert_type(jnp.where(below, 0, (frame - 1) << 23), _U32)
    shift = jnp.where(below, jnp.maximum(virtual, f0) + 22 - m, 23 - m + f0 - frame)
    shift = jnp.clip(shift, 0, 23).astype(_U32)
    v = a - base
    mask = (_U32(1) << shift) - 1
    odd = (v >> shift) & 1 & mask
    if m == 0:
        odd = jnp.where(below, (virtual - f0 + 1).astype(_U32) & 1, odd)
    return base, shift, v, mask, odd


def _code_below_float32_normals(a: jax.Array, p: FormatParams) -> jax.Array:
    """Magnitude codes of grid values ``a`` (bits) of a format whose normal range starts below
    2**-126 (``f0 = min_normal_field <= 0``).

    With ``|q| = S * 2**(e - 23)`` (:func:`_significand`) and the virtual field ``f = e + 127``:
    in the normal range (``f >= f0``) the code is ``(f - f0 + 1) << M`` plus the top ``M`` bits
    of the fraction; below it the code is ``|q|`` over the quantum ``2**(f0 - 127 - M)``, i.e.
    ``S >> (f0 + 23 - M - f)``.
    """
    m, f0 = p.mantissa_bits, p.min_normal_field
    significand, exponent = _significand(a)
    virtual = exponent + 127
    fraction = (significand & _U32(0x7FFFFF)) >> (23 - m)
    normal_code = (jnp.maximum(virtual - f0 + 1, 0).astype(_U32) << m) | fraction
    subnormal_code = significand >> jnp.clip(f0 + 23 - m - virtual, 0, 31).astype(_U32)
    return jnp.where(virtual < f0, subnormal_code, normal_code)


def _significand(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(S, e)`` with ``|x| = S * 2**(e - 23)`` and ``S`` in ``[2**23, 2**24)`` (uint32, int32)
    for nonzero finite magnitudes ``a`` (bits); float32 subnormals are normalised with ``clz``.
    Zero gives ``S = 0``."""
    field = (a >> 23).astype(jnp.int32)
    lead = 31 - jax.lax.clz(a).astype(jnp.int32)  # leading bit of a subnormal pattern
    normalise = jnp.clip(23 - lead, 0, 24).astype(_U32)
    significand = jnp.where(field > 0, (a & _U32(0x7FFFFF)) | _U32(1 << 23), a << normalise)
    exponent = jnp.where(field > 0, field - 127, -126 - normalise.astype(jnp.int32))
    return significand, exponent


def _tiny_threshold(a: jax.Array, p: FormatParams) -> jax.Array:
    """The stochastic-rounding threshold below ``tiny_limit``: round up when 32 random bits are
    below it, so with probability ``T / 2**32`` for the fraction ``(|x| - low) / (high - low)``.

    The two candidates are ``low = L * g`` and ``high = (L + 1) * g`` with ``g = 2**G`` a power of
    two (``L = 0`` with a zero: 0 and the quantum; ``L = 1`` without: the two lowest powers of
    two). With ``|x| = S * 2**(e - 23)`` the fraction is ``D / 2**n`` for the integers
    ``D = S - L * 2**(G - e + 23)`` and ``n = G - e + 23``, so ``T = D * 2**(32 - n)`` is exact
    when ``n <= 32``; beyond, ``T`` is ``D / 2**(n - 32)`` rounded up (a bias below 2**-32 of
    the gap). Everything is integer arithmetic, so a device that flushes float32 subnormals
    still rounds up as often as it should; ``D < 0`` (below ``low``) never rounds up.
    """
    significand, exponent = _significand(a)
    low_is_zero = jnp.asarray(p.tiny_low, _U32) == 0
    gap_exponent = _exponent_of(jnp.asarray(p.tiny_high, _U32)) - jnp.where(low_is_zero, 0, 1)
    n = gap_exponent - exponent + 23
    low = jnp.where(low_is_zero, 0, jnp.left_shift(1, jnp.clip(n, 0, 30)))
    d = significand.astype(jnp.int32) - low
    d = jnp.maximum(d, 0).astype(_U32)
    up_shift = jnp.clip(32 - n, 0, 31).astype(_U32)
    down_shift = jnp.clip(n - 32, 0, 31).astype(_U32)
    exact = d << up_shift
    rounded_up = (d >> down_shift) + ((d & ((_U32(1) << down_shift) - 1)) != 0).astype(_U32)
    return jnp.where(n <= 32, exact, rounded_up)


def scale_float32(
    x: jax.Array,
    factor: jax.Array | None,
    exponent: jax.Array,
    overflow: int = _INF,
) -> jax.Array:
    """``x * factor * 2**exponent`` rounded once to float32 (ties to even, gradual underflow),
    without a float operation on a subnormal, so FTZ / DAZ devices give the same bits.

    ``factor`` is a positive float32 in ``[0.5, 2)`` or None (1); both it and the int32
    ``exponent`` broadcast against ``x``. Write ``|x| = S * 2**(e - 23)`` (:func:`_significand`,
    subnormal inputs normalised) and ``s`` for ``S * 2**-23`` in ``[1, 2)``: then ``p = s *
    factor`` is a float product of normal numbers in ``[0.5, 4)``, correctly rounded to
    ``p = P * 2**(q - 23)`` (``P`` its 24-bit significand), and the result is ``p * 2**E`` with
    ``E = e + q + exponent``. For ``E >= -126`` that is a change of the exponent field, exact. For
    ``E < -126`` the result is a float32 subnormal, ``P`` shifted right by ``-126 - E`` bits and
    rounded; to round the *exact* product once (not ``p``, already rounded), the sign of the
    error ``S * F - P * 2**t`` (``F`` the factor's significand, ``t`` the offset of the two
    scales) breaks the ties: it is exact in uint32 arithmetic modulo 2**32 because it is at
    most ``2**24`` in magnitude. Above float32's range the magnitude becomes the bit pattern
    ``overflow`` (inf by default). Zero, inf and NaN pass through; the sign is kept.
    """
    bits = _as_u32(x)
    a = bits & _U32(_ABS)
    significand, e = _significand(a)
    if factor is None:
        p_sig, q, err = significand, jnp.int32(0), jnp.int32(0)
    else:
        factor_bits = _as_u32(jnp.asarray(factor, jnp.float32))
        s = _as_f32((significand & _U32(0x7FFFFF)) | _U32(127 << 23))
        p_bits = _as_u32(s * jnp.asarray(factor, jnp.float32))
        q = (p_bits >> 23).astype(jnp.int32) - 127
        p_sig = (p_bits & _U32(0x7FFFFF)) | _U32(1 << 23)
        factor_sig = (factor_bits & _U32(0x7FFFFF)) | _U32(1 << 23)
        t = (q - ((factor_bits >> 23).astype(jnp.int32) - 127) + 23).astype(_U32)
        err = jax.lax.bitcast_convert_type(significand * factor_sig - (p_sig << t), jnp.int32)
    biased = e + q + jnp.asarray(exponent, jnp.int32) + 127
    normal = (jnp.clip(biased, 1, 254).astype(_U32) << 23) | (p_sig & _U32(0x7FFFFF))
    shift = jnp.clip(1 - biased, 1, 25).astype(_U32)
    kept = p_sig >> shift
    rest = p_sig & ((_U32(1) << shift) - 1)
    half = _U32(1) << (shift - 1)
    tie_up = (err > 0) | ((err == 0) & ((kept & 1) == 1))
    subnormal = kept + ((rest > half) | ((rest == half) & tie_up)).astype(_U32)
    out = jnp.where(biased >= 1, normal, subnormal)
    out = jnp.where(biased > 254, _U32(overflow), out)
    out = jnp.where((a == 0) | (a >= _INF), a, out)
    return _as_f32(out | (bits & _U32(_SIGN)))


def split_scale(scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(k, m)`` with ``scale = m * 2**k``, ``m`` in ``[1, 2)`` (float32) and ``k`` int32, read
    from the bits (subnormal scales included). Not meaningful for scales <= 0, inf or NaN."""
    significand, exponent = _significand(_as_u32(jnp.asarray(scale, jnp.float32)) & _U32(_ABS))
    return exponent, _as_f32((significand & _U32(0x7FFFFF)) | _U32(127 << 23))


def _exponent_of(a: jax.Array) -> jax.Array:
    """floor(log2(value)) of positive float32 magnitudes given as bits (int32; zero gives -150)."""
    field = (a >> 23).astype(jnp.int32)
    subnormal_exponent = (31 - jax.lax.clz(a).astype(jnp.int32)) - 149
    return jnp.where(field > 0, field - 127, subnormal_exponent)


def power_of_two(exponent: jax.Array) -> jax.Array:
    """``2**exponent`` as float32, built from bits (exact, subnormals included); int exponents.

    Exponents are clipped to float32's range [-149, 127].
    """
    exponent = jnp.clip(jnp.asarray(exponent, jnp.int32), -149, 127)
    normal = (exponent + 127).astype(_U32) << 23
    subnormal = _U32(1) << jnp.clip(exponent + 149, 0, 22).astype(_U32)
    return _as_f32(jnp.where(exponent >= -126, normal, subnormal))


def _check_float(x: jax.Array, what: str) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{what} takes floating-point input, got dtype {x.dtype}")
    return x


def to_bits(x: jax.Array, fmt: FloatFormat | str) -> jax.Array:
    """Codes of the values of ``fmt`` nearest to ``x`` (ties to even); uint8 for 8-bit formats.

    Saturates like :func:`altgrad_jax.quantize`. NaN maps to the format's NaN code (sign kept);
    formats without NaN have no code for it and return the all-ones code (``-max_value``).
    """
    fmt = get_format(fmt)
    x = _check_float(x, "to_bits").astype(jnp.float32)
    p = format_params(fmt)
    q = _as_u32(round_float32(x, p))
    a = q & _U32(_ABS)
    m, e = fmt.mantissa_bits, fmt.exponent_bits
    if p.min_normal_field <= 0:
        code = _code_below_float32_normals(a, p)
    else:
        field = a >> 23
        binade = jnp.maximum(field, _U32(1))
        below_normal = field < _U32(p.min_normal_field)
        significand = (a & _U32(0x7FFFFF)) | jnp.where(field > 0, _U32(1 << 23), _U32(0))
        shift = jnp.where(below_normal, _U32(23 - m) + _U32(p.min_normal_field) - binade, 0)
        subnormal_code = significand >> jnp.minimum(shift, _U32(31))
        normal_code = (a - _U32((p.min_normal_field - 1) << 23)) >> (23 - m)
        code = jnp.where(below_normal, subnormal_code, normal_code)

    magnitude_bits = e + m
    all_ones = (1 << magnitude_bits) - 1
    if fmt.has_inf:
        code = jnp.where(a == _INF, _U32(((1 << e) - 1) << m), code)
        nan_code = (((1 << e) - 1) << m) | (1 << (m - 1))
    else:
        nan_code = all_ones
    is_nan = a > _INF
    if fmt.signed:
        sign = (q >> 31) << magnitude_bits
        code = jnp.where(is_nan, nan_code, code) | sign
        if not fmt.has_nan:
            code = jnp.where(is_nan, _U32((1 << fmt.total_bits) - 1), code)
    else:
        code = jnp.where(is_nan, _U32(all_ones), code)
    return code.astype(fmt.code_dtype)


def from_bits(codes: jax.Array, fmt: FloatFormat | str) -> jax.Array:
    """float32 values of the codes of ``fmt`` (bits above ``fmt.total_bits`` are ignored)."""
    fmt = get_format(fmt)
    codes = jnp.asarray(codes)
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(f"from_bits takes integer codes, got dtype {codes.dtype}")
    p = format_params(fmt)
    m, e = fmt.mantissa_bits, fmt.exponent_bits
    magnitude_bits = e + m
    c = codes.astype(_U32) & _U32((1 << fmt.total_bits) - 1)
    magnitude = c & _U32((1 << magnitude_bits) - 1)
    exponent_code = magnitude >> m
    fraction = magnitude & _U32((1 << m) - 1)

    normal = (magnitude << (23 - m)) + _U32(((p.min_normal_field - 1) << 23) & 0xFFFFFFFF)
    if p.min_normal_field <= 0:
        # Normal binades below 2**-126 are float32 subnormals: (2**M + fraction) shifted into
        # place, by f + 22 - M for the binade's virtual field f (>= 0: every value is exact).
        virtual = exponent_code.astype(jnp.int32) + p.min_normal_field - 1
        low = (fraction | _U32(1 << m)) << jnp.clip(virtual + 22 - m, 0, 31).astype(_U32)
        normal = jnp.where(virtual <= 0, low, normal)
    if not fmt.has_zero:
        normal = jnp.where(magnitude == 0, _U32(p.tiny_low), normal)
    # Subnormals (and all of fixed point): fraction * 2**(emin - M), normalised with clz.
    lowest = fmt._emin - m
    lead = 31 - jax.lax.clz(fraction).astype(jnp.int32)
    exponent = lowest + lead
    mantissa = (fraction << (23 - lead).astype(_U32)) & _U32(0x7FFFFF)
    subnormal = ((exponent + 127).astype(_U32) << 23) | mantissa
    if lowest < -126:
        subnormal = jnp.where(exponent < -126, fraction << _U32(lowest + 149), subnormal)
    subnormal = jnp.where(fraction == 0, _U32(0), subnormal)
    if e == 0:
        out = subnormal
    elif fmt.has_zero:
        out = jnp.where(exponent_code == 0, subnormal, normal)
    else:
        out = normal

    top = (1 << e) - 1
    if fmt.has_inf:
        special = exponent_code == top
        out = jnp.where(special, jnp.where(fraction == 0, _U32(_INF), _U32(_QUIET_NAN)), out)
    elif fmt.has_nan:
        out = jnp.where(magnitude == (1 << magnitude_bits) - 1, _U32(_QUIET_NAN), out)
    if fmt.signed:
        out = out | ((c >> magnitude_bits) << 31)
    return _as_f32(out)


def ulp(x: jax.Array, fmt: FormatLike) -> jax.Array:
    """Spacing of ``fmt``'s grid at ``|x|``: from the grid value at or below |x| to the next one.

    ``2**(e - M)`` for |x| in the binade ``[2**e, 2**(e+1))``, the subnormal quantum below the
    normal range, the top binade's spacing beyond ``max_value`` (fixed point: the quantum
    everywhere); NaN for inf and NaN. float32. ``fmt`` may be traced :class:`FormatParams`.
    """
    p = as_params(fmt)
    x = _check_float(x, "ulp").astype(jnp.float32)
    a = _as_u32(x) & _U32(_ABS)
    # The lowest binade's exponent; exponent-only formats start their normal frame one above.
    emin = jnp.asarray(p.min_normal_field, jnp.int32) - 128 + jnp.asarray(p.has_zero, jnp.int32)
    emax = _exponent_of(jnp.asarray(p.max_bits, _U32))
    # Clamp to emax first: for fixed point emax < emin and the quantum must win.
    exponent = jnp.maximum(jnp.minimum(_exponent_of(a), emax), emin)
    out = power_of_two(exponent - jnp.asarray(p.mantissa_bits, jnp.int32))
    return jnp.where(a >= _INF, jnp.float32(jnp.nan), out)
