"""Floating-point formats: specification, registry, grids and the constants the kernels need.

A format is a sign / exponent / mantissa split with a bias and a choice of special codes. It is a
frozen, hashable dataclass, so it can be a static argument of ``jax.jit``. Everything here is plain
Python and NumPy (JAX only registers :class:`FormatParams` as a pytree): the JAX kernels that use
these numbers live in :mod:`altgrad_jax.bits`.

A format is accepted when every finite value is exact in float32: its smallest positive value at
least ``2**-149`` and its largest exponent at most 127. Its binades may lie among float32's
subnormals (``FloatFormat("x", 2, 1, 128)``: normal values from ``2**-127``); such a format has
``min_normal_field <= 0``, which the kernels handle in a branch chosen at trace time, so it is
static only (``as_arrays`` refuses it).

Semantics (as in the OCP 8-bit floating point and MX specifications):

* ``exponent_bits == 0`` is sign-magnitude fixed point: ``m * 2**(-bias - M)``, ``|m| < 2**M``.
* otherwise exponent code 0 holds zero and the subnormals ``m * 2**(1 - bias - M)``, and
  exponent code ``e > 0`` holds ``(1 + m / 2**M) * 2**(e - bias)``.
* ``has_inf``: IEEE style, the top exponent code holds inf (mantissa 0) and NaN (otherwise).
* ``has_nan`` without ``has_inf``: only the all-ones code is NaN (OCP ``e4m3fn``).
* ``signed=False`` drops the sign bit; ``has_zero=False`` makes exponent code 0 a normal binade, as
  in the OCP MX scale format E8M0 (``2**(e - 127)``, no zero, 0xFF is NaN).

References:
  OCP 8-bit Floating Point Specification (OFP8), rev. 1.0, 2023.
  OCP Microscaling Formats (MX) Specification, v1.0, 2023.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import TYPE_CHECKING, Literal, NamedTuple

import numpy as np

from altgrad_jax._checks import check_bool, check_str
from altgrad_jax._pytree import pytree_dataclass, static_field

if TYPE_CHECKING:
    import jax

__all__ = [
    "ANY_FORMAT",
    "BLOCK_FORMATS",
    "SCALE_RULES",
    "BlockFormat",
    "BlockParams",
    "FloatFormat",
    "FormatBounds",
    "FormatLike",
    "FormatParams",
    "as_params",
    "format_params",
    "format_table",
    "get_format",
    "grid",
    "list_formats",
    "register_format",
    "stack_format_params",
]

_F32_MANTISSA_BITS = 23
_F32_SMALLEST = 2.0**-149
_F32_MAX_EXP = 127


def _f32_bits(value: float) -> int:
    """The float32 bit pattern of ``value`` (which must be exactly representable)."""
    as_f32 = np.float32(value)
    if float(as_f32) != value:
        raise AssertionError(f"{value!r} is not exactly representable in float32")
    return int(as_f32.view(np.uint32))


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """A simulated floating-point (or fixed-point) number format.

    Args:
      name: display name; lookups by name go through :func:`get_format`.
      exponent_bits: E, 0 to 8. E = 0 is sign-magnitude fixed point.
      mantissa_bits: M, 0 to 23 (stored fraction bits, without the implicit leading one).
      bias: exponent bias (for fixed point, values are ``m * 2**(-bias - M)``).
      has_inf: IEEE-style top exponent code for inf and NaN.
      has_nan: the all-ones code is NaN (implied codes with ``has_inf``).
      signed: whether a sign bit is present.
      has_zero: False turns exponent code 0 into a normal binade (exponent-only scale formats).

    Every finite value must be exactly representable in float32 (the smallest positive value
    at least 2**-149, the largest exponent at most 127; normal binades may lie among float32's
    subnormals); the constructor raises ``ValueError`` saying why otherwise, and ``TypeError``
    for a name that is not a string or a flag that is not a bool.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    has_inf: bool = False
    has_nan: bool = False
    signed: bool = True
    has_zero: bool = True

    def __post_init__(self) -> None:
        check_str("name", self.name)
        for flag in ("has_inf", "has_nan", "signed", "has_zero"):
            check_bool(flag, getattr(self, flag))
        for field in ("exponent_bits", "mantissa_bits", "bias"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"{field} must be an int, got {value!r}")
            object.__setattr__(self, field, int(value))
        e, m = self.exponent_bits, self.mantissa_bits
        problem = None
        if not 0 <= e <= 8:
            problem = f"exponent_bits={e} must be in [0, 8] (float32 carries 8)"
        elif not 0 <= m <= _F32_MANTISSA_BITS:
            problem = f"mantissa_bits={m} must be in [0, 23] (float32 carries 23)"
        elif e == 0 and m == 0:
            problem = "a format with no exponent and no mantissa bits has no nonzero value"
        elif e == 0 and self.has_inf:
            problem = "fixed point (exponent_bits=0) has no exponent code for inf"
        elif self.has_inf and (m == 0 or not self.has_nan):
            problem = "has_inf needs mantissa_bits >= 1 and has_nan=True (IEEE: top exponent codes)"
        elif not self.has_zero and (m != 0 or e == 0 or self.has_inf):
            problem = "has_zero=False is for exponent-only formats (mantissa_bits=0, no inf)"
        elif self.max_code <= 0 or self.max_value <= 0:
            problem = "the special codes leave no positive finite value"
        elif self.smallest_positive < _F32_SMALLEST:
            lowest = math.frexp(self.smallest_positive)[1] - 1
            problem = (
                f"bias={self.bias} puts the smallest positive value at 2**{lowest}, below "
                "float32's smallest subnormal 2**-149, so it would not be exact in float32"
            )
        elif self.emax > _F32_MAX_EXP:
            problem = (
                f"bias={self.bias} puts the largest exponent at {self.emax}, "
                "above float32's 127, so max_value would overflow float32"
            )
        if problem is not None:
            raise ValueError(f"invalid format {self.name!r}: {problem}")

    # ----------------------------------------------------------------------------- structure
    @property
    def total_bits(self) -> int:
        """Bits in one code: sign (if signed) + exponent + mantissa."""
        return int(self.signed) + self.exponent_bits + self.mantissa_bits

    @property
    def is_power_of_two(self) -> bool:
        """Whether every nonzero value is a power of two (no mantissa bits, as E8M0)."""
        return self.mantissa_bits == 0 and self.exponent_bits > 0

    @property
    def is_fixed_point(self) -> bool:
        return self.exponent_bits == 0

    @property
    def _emin(self) -> int:
        """Exponent of the lowest binade (where the subnormal spacing starts)."""
        if self.exponent_bits == 0 or not self.has_zero:
            return -self.bias
        return 1 - self.bias

    @property
    def max_code(self) -> int:
        """Magnitude code (sign bit clear) of ``max_value``."""
        e, m = self.exponent_bits, self.mantissa_bits
        all_ones = (1 << (e + m)) - 1
        if self.has_inf:
            return ((1 << e) - 1 << m) - 1
        if self.has_nan:
            return all_ones - 1
        return all_ones

    @property
    def emax(self) -> int:
        """Exponent of the binade holding ``max_value`` (for fixed point: of its leading bit)."""
        return math.frexp(self.max_value)[1] - 1

    def decode_magnitude(self, code: int) -> float:
        """Exact value of a finite magnitude code (sign bit clear), as a Python float."""
        m = self.mantissa_bits
        exponent_code, fraction = code >> m, code & ((1 << m) - 1)
        if self.exponent_bits == 0 or (self.has_zero and exponent_code == 0):
            return math.ldexp(fraction, self._emin - m)
        return math.ldexp((1 << m) + fraction, exponent_code - self.bias - m)

    # ------------------------------------------------------------------------------ values
    @property
    def max_value(self) -> float:
        return self.decode_magnitude(self.max_code)

    @property
    def min_value(self) -> float:
        """The most negative finite value (0 or the smallest positive one when unsigned)."""
        return -self.max_value if self.signed else self.smallest_positive

    @property
    def min_subnormal(self) -> float:
        """The smallest positive value (a subnormal when the format has subnormals)."""
        return self.smallest_positive

    @property
    def smallest_positive(self) -> float:
        return self.decode_magnitude(0 if not self.has_zero else 1)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value.

        Fixed point has no subnormals (its grid is uniform), so there every nonzero value counts
        as normal and ``min_normal == min_subnormal``.
        """
        if self.exponent_bits == 0:
            return self.smallest_positive
        return math.ldexp(1.0, self._emin)

    @property
    def epsilon(self) -> float:
        """Relative spacing of normal values, 2**-M."""
        return math.ldexp(1.0, -self.mantissa_bits)

    @property
    def num_codes(self) -> int:
        return 1 << self.total_bits

    @property
    def code_dtype(self) -> np.dtype:
        """Smallest unsigned dtype holding one code (uint8 for 8-bit formats)."""
        for dtype in (np.uint8, np.uint16, np.uint32):
            if self.total_bits <= np.iinfo(dtype).bits:
                return np.dtype(dtype)
        raise AssertionError("formats have at most 32 bits")

    def __repr__(self) -> str:
        flags = [
            flag
            for flag, on in (
                ("inf", self.has_inf),
                ("nan", self.has_nan and not self.has_inf),
                ("unsigned", not self.signed),
                ("no zero", not self.has_zero),
            )
            if on
        ]
        extra = f", {', '.join(flags)}" if flags else ""
        return (
            f"FloatFormat({self.name}: E{self.exponent_bits}M{self.mantissa_bits}, "
            f"bias={self.bias}, max={self.max_value:.6g}{extra})"
        )


# --------------------------------------------------------------------------------- registry
E0M7 = FloatFormat("E0M7", 0, 7, 0)
E1M6 = FloatFormat("E1M6", 1, 6, 0)
E2M5 = FloatFormat("E2M5", 2, 5, 1)
E3M4 = FloatFormat("E3M4", 3, 4, 1)
E4M3 = FloatFormat("E4M3", 4, 3, 7, has_nan=True)
E5M2 = FloatFormat("E5M2", 5, 2, 15, has_inf=True, has_nan=True)
E6M1 = FloatFormat("E6M1", 6, 1, 31)
E7M0 = FloatFormat("E7M0", 7, 0, 63)
FP16 = FloatFormat("FP16", 5, 10, 15, has_inf=True, has_nan=True)
BF16 = FloatFormat("BF16", 8, 7, 127, has_inf=True, has_nan=True)
# OCP MX element formats and the MX shared-scale format.
E2M1 = FloatFormat("E2M1", 2, 1, 1)
E2M3 = FloatFormat("E2M3", 2, 3, 1)
E3M2 = FloatFormat("E3M2", 3, 2, 3)
E8M0 = FloatFormat("E8M0", 8, 0, 127, has_nan=True, signed=False, has_zero=False)

EIGHT_BIT_FORMATS: tuple[FloatFormat, ...] = (E0M7, E1M6, E2M5, E3M4, E4M3, E5M2, E6M1, E7M0)

_REGISTRY: dict[str, FloatFormat | BlockFormat] = {}
_ALIASES: dict[str, str] = {}


def _normalize(name: str) -> str:
    return name.strip().upper().replace("-", "_")


def register_format(
    fmt: FloatFormat | BlockFormat, aliases: tuple[str, ...] = ()
) -> FloatFormat | BlockFormat:
    """Adds ``fmt`` to the registry under its name and ``aliases``; returns it."""
    key = _normalize(fmt.name)
    existing = _REGISTRY.get(key)
    if existing is not None and existing != fmt:
        raise ValueError(f"a different format is already registered as {fmt.name!r}: {existing}")
    _REGISTRY[key] = fmt
    for alias in aliases:
        _ALIASES[_normalize(alias)] = key
    return fmt


for _fmt, _aliases in (
    (E0M7, ("FP8_E0M7",)),
    (E1M6, ("FP8_E1M6",)),
    (E2M5, ("FP8_E2M5",)),
    (E3M4, ("FP8_E3M4",)),
    (E4M3, ("FP8_E4M3", "E4M3FN", "FP8_E4M3FN", "FLOAT8_E4M3FN")),
    (E5M2, ("FP8_E5M2", "FLOAT8_E5M2")),
    (E6M1, ("FP8_E6M1",)),
    (E7M0, ("FP8_E7M0",)),
    (FP16, ("FLOAT16", "HALF", "E5M10")),
    (BF16, ("BFLOAT16", "E8M7")),
    (E2M1, ("FP4_E2M1", "FLOAT4_E2M1FN")),
    (E2M3, ("FP6_E2M3", "FLOAT6_E2M3FN")),
    (E3M2, ("FP6_E3M2", "FLOAT6_E3M2FN")),
    (E8M0, ("E8M0FNU", "FLOAT8_E8M0FNU")),
):
    register_format(_fmt, _aliases)


def list_formats() -> tuple[str, ...]:
    """Names of the registered formats, in registration order."""
    return tuple(fmt.name for fmt in _REGISTRY.values())


def get_format(name: str | FloatFormat | BlockFormat) -> FloatFormat | BlockFormat:
    """Looks a format up by name, case-insensitively ("E4M3", "e4m3", "FP8_E4M3").

    A :class:`FloatFormat` is returned as is, so APIs can accept either. Raises ``ValueError``
    listing the known names when ``name`` is unknown.
    """
    if isinstance(name, (FloatFormat, BlockFormat)):
        return name
    if not isinstance(name, str):
        raise TypeError(f"format must be a name or a FloatFormat, got {type(name).__name__}")
    key = _normalize(name)
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(list_formats())}")
    return _REGISTRY[key]


# --------------------------------------------------------------------------- grids, table
@functools.cache
def _positive_grid(fmt: FloatFormat) -> np.ndarray:
    values = [fmt.decode_magnitude(code) for code in range(fmt.max_code + 1)]
    return np.asarray(values, dtype=np.float64)


def grid(fmt: FloatFormat | str, *, negative: bool = True) -> np.ndarray:
    """All finite values of ``fmt``, sorted ascending, as float64 (zero once, no -0).

    Only for formats of at most 16 bits (a 65536-entry grid); larger ones raise ``ValueError``.
    """
    fmt = get_format(fmt)
    if isinstance(fmt, BlockFormat):
        fmt = fmt.element  # the grid of one block at unit scale
    if fmt.total_bits > 16:
        raise ValueError(f"grid of {fmt.name} would have 2**{fmt.total_bits} entries; max 16 bits")
    positive = _positive_grid(fmt)
    if negative and fmt.signed:
        nonzero = positive[positive > 0]
        return np.concatenate([-nonzero[::-1], positive])
    return positive.copy()


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    rows = [header, *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_table(formats: tuple[FloatFormat | BlockFormat | str, ...] | None = None) -> str:
    """A plain-text table of formats: bits, bias, range and number of codes; block formats
    follow in a second table (element, block shape, scale format and rule)."""
    fmts = [get_format(f) for f in formats] if formats else list(_REGISTRY.values())
    rows = []
    for f in (f for f in fmts if isinstance(f, FloatFormat)):
        special = "inf+nan" if f.has_inf else ("nan" if f.has_nan else "-")
        if not f.signed:
            special += ", unsigned"
        rows.append(
            (
                f.name,
                str(f.exponent_bits),
                str(f.mantissa_bits),
                str(f.bias),
                f"{f.max_value:.6g}",
                f"{f.min_normal:.6g}",
                f"{f.min_subnormal:.6g}",
                str(f.num_codes),
                special,
            )
        )
    header = ("name", "E", "M", "bias", "max", "min normal", "min subnormal", "codes", "special")
    lines = _table(header, rows) if rows else []
    blocks = [
        (
            f.name,
            f.element.name,
            "x".join(map(str, f.block_shape)),
            "float32" if f.scale_format is None else f.scale_format.name,
            f.scale_rule,
            "float32" if f.tensor_scale else "-",
            f"{f.element.max_value:.6g}",
        )
        for f in fmts
        if isinstance(f, BlockFormat)
    ]
    if blocks:
        header = ("block format", "element", "block", "scale", "rule", "tensor scale", "max")
        lines += ([""] if lines else []) + _table(header, blocks)
    return "\n".join(lines)


# ----------------------------------------------------------------------- kernel constants
class FormatBounds(NamedTuple):
    """Static extremes of the format (or formats) a :class:`FormatParams` may hold.

    Traced parameters have unknown values at trace time, yet ``quantize`` must still refuse an
    input dtype that cannot hold the format's values (a bfloat16 input cannot hold FP16's 65504
    and would round it to 65536). These bounds travel as static pytree metadata, so the check
    is made at trace time for traced formats too. They are part of ``jit``'s cache key: programs
    are shared by parameters with equal bounds.
    """

    mantissa_bits: int  # the largest M
    max_value: float  # the largest max_value
    min_subnormal: float  # the smallest positive value

    def widen(self, other: FormatBounds) -> FormatBounds:
        """Bounds covering both ``self`` and ``other``."""
        return FormatBounds(
            max(self.mantissa_bits, other.mantissa_bits),
            max(self.max_value, other.max_value),
            min(self.min_subnormal, other.min_subnormal),
        )

    def fits(self, mantissa_bits: int, max_value: float, smallest_subnormal: float) -> bool:
        """Whether every value of every covered format lies on a dtype with these limits."""
        return (
            self.mantissa_bits <= mantissa_bits
            and self.max_value <= max_value
            and self.min_subnormal >= smallest_subnormal
        )


ANY_FORMAT = FormatBounds(_F32_MANTISSA_BITS, float(np.finfo(np.float32).max), 2.0**-149)
"""The bounds of parameters that may hold any format: they fit float32 inputs only."""


_INT_FIELDS = (
    "mantissa_bits",
    "min_normal_field",
    "max_bits",
    "tiny_limit",
    "tiny_mid",
    "tiny_low",
    "tiny_high",
)
_BOOL_FIELDS = ("signed", "has_inf", "has_nan", "has_zero")


@pytree_dataclass
class FormatParams:
    """The numbers the rounding kernel needs, derived from a format.

    With Python ints (``format_params(fmt)``) every branch folds away at trace time. As arrays
    (``format_params(fmt).as_arrays()`` or :func:`stack_format_params`) the format becomes a traced
    value, so one compiled program serves many formats and ``vmap`` can run over formats.

    All ``*_bits`` are float32 bit patterns of magnitudes. ``bounds`` (:class:`FormatBounds`) is
    static metadata, part of the treedef and so of ``jit``'s cache key: the format's own for
    ``format_params``, "any format" for ``as_arrays()`` (one program for every format, float32
    inputs), a family's for ``as_arrays(within=...)`` and :func:`stack_format_params`. A
    registered pytree (a frozen dataclass), so ``jit``, ``vmap`` and ``lax.scan`` take it.
    """

    mantissa_bits: int | jax.Array  # M
    min_normal_field: int | jax.Array  # float32 exponent field where the normal frame starts
    max_bits: int | jax.Array  # max_value
    tiny_limit: int | jax.Array  # below this magnitude only tiny_low / tiny_high are candidates
    tiny_mid: int | jax.Array  # the tie point between tiny_low and tiny_high
    tiny_low: int | jax.Array
    tiny_high: int | jax.Array
    signed: bool | jax.Array
    has_inf: bool | jax.Array
    has_nan: bool | jax.Array
    has_zero: bool | jax.Array
    bounds: FormatBounds | None = static_field(default=None)

    @property
    def max_value(self) -> jax.Array:
        """The format's largest finite value as a float32 scalar (traced for array params)."""
        import jax
        import jax.numpy as jnp

        return jax.lax.bitcast_convert_type(jnp.asarray(self.max_bits, jnp.uint32), jnp.float32)

    def as_arrays(self, within: tuple[FormatLike, ...] | None = None) -> FormatParams:
        """The same numbers as JAX arrays (uint32 and bool), for traced formats.

        Args:
          within: None (the default): the arrays may stand for any format (bounds
            :data:`ANY_FORMAT`), so every such parameter set shares one compiled program, and
            quantize accepts only float32 input with it. A tuple of formats: the bounds cover
            this format and those, so bfloat16 / float16 inputs are accepted when all of them
            fit (``within=()``: this format alone); programs are shared by equal ``within``.
        """
        import jax.numpy as jnp

        if isinstance(self.min_normal_field, int) and self.min_normal_field <= 0:
            raise ValueError(
                "a format whose normal range starts below 2**-126 (float32's subnormals) is "
                "rounded by a kernel branch chosen at trace time; pass it as a static format"
            )
        if within is None:
            bounds = ANY_FORMAT
        else:
            bounds = self.bounds if self.bounds is not None else ANY_FORMAT
            for other in within:
                bounds = bounds.widen(as_params(other).bounds or ANY_FORMAT)
        return FormatParams(
            **{f: jnp.asarray(getattr(self, f), jnp.uint32) for f in _INT_FIELDS},
            **{f: jnp.asarray(getattr(self, f), jnp.bool_) for f in _BOOL_FIELDS},
            bounds=bounds,
        )


@functools.cache
def format_params(fmt: FloatFormat) -> FormatParams:
    """Kernel constants of ``fmt`` as Python ints (see :class:`FormatParams`)."""
    m = fmt.mantissa_bits
    emin = fmt._emin
    if fmt.has_zero:
        # Normal frame from 2**emin up; below one quantum the candidates are 0 and the quantum,
        # and the tie (half a quantum) goes to 0, the even code.
        min_normal_field = emin + 127
        quantum = math.ldexp(1.0, emin - m)
        tiny_limit = tiny_high = _f32_bits(quantum)
        half = quantum / 2
        tiny_mid = _f32_bits(half) if half >= math.ldexp(1.0, -149) else 0
        tiny_low = 0
    else:
        # Exponent-only (M = 0, no zero): below 2**(emin+1) the candidates are 2**emin and
        # 2**(emin+1) (everything smaller rounds up to 2**emin); the normal frame starts above.
        min_normal_field = emin + 128
        low = math.ldexp(1.0, emin)
        tiny_low = _f32_bits(low)
        tiny_limit = tiny_high = _f32_bits(2 * low)
        # 1.5 * 2**-149 is no float32: then no float32 lies strictly between, low is the tie.
        tiny_mid = _f32_bits(1.5 * low) if low > _F32_SMALLEST else tiny_low
    return FormatParams(
        mantissa_bits=m,
        min_normal_field=min_normal_field,
        max_bits=_f32_bits(fmt.max_value),
        tiny_limit=tiny_limit,
        tiny_mid=tiny_mid,
        tiny_low=tiny_low,
        tiny_high=tiny_high,
        signed=fmt.signed,
        has_inf=fmt.has_inf,
        has_nan=fmt.has_nan,
        has_zero=fmt.has_zero,
        bounds=FormatBounds(m, fmt.max_value, fmt.min_subnormal),
    )


FormatLike = FloatFormat | str | FormatParams
"""What every API that takes "a format" accepts: a format, its registered name, or traced params."""


def as_params(fmt: FormatLike) -> FormatParams:
    """The kernel constants of any :data:`FormatLike`: Python ints for a format or name (so
    every branch folds at trace time), the given arrays for traced :class:`FormatParams`."""
    if isinstance(fmt, FormatParams):
        return fmt
    return format_params(get_format(fmt))


def stack_format_params(formats: tuple[FloatFormat | str, ...]) -> FormatParams:
    """Kernel constants of several formats stacked on a leading axis, for ``vmap``; the bounds
    cover all of them."""
    import jax.numpy as jnp

    formats = tuple(formats)
    per_format = [format_params(get_format(f)).as_arrays(within=formats) for f in formats]
    fields = {
        f: jnp.stack([getattr(p, f) for p in per_format]) for f in (*_INT_FIELDS, *_BOOL_FIELDS)
    }
    return FormatParams(**fields, bounds=per_format[0].bounds)


# ------------------------------------------------------------------------- block formats
ScaleRule = Literal["floor", "ceil", "rceil", "even", "nearest"]
SCALE_RULES: tuple[str, ...] = typing.get_args(ScaleRule)
# Rules of power-of-two scale formats (E8M0), and of scale formats with mantissa bits (E4M3).
_POW2_RULES = ("floor", "ceil", "rceil", "even")
_MANTISSA_RULES = ("nearest", "rceil")


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    """A block-scaled (microscaling) format: elements of one format sharing a scale per block.

    Consecutive ``block_size`` elements along one axis (or ``(rows, cols)`` tiles over two axes)
    share a scale in ``scale_format`` (OCP MX: E8M0, a power of two), chosen from the block's
    amax by ``scale_rule``; ``scale_format=None`` keeps float32 scales ``amax / max``
    (DeepSeek-V3's FP8 recipe). With ``tensor_scale`` a float32 scale for the whole tensor comes
    first and the block scales are relative to it (NVFP4). Semantics of the rules and of edge
    cases: :mod:`altgrad_jax.blocks`.

    Args:
      name: display and registry name.
      element: the element :class:`FloatFormat` (or its name).
      block_size: elements per block (int), or a 2-D tile ``(rows, cols)``.
      scale_format: a :class:`FloatFormat` for the block scales (or its name), or None for
        float32 scales.
      scale_rule: for power-of-two scale formats "floor" (OCP MX v1.0), "ceil", "rceil" (the
        smallest power of two that does not saturate, the default) or "even" (amax rounded to
        the element's mantissa first); for scale formats with mantissa bits "nearest" (the
        NVFP4 recipe) or "rceil" (rounded up, never saturates); float32 scales take "rceil".
      tensor_scale: a float32 per-tensor scale ``amax / (scale_max * element_max)`` above the
        block scales (NVFP4's two levels).

    References:
      OCP Microscaling Formats (MX) Specification v1.0, 2023. NVIDIA, "Pretraining Large
      Language Models with NVFP4", 2025. DeepSeek-AI, "DeepSeek-V3 Technical Report", 2024.
    """

    name: str
    element: FloatFormat | str
    block_size: int | tuple[int, ...] = 32
    scale_format: FloatFormat | str | None = "E8M0"
    scale_rule: ScaleRule = "rceil"
    tensor_scale: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"block format name must be a non-empty string, got {self.name!r}")
        element = get_format(self.element)
        if not isinstance(element, FloatFormat):
            raise ValueError(f"{self.name}: element must be a FloatFormat, got {element!r}")
        object.__setattr__(self, "element", element)
        size = self.block_size
        shape = size if isinstance(size, tuple) else (size,)
        if not 1 <= len(shape) <= 2 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape
        ):
            raise ValueError(
                f"{self.name}: block_size must be a positive int or a (rows, cols) tile of "
                f"positive ints, got {size!r}"
            )
        scale = self.scale_format
        if scale is not None:
            scale = get_format(scale)
            if not isinstance(scale, FloatFormat):
                raise ValueError(f"{self.name}: scale_format must be a FloatFormat or None")
            object.__setattr__(self, "scale_format", scale)
        if not isinstance(self.tensor_scale, bool):
            raise TypeError(f"{self.name}: tensor_scale must be True or False")
        rules = self.scale_rules
        if self.scale_rule not in rules:
            raise ValueError(
                f"{self.name}: unknown scale_rule {self.scale_rule!r} for "
                f"{'float32' if scale is None else scale.name} scales; expected one of "
                f"{', '.join(repr(r) for r in rules)}"
            )

    @property
    def block_shape(self) -> tuple[int, ...]:
        """``(block_size,)`` for 1-D blocks, ``(rows, cols)`` for tiles."""
        size = self.block_size
        return size if isinstance(size, tuple) else (size,)

    @property
    def scale_rules(self) -> tuple[str, ...]:
        """The scale rules this block format's scale format can take."""
        if self.scale_format is None:
            return ("rceil",)
        return _POW2_RULES if self.scale_format.is_power_of_two else _MANTISSA_RULES

    @property
    def max_value(self) -> float:
        """The largest element magnitude at unit scale."""
        return self.element.max_value

    @property
    def bits_per_element(self) -> float:
        """Storage per element: the element's bits plus its share of the block scale."""
        scale_bits = 32 if self.scale_format is None else self.scale_format.total_bits
        return self.element.total_bits + scale_bits / math.prod(self.block_shape)

    def replace(self, **changes) -> BlockFormat:
        """A copy with fields changed, e.g. ``MXFP4.replace(scale_rule="floor")``."""
        return dataclasses.replace(self, **changes)

    @property
    def layout(self) -> tuple:
        """Everything but the name and the element: what a traced element leaves static."""
        return (self.block_shape, self.scale_format, self.scale_rule, self.tensor_scale)

    def as_arrays(self, within: tuple[BlockFormat | str, ...] | None = None) -> BlockParams:
        """This format with a traced element: :class:`BlockParams`, whose element format is
        :class:`FormatParams` arrays (``format_params(element).as_arrays(...)``).

        Block formats of one layout (block size, scale format and rule, tensor scale) then
        share one compiled program: MXFP8_E4M3, MXFP8_E5M2, MXFP6_E2M3, MXFP6_E3M2 and MXFP4
        in a sweep. ``within`` works as in :meth:`FormatParams.as_arrays`: None lets the element
        stand for any format (float32 input only), a tuple of block formats of this layout
        bounds it by their elements (so bfloat16 input is accepted where they all fit), and
        programs are shared by equal ``within``. Raises for formats of another layout.
        """
        elements = None
        if within is not None:
            others = tuple(get_format(f) for f in within)
            for other in others:
                if not isinstance(other, BlockFormat) or other.layout != self.layout:
                    raise ValueError(
                        f"{self.name}: within= needs block formats of its layout "
                        f"{self.layout}; got {other!r}"
                    )
            elements = tuple(other.element for other in others)
        element = format_params(self.element).as_arrays(within=elements)
        return BlockParams(
            element, self.block_size, self.scale_format, self.scale_rule, self.tensor_scale
        )

    def __repr__(self) -> str:
        scale = "float32" if self.scale_format is None else self.scale_format.name
        extra = ", tensor scale" if self.tensor_scale else ""
        block = "x".join(map(str, self.block_shape))
        return (
            f"BlockFormat({self.name}: {self.element.name} x {block}, {scale} scales "
            f"({self.scale_rule}){extra})"
        )


@pytree_dataclass
class BlockParams:
    """A block format whose element format is traced :class:`FormatParams` arrays.

    Made by :meth:`BlockFormat.as_arrays`; accepted wherever a block format is (``quantize``,
    :func:`~altgrad_jax.block_scales`, the layers' :class:`~altgrad_jax.TensorQuant`). The
    layout fields are static (part of ``jit``'s cache key, with the element's bounds), the
    element is data: every block format of one layout runs through the same program. The
    fields mean what they mean in :class:`BlockFormat`.
    """

    element: FormatParams
    block_size: int | tuple[int, ...] = static_field(default=32)
    scale_format: FloatFormat | None = static_field(default=None)
    scale_rule: str = static_field(default="rceil")
    tensor_scale: bool = static_field(default=False)

    @property
    def block_shape(self) -> tuple[int, ...]:
        """``(block_size,)`` for 1-D blocks, ``(rows, cols)`` for tiles."""
        size = self.block_size
        return size if isinstance(size, tuple) else (size,)

    @property
    def name(self) -> str:
        """A display name (the element is data, so it has none of its own)."""
        scale = "float32" if self.scale_format is None else self.scale_format.name
        return f"traced block format ({'x'.join(map(str, self.block_shape))}, {scale} scales)"


MXFP8_E4M3 = BlockFormat("MXFP8_E4M3", E4M3)
MXFP8_E5M2 = BlockFormat("MXFP8_E5M2", E5M2)
MXFP6_E2M3 = BlockFormat("MXFP6_E2M3", E2M3)
MXFP6_E3M2 = BlockFormat("MXFP6_E3M2", E3M2)
MXFP4 = BlockFormat("MXFP4", E2M1)
NVFP4 = BlockFormat("NVFP4", E2M1, 16, E4M3, "nearest", tensor_scale=True)
# DeepSeek-V3's FP8 recipe: float32 scales per 1 x 128 activation tile and 128 x 128 weight block.
FP8_E4M3_1X128 = BlockFormat("FP8_E4M3_1x128", E4M3, 128, None)
FP8_E4M3_128X128 = BlockFormat("FP8_E4M3_128x128", E4M3, (128, 128), None)

BLOCK_FORMATS: tuple[BlockFormat, ...] = (
    MXFP8_E4M3,
    MXFP8_E5M2,
    MXFP6_E2M3,
    MXFP6_E3M2,
    MXFP4,
    NVFP4,
    FP8_E4M3_1X128,
    FP8_E4M3_128X128,
)
for _fmt in BLOCK_FORMATS:
    register_format(_fmt)
