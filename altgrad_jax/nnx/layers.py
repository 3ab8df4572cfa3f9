"""Quantized NNX convolutions, embeddings and attention matmuls, the same arithmetic as Linen's.

* :class:`QuantConv` is ``nnx.Conv`` with :class:`QuantConvOp` in its ``conv_general_dilated``
  hook, so Flax's ``__call__`` (padding modes, strides, dilations, groups, masks) runs unchanged.
* :class:`QuantEmbed` is ``nnx.Embed`` whose table is the ``weights`` role of lookups (the ids
  are never quantized) and of ``attend``; state under ``embed_op``.
* :class:`QuantAttention` is an ``attention_fn`` for ``nnx.MultiHeadAttention``: the two matmuls
  ``scores`` (q·kᵀ) and ``values`` (p·v) quantized, softmax in float32, masks, ``is_causal``,
  dropout and ``decode`` left to Flax.

State names equal Linen's (``<layer>/conv_general_dilated/inputs``, ``<layer>/embed_op/weights``,
``<attention>/attention_fn/scores/inputs``), so checkpoints map by path between the two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
from jax import lax

from altgrad_jax.config import QuantConfig
from altgrad_jax.linen.attention import dot_product_attention
from altgrad_jax.linen.conv import conv_call_axes, conv_contraction
from altgrad_jax.linen.embed import (
    attend_axes,
    attend_contract,
    lookup_axes,
    lookup_config,
    lookup_contract,
)
from altgrad_jax.nnx.modules import QuantDotGeneral, QuantEinsumOp, _QuantOp

__all__ = ["QuantAttention", "QuantConv", "QuantConvOp", "QuantEmbed"]


class QuantConvOp(_QuantOp):
    """A ``conv_general_dilated`` (``lax``'s signature) on quantized operands."""

    def __init__(
        self,
        config: QuantConfig | None = None,
        *,
        conv_general_dilated: Callable[..., jax.Array] = lax.conv_general_dilated,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        super().__init__(config, rngs)
        self.op = conv_general_dilated

    def __call__(self, lhs: jax.Array, rhs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        contract = conv_contraction(self.op, *args, **kwargs)
        return self._quantized(contract, lhs, rhs, conv_call_axes(lhs, rhs, args, kwargs))


class QuantConv(nnx.Conv):
    """``nnx.Conv`` with quantized inputs, kernel and output gradient.

    Args:
      in_features, out_features, kernel_size, **kwargs: as ``nnx.Conv`` (a given
        ``conv_general_dilated`` is the full-precision op the quantized one wraps).
      config: the :class:`QuantConfig` (default ``QuantConfig()``).
      rngs: parameter initialization, and the stochastic-rounding stream.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | tuple[int, ...],
        *,
        config: QuantConfig | None = None,
        conv_general_dilated: Callable[..., jax.Array] = lax.conv_general_dilated,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            kernel_size,
            conv_general_dilated=conv_general_dilated,
            rngs=rngs,
            **kwargs,
        )
        op = QuantConvOp(config, conv_general_dilated=conv_general_dilated, rngs=rngs)
        self.conv_general_dilated = nnx.data(op)

    @property
    def config(self) -> QuantConfig:
        return self.conv_general_dilated.config


def _no_sharding(out_sharding: Any) -> None:
    if out_sharding is not None:
        raise NotImplementedError("QuantEmbed does not support out_sharding yet")


class QuantEmbed(nnx.Embed):
    """``nnx.Embed`` whose table is quantized (``weights``) for lookups and ``attend``.

    Args:
      num_embeddings, features, **kwargs: as ``nnx.Embed``.
      config: the :class:`QuantConfig`; lookups ignore its ``inputs`` role (the ids).
      rngs: parameter initialization, and the stochastic-rounding stream.
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        config: QuantConfig | None = None,
        rngs: nnx.Rngs,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_embeddings, features, rngs=rngs, **kwargs)
        self.embed_op = QuantDotGeneral(config, rngs=rngs)

    @property
    def config(self) -> QuantConfig:
        return self.embed_op.config

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        _no_sharding(out_sharding)
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")
        (embedding,) = self.promote_dtype((self.embedding[...],), dtype=self.dtype, inexact=False)
        contract = lookup_contract(self.num_embeddings, self.features)
        op, axes = self.embed_op, lookup_axes(inputs.ndim)
        return op._quantized(contract, inputs, embedding, axes, config=lookup_config(op.config))

    def attend(self, query: jax.Array, out_sharding: Any = None) -> jax.Array:
        _no_sharding(out_sharding)
        query, embedding = self.promote_dtype((query, self.embedding[...]), dtype=self.dtype)
        return self.embed_op._quantized(attend_contract, query, embedding, attend_axes(query.ndim))


class QuantAttention(nnx.Module):
    """An ``attention_fn`` for ``nnx.MultiHeadAttention`` with quantized matmuls.

    Args:
      config: the :class:`QuantConfig` of both matmuls (each has its own state).
      rngs: the stochastic-rounding stream, if the config rounds stochastically.
    """

    def __init__(self, config: QuantConfig | None = None, *, rngs: nnx.Rngs | None = None):
        self.scores = QuantEinsumOp(config, rngs=rngs)
        self.values = QuantEinsumOp(config, rngs=rngs)

    @property
    def config(self) -> QuantConfig:
        return self.scores.config

    def __call__(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
        broadcast_dropout: bool = True,
        dropout_rng: jax.Array | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype: Any = None,
        precision: Any = None,
        module: nnx.Module | None = None,
        promote_dtype: Callable[..., Any] = nnx_dtypes.promote_dtype,
        is_causal: bool = False,
    ) -> jax.Array:
        sow = None
        if module is not None:
            sow = lambda w: module.sow(nnx.Intermediate, "attention_weights", w)  # noqa: E731

        def einsum(op: QuantEinsumOp) -> Callable[[str, jax.Array, jax.Array], jax.Array]:
            return lambda subscripts, lhs, rhs: op(subscripts, lhs, rhs, precision=precision)

        return dot_product_attention(
            query,
            key,
            value,
            bias,
            mask,
            broadcast_dropout,
            dropout_rng,
            dropout_rate,
            deterministic,
            dtype,
            scores=einsum(self.scores),
            values=einsum(self.values),
            promote=promote_dtype,
            sow=sow,
            is_causal=is_causal,
        )
