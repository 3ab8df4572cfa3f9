"""Per-tensor scaling: amax history as an immutable pytree, and the scale it implies.

A tensor is quantized as ``quantize(x, fmt, scale)`` with ``scale = amax * margin / max_value``,
so its largest magnitude lands just inside the format's range. ``amax`` comes from a short
history of recent maxima (Micikevicius et al., 2022, "FP8 Formats for Deep Learning"):

* **current** scaling puts this tensor's amax into the history first, so it never overflows
  (the default here, as in the project this library grew from);
* **delayed** scaling uses the history from before this tensor, as NVIDIA Transformer Engine does,
  so the scale is known before the tensor is computed.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from altgrad_jax._checks import (
    check_choice,
    check_positive_float,
    check_positive_int,
    choices_of,
)
from altgrad_jax._pytree import pytree_dataclass, static_field
from altgrad_jax.formats import FormatLike, as_params

__all__ = [
    "AMAX_ALGORITHMS",
    "SCALING_MODES",
    "AmaxHistory",
    "ScalingMode",
    "compute_scale",
    "scale_and_update",
]

AmaxAlgorithm = Literal["max", "most_recent"]
AMAX_ALGORITHMS: tuple[str, ...] = choices_of(AmaxAlgorithm)
ScalingMode = Literal["current", "delayed"]
SCALING_MODES: tuple[str, ...] = choices_of(ScalingMode)

DEFAULT_MARGIN = 1.01
DEFAULT_SCALE_MIN = 1e-10


@pytree_dataclass
class AmaxHistory:
    """A fixed-size window of recent amax values, newest first.

    Attributes:
      history: float32 ``[history_len]``, zeros where nothing has been recorded yet.
      count: int32 number of recorded values, saturating at ``history_len`` (never overflows).
      algorithm: "max" (max of the window) or "most_recent"; static.
    """

    history: jax.Array
    count: jax.Array
    algorithm: str = static_field(default="max")

    @classmethod
    def create(cls, history_len: int = 16, algorithm: AmaxAlgorithm = "max") -> AmaxHistory:
        history_len = check_positive_int("history_len", history_len)
        check_choice("amax algorithm", algorithm, AMAX_ALGORITHMS)
        return cls(jnp.zeros((history_len,), jnp.float32), jnp.zeros((), jnp.int32), algorithm)

    @property
    def history_len(self) -> int:
        return self.history.shape[-1]

    def update(self, x: jax.Array) -> AmaxHistory:
        """Returns a new history with ``max|x|`` recorded (NaN in x is recorded as NaN)."""
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"AmaxHistory.update takes floating-point input, got {x.dtype}")
        amax = jnp.max(jnp.abs(x), initial=0.0).astype(jnp.float32)
        return self.record(amax)

    def record(self, amax: jax.Array) -> AmaxHistory:
        """Returns a new history with the given amax (a scalar) recorded."""
        history = jnp.concatenate([jnp.reshape(amax, (1,)).astype(jnp.float32), self.history[:-1]])
        count = jnp.minimum(self.count + 1, self.history_len)
        return self.replace(history=history, count=count)

    def get_amax(self) -> jax.Array:
        """The amax the history implies; 1.0 before anything was recorded."""
        amax = self.history[0] if self.algorithm == "most_recent" else jnp.max(self.history)
        return jnp.where(self.count > 0, amax, jnp.float32(1.0))


def _scale_factor(fmt: FormatLike, margin: float) -> jax.Array:
    """``margin / max_value`` rounded once to float32 (one IEEE division, so static and traced
    formats, eager and jit, give the same bits)."""
    return jnp.float32(margin) / as_params(fmt).max_value


def compute_scale(
    amax: jax.Array,
    fmt: FormatLike,
    scale_min: float = DEFAULT_SCALE_MIN,
    margin: float = DEFAULT_MARGIN,
) -> jax.Array:
    """``max(amax * margin / fmt.max_value, scale_min)``; ``scale_min`` when amax < scale_min.

    Computed as ``amax * (margin / max_value)`` with the factor rounded once to float32, so the
    bits are the same eagerly, under ``jit`` and for traced formats. The floor keeps an all-zero
    tensor from producing a zero scale; a NaN amax gives a NaN scale, so NaN stays visible.
    """
    check_positive_float("scale_min", scale_min)
    check_positive_float("margin", margin)
    amax = jnp.asarray(amax, jnp.float32)
    scale = jnp.maximum(amax * _scale_factor(fmt, margin), jnp.float32(scale_min))
    return jnp.where(amax < scale_min, jnp.float32(scale_min), scale)


def scale_and_update(
    history: AmaxHistory,
    x: jax.Array,
    fmt: FormatLike,
    mode: ScalingMode = "current",
    *,
    scale_min: float = DEFAULT_SCALE_MIN,
    margin: float = DEFAULT_MARGIN,
) -> tuple[jax.Array, AmaxHistory]:
    """The scale to quantize ``x`` with, and the history with ``x``'s amax recorded.

    "current" records first and scales from the updated window; "delayed" scales from the
    window as it was, then records.
    """
    check_choice("scaling mode", mode, SCALING_MODES)
    new_history = history.update(x)
    source = new_history if mode == "current" else history
    return compute_scale(source.get_amax(), fmt, scale_min, margin), new_history
