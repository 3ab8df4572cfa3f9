"""Quantized Flax NNX layers, model-wide rules (quantize_model), a report, a train-step helper."""

from altgrad_jax._pytree import register_flax_serialization
from altgrad_jax.linen.report import LayerReport, QuantReport, UnmatchedRuleWarning
from altgrad_jax.nnx.layers import QuantAttention, QuantConv, QuantConvOp, QuantEmbed
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
from altgrad_jax.nnx.rules import quantization_report, quantize_model
from altgrad_jax.nnx.train import quant_value_and_grad

__all__ = [
    "LayerReport",
    "OutputGradState",
    "OutputGradStats",
    "QuantAttention",
    "QuantConv",
    "QuantConvOp",
    "QuantDotGeneral",
    "QuantEinsum",
    "QuantEinsumOp",
    "QuantEmbed",
    "QuantLinear",
    "QuantReport",
    "QuantState",
    "QuantStatsVariable",
    "UnmatchedRuleWarning",
    "quant_value_and_grad",
    "quantization_report",
    "quantize_model",
]

register_flax_serialization()  # checkpoints of the core pytrees via flax.serialization
