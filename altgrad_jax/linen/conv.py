"""Quantized Linen convolutions through Flax's own hook, ``nn.Conv(conv_general_dilated_cls=...)``.

A convolution is bilinear in (inputs, kernel), so it is one more ``contract`` of the core
(:func:`altgrad_jax.quant_dot.quantized_contract`): ``y = conv(Q(x), Q(W))`` and the output
gradient quantized in the backward pass, whose two convolutions (input and kernel gradients)
are JAX's transposes of the forward one. Flax's ``__call__`` runs unchanged, so padding modes
(including CIRCULAR, REFLECT, CAUSAL), strides, dilations, feature groups, masks and batch
flattening behave exactly as in ``nn.Conv``. State lives under
``quant_state/<layer>/conv_general_dilated``, the name of the NNX layer's attribute.

Block formats block x and W along the input features (:func:`conv_axes`); each backward
convolution requantizes its own operands (dY along the output features for the input gradient,
x and dY along batch and space for the weight gradient), as for a dense layer.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from altgrad_jax.config import QuantConfig
from altgrad_jax.linen.modules import QuantDotGeneral, contraction
from altgrad_jax.quant_dot import ContractionAxes

__all__ = ["QuantConv", "QuantConvGeneralDilated", "conv_axes", "quant_conv_cls"]


def conv_contraction(
    op: Callable[..., jax.Array],
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: lax.PrecisionLike = None,
    preferred_element_type: jnp.dtype | None = None,
    **kwargs: Any,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``op`` (``lax.conv_general_dilated``'s signature) with everything but the operands bound."""
    return contraction(
        op,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kwargs,
    )


def conv_axes(
    lhs_shape: Sequence[int],
    rhs_shape: Sequence[int],
    dimension_numbers: Any = None,
    batch_group_count: int = 1,
) -> ContractionAxes:
    """The :class:`ContractionAxes` that block formats use for a convolution.

    Forward blocks run along the input features of x and W (the contraction axis of the
    per-pixel GEMM); the input gradient blocks dY along the output features, the weight
    gradient blocks x and dY along batch and space (that GEMM's contraction).
    """
    if batch_group_count != 1:
        raise ValueError("block formats do not support batch_group_count != 1 in a convolution")
    numbers = lax.conv_dimension_numbers(tuple(lhs_shape), tuple(rhs_shape), dimension_numbers)
    lhs_spec, rhs_spec, out_spec = numbers
    return ContractionAxes(
        (lhs_spec[1],), (rhs_spec[1],), (out_spec[0], *out_spec[2:]), (out_spec[1],)
    )


def conv_call_axes(
    lhs: jax.Array, rhs: jax.Array, args: tuple, kwargs: dict[str, Any]
) -> Callable[[], ContractionAxes]:
    """:func:`conv_axes` of a ``conv_general_dilated(lhs, rhs, *args, **kwargs)`` call, lazily
    (only block formats ask for them)."""
    bound = inspect.signature(lax.conv_general_dilated).bind(lhs, rhs, *args, **kwargs)
    numbers = bound.arguments.get("dimension_numbers")
    groups = bound.arguments.get("batch_group_count", 1)
    return functools.partial(conv_axes, lhs.shape, rhs.shape, numbers, groups)


class QuantConvGeneralDilated(QuantDotGeneral):
    """A drop-in ``lax.conv_general_dilated`` whose operands and output gradient are quantized.

    The left operand (inputs) is the ``inputs`` role, the kernel the ``weights`` role.

    Attributes:
      config: the :class:`QuantConfig`.
      conv_general_dilated: the full-precision op that runs on the quantized operands.
    """

    conv_general_dilated: Callable[..., jax.Array] = lax.conv_general_dilated

    def __call__(self, lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        contract = conv_contraction(self.conv_general_dilated, *args, **kwargs)
        return self.quantized(contract, lhs, rhs, conv_call_axes(lhs, rhs, args, kwargs))


def quant_conv_cls(
    config: QuantConfig, conv_general_dilated: Callable[..., jax.Array] | None = None
) -> Callable[[], QuantConvGeneralDilated]:
    """What to pass as ``conv_general_dilated_cls`` of ``nn.Conv``; the child is named
    ``conv_general_dilated``, as the NNX layer's attribute, so state paths match."""
    return functools.partial(
        QuantConvGeneralDilated,
        config=config,
        conv_general_dilated=conv_general_dilated or lax.conv_general_dilated,
        name="conv_general_dilated",
    )


def is_quant_conv_cls(cls: Any) -> bool:
    """Whether ``cls`` is a factory made by :func:`quant_conv_cls`."""
    return getattr(cls, "func", None) is QuantConvGeneralDilated


class QuantConv(nn.Conv):
    """``nn.Conv`` with quantized inputs, kernel and output gradient; same ``params`` layout.

    A given ``conv_general_dilated`` is the full-precision op the quantized one wraps.

    Attributes:
      config: the :class:`QuantConfig` (all ``nn.Conv`` attributes apply as well).
    """

    config: QuantConfig = QuantConfig()

    def __post_init__(self) -> None:
        ours = is_quant_conv_cls(self.conv_general_dilated_cls)
        if self.conv_general_dilated_cls is not None and not ours:
            raise ValueError(
                "QuantConv builds its own conv_general_dilated_cls from config; pass "
                "conv_general_dilated= to wrap a custom op, or use "
                "nn.Conv(conv_general_dilated_cls=quant_conv_cls(config))"
            )
        if not ours:  # clones (Flax re-runs __post_init__) keep the one built the first time
            cls = quant_conv_cls(self.config, self.conv_general_dilated)
            object.__setattr__(self, "conv_general_dilated_cls", cls)
            object.__setattr__(self, "conv_general_dilated", None)
        super().__post_init__()
