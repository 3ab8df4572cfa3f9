"""Quantization configuration shared by the Linen and NNX modules.

A quantized matmul has three tensor roles: the inputs (activations), the weights, and the output
gradient in the backward pass. :class:`QuantConfig` gives each role its own :class:`TensorQuant`
(format, rounding, scaling) or ``None`` for "leave this tensor alone". Both classes are frozen and
hashable, so a config is a static argument of ``jax.jit`` and every choice in it is resolved while
tracing. The defaults mirror FP8 training practice (Micikevicius et al., 2022): E4M3 forward, E5M2
for the output gradients, current scaling with a 16-step amax history.
:meth:`QuantConfig.flax_fp8` is ``flax.linen.fp8_ops``'s recipe, bit for bit (``scaling="flax"``).
"""

from __future__ import annotations

import dataclasses

from altgrad_jax._checks import (
    check_bool,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_str,
)
from altgrad_jax.bits import ROUNDING_MODES, Rounding
from altgrad_jax.formats import (
    BlockFormat,
    BlockParams,
    FloatFormat,
    FormatLike,
    FormatParams,
    get_format,
)
from altgrad_jax.scaling import (
    AMAX_ALGORITHMS,
    DEFAULT_MARGIN,
    DEFAULT_SCALE_MIN,
    FLAX_MARGIN,
    SCALING_MODES,
    ScalingMode,
)

__all__ = ["ROLES", "QuantConfig", "TensorQuant"]

# The tensor roles of a quantized dot_general, in the order their PRNG keys are derived.
ROLES: tuple[str, ...] = ("inputs", "weights", "output_grads")


@dataclasses.dataclass(frozen=True)
class TensorQuant:
    """How one tensor role is quantized: ``quantize(x, format, scale, rounding=...)``.

    Everything but the format is static policy. The format is a :class:`FloatFormat` or a
    :class:`BlockFormat` (static, hashable), or traced :class:`FormatParams` arrays or a block
    format with a traced element (:class:`BlockParams`, from ``BlockFormat.as_arrays``): build
    the config inside the jitted function from traced params and one compiled program serves
    every format (such a config is not hashable, so do not pass it as a static argument).

    Args:
      format: a :class:`FloatFormat`, a registered name (resolved with ``get_format``) or
        :class:`FormatParams`.
      rounding: "nearest", "stochastic" (needs the config's RNG stream) or "toward_zero".
      scaling: "current" (this tensor's amax enters the history before the scale is taken),
        "delayed" (the scale comes from earlier steps only) or "flax" (Flax's ``fp8_ops``
        delayed scaling and float arithmetic, bit for bit: a stored scale, initially 1.0, kept
        when the amax is zero; see :mod:`altgrad_jax.scaling` and
        :func:`altgrad_jax.quantize.quantize_flax`).
      history_len: length of the amax window, >= 1.
      margin: headroom factor in ``scale = amax * margin / max_value``; default 1.01, or 1.0
        with "flax" (Flax's ``2**margin`` with margin 0).
      amax_algorithm: "max" over the window or "most_recent".
      scale_min: floor of the scale, so an all-zero tensor never divides by zero ("current"
        and "delayed"; Flax's formula has no floor, so "flax" does not use it).
    """

    format: FormatLike
    rounding: Rounding = "nearest"
    scaling: ScalingMode = "current"
    history_len: int = 16
    margin: float | None = None
    amax_algorithm: str = "max"
    scale_min: float = DEFAULT_SCALE_MIN

    def __post_init__(self) -> None:
        if not isinstance(self.format, (FormatParams, BlockParams)):
            object.__setattr__(self, "format", get_format(self.format))
        check_choice("rounding", self.rounding, ROUNDING_MODES)
        check_choice("scaling", self.scaling, SCALING_MODES)
        check_choice("amax_algorithm", self.amax_algorithm, AMAX_ALGORITHMS)
        check_positive_int("history_len", self.history_len)
        if self.margin is None:
            default = FLAX_MARGIN if self.scaling == "flax" else DEFAULT_MARGIN
            object.__setattr__(self, "margin", default)
        check_positive_float("margin", self.margin)
        check_positive_float("scale_min", self.scale_min)
        if isinstance(self.format, (BlockFormat, BlockParams)) and self.scaling != "current":
            raise ValueError(
                f"{self.format.name} scales every block from its own amax (current scaling); "
                f"scaling={self.scaling!r} is for per-tensor formats"
            )


RoleSpec = TensorQuant | FormatLike | None


def _as_tensor_quant(role: str, spec: RoleSpec) -> TensorQuant | None:
    if spec is None or isinstance(spec, TensorQuant):
        return spec
    if isinstance(spec, (str, FloatFormat, BlockFormat, BlockParams, FormatParams)):
        return TensorQuant(spec)
    raise TypeError(
        f"QuantConfig.{role} must be a TensorQuant, a format (name or FloatFormat) or None, "
        f"got {spec!r}"
    )


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Per-role quantization of a dot_general; ``None`` leaves that role in full precision.

    A role may be given as a format name or :class:`FloatFormat` (default :class:`TensorQuant`
    settings) or as a full :class:`TensorQuant`.

    Args:
      inputs: the left operand (activations).
      weights: the right operand (kernel).
      output_grads: the cotangent of the output, quantized inside the custom VJP.
      stats: sow / return quantization statistics (:class:`~altgrad_jax.quant_dot.QuantStats`:
        exact counts of entries, saturated, underflowed, subnormal and NaN ones, and the scale).
        Off by default: a config without stats computes none of them.
      rng_stream: name of the RNG stream stochastic rounding (and the Hadamard signs) draw
        from (Linen ``rngs`` key, NNX ``Rngs`` stream).
      hadamard: 16 or 32 applies a random Hadamard transform (random signs from the RNG
        stream) to both operands of the weight-gradient GEMM along the tokens before they are
        quantized, as the NVFP4 training recipe does to spread outliers; the transform is
        orthogonal, so without quantization the gradient is unchanged (to float32 rounding).
        The number of tokens must be a multiple of it.
    """

    inputs: RoleSpec = "E4M3"
    weights: RoleSpec = "E4M3"
    output_grads: RoleSpec = "E5M2"
    stats: bool = False
    rng_stream: str = "quant"
    hadamard: int | None = None

    def __post_init__(self) -> None:
        for role in ROLES:
            object.__setattr__(self, role, _as_tensor_quant(role, getattr(self, role)))
        check_bool("stats", self.stats)
        check_str("rng_stream", self.rng_stream)
        check_choice("hadamard", self.hadamard, (None, 16, 32))

    @classmethod
    def uniform(
        cls,
        forward: FormatLike | None = "E4M3",
        backward: FormatLike | None = "E5M2",
        **settings,
    ) -> QuantConfig:
        """One format for inputs and weights, one for output gradients, shared ``settings``.

        ``settings`` are :class:`TensorQuant` fields (rounding, scaling, history_len, margin...)
        plus the QuantConfig fields ``stats`` and ``rng_stream``.
        """
        own = {k: settings.pop(k) for k in ("stats", "rng_stream", "hadamard") if k in settings}

        def role(fmt: FormatLike | None) -> TensorQuant | None:
            return None if fmt is None else TensorQuant(fmt, **settings)

        return cls(role(forward), role(forward), role(backward), **own)

    @classmethod
    def flax_fp8(
        cls,
        forward: FormatLike | None = "E4M3",
        backward: FormatLike | None = "E5M2",
        history_len: int = 1024,
        **settings,
    ) -> QuantConfig:
        """``flax.linen.fp8_ops.Fp8DotGeneralOp``'s recipe: same forward values, gradients and
        scales, bit for bit.

        E4M3 inputs and weights, E5M2 output gradients, ``scaling="flax"`` with Flax's 1024-step
        window. Change ``forward`` / ``backward`` to move the model to other formats with only
        the format changed; ``settings`` as in :meth:`uniform` (rounding, stats...).
        """
        return cls.uniform(forward, backward, scaling="flax", history_len=history_len, **settings)

    def role(self, name: str) -> TensorQuant | None:
        """The :class:`TensorQuant` of role ``name`` (one of :data:`ROLES`)."""
        if name not in ROLES:
            raise ValueError(f"unknown role {name!r}; expected one of {ROLES}")
        return getattr(self, name)

    @property
    def needs_rng(self) -> bool:
        """Whether any role rounds stochastically or a Hadamard transform draws its signs (and
        so needs ``rng_stream``)."""
        stochastic = any(
            q is not None and q.rounding == "stochastic" for q in map(self.role, ROLES)
        )
        return stochastic or self.hadamard is not None
