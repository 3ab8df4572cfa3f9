"""Quantized Flax NNX layers and a train-step gradient helper."""

from altgrad_jax._pytree import register_flax_serialization
from altgrad_jax.nnx.modules import (
    OutputGradState,
    OutputGradStats,
    QuantDotGeneral,
    QuantEinsum,
    QuantEinsumOp,
    QuantLinear,
    QuantState,
    QuantStatsVariable,
)
from altgrad_jax.nnx.train import quant_value_and_grad

__all__ = [
    "OutputGradState",
    "OutputGradStats",
    "QuantDotGeneral",
    "QuantEinsum",
    "QuantEinsumOp",
    "QuantLinear",
    "QuantState",
    "QuantStatsVariable",
    "quant_value_and_grad",
]

register_flax_serialization()  # checkpoints of the core pytrees via flax.serialization
