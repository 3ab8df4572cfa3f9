"""Quantized Flax Linen layers, model-wide path rules, a report, and a train-step helper."""

from altgrad_jax._pytree import register_flax_serialization
from altgrad_jax.linen.attention import QuantAttention
from altgrad_jax.linen.conv import QuantConv, QuantConvGeneralDilated, quant_conv_cls
from altgrad_jax.linen.embed import QuantEmbed
from altgrad_jax.linen.modules import (
    QUANT_STATE,
    QUANT_STATS,
    QuantDense,
    QuantDotGeneral,
    QuantEinsum,
    quant_dot_general_cls,
)
from altgrad_jax.linen.report import LayerReport, QuantReport, UnmatchedRuleWarning
from altgrad_jax.linen.rules import (
    quant_rules,
    quantization_report,
    quantize_model,
    quantized_clone,
)
from altgrad_jax.linen.train import merge_quant_state, quant_value_and_grad

__all__ = [
    "QUANT_STATE",
    "QUANT_STATS",
    "LayerReport",
    "QuantAttention",
    "QuantConv",
    "QuantConvGeneralDilated",
    "QuantDense",
    "QuantDotGeneral",
    "QuantEinsum",
    "QuantEmbed",
    "QuantReport",
    "UnmatchedRuleWarning",
    "merge_quant_state",
    "quant_conv_cls",
    "quant_dot_general_cls",
    "quant_rules",
    "quant_value_and_grad",
    "quantization_report",
    "quantize_model",
    "quantized_clone",
]

register_flax_serialization()  # checkpoints of the core pytrees via flax.serialization
