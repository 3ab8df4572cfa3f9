"""Quantized Flax Linen layers, model-wide path rules, and a train-step gradient helper."""

from altgrad_jax._pytree import register_flax_serialization
from altgrad_jax.linen.modules import (
    QUANT_STATE,
    QUANT_STATS,
    QuantDense,
    QuantDotGeneral,
    QuantEinsum,
    quant_dot_general_cls,
)
from altgrad_jax.linen.rules import quant_rules, quantized_clone
from altgrad_jax.linen.train import merge_quant_state, quant_value_and_grad

__all__ = [
    "QUANT_STATE",
    "QUANT_STATS",
    "QuantDense",
    "QuantDotGeneral",
    "QuantEinsum",
    "merge_quant_state",
    "quant_dot_general_cls",
    "quant_rules",
    "quant_value_and_grad",
    "quantized_clone",
]

register_flax_serialization()  # checkpoints of the core pytrees via flax.serialization
