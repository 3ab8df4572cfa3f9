"""Quantized attention matmuls (scores ``q·kᵀ`` and weighted sum ``p·v``) for Flax's modules.

Flax's ``MultiHeadDotProductAttention`` (Linen) and ``MultiHeadAttention`` (NNX) take an
``attention_fn``; :class:`QuantAttention` is one, so the projections, masking, ``decode`` caches
and dropout stay Flax's. Inside, the two batched matmuls are contractions of the core
(:func:`altgrad_jax.quant_dot.quantized_contract`) named ``scores`` (inputs: q, weights: k) and
``values`` (inputs: the probabilities, weights: v), each with its own state, so a path reads
``<attention>/attention_fn/scores/inputs`` in Linen and NNX alike. The softmax runs in float32
whatever the compute dtype (FP8 attention recipes keep it there), and its result is cast back.

:func:`dot_product_attention` is the framework-neutral body, written after Flax's own (bias,
boolean mask, ``is_causal``, grouped-query heads, broadcast dropout, ``attention_weights``
sowing), with the two einsums passed in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype as linen_promote_dtype

from altgrad_jax.config import QuantConfig
from altgrad_jax.linen.modules import QuantDotGeneral, contraction
from altgrad_jax.quant_dot import ContractionAxes

__all__ = ["QuantAttention", "dot_product_attention"]

Einsum = Callable[[str, jax.Array, jax.Array], jax.Array]


def _causal_mask(shape: Sequence[int], dtype: Any) -> jax.Array:
    q_len, k_len = shape[-2:]
    return jnp.broadcast_to(jnp.tril(jnp.ones((q_len, k_len), dtype)), shape)


def dot_product_attention(
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
    *,
    scores: Einsum,
    values: Einsum,
    promote: Callable[..., tuple[jax.Array, ...]],
    sow: Callable[[jax.Array], None] | None = None,
    is_causal: bool = False,
) -> jax.Array:
    """Dot-product attention with the two matmuls given as ``(subscripts, lhs, rhs)`` einsums.

    Args:
      query, key, value: ``[batch..., length, heads, depth]`` (key/value heads may divide the
        query heads: grouped-query attention).
      bias, mask, broadcast_dropout, dropout_rng, dropout_rate, deterministic, dtype: as in
        Flax's ``dot_product_attention``; ``mask`` is True where attention is allowed.
      scores, values: the einsums of ``q·kᵀ`` and ``p·v``.
      promote: ``promote((q, k, v), dtype=...)`` -> the promoted arrays.
      sow: called with the attention weights (after softmax, before dropout), if given.
      is_causal: add a causal mask (NNX's flag).

    Returns:
      ``[batch..., q_length, heads, v_depth]``.
    """
    query, key, value = promote((query, key, value), dtype=dtype)
    dtype = query.dtype
    q_heads, k_heads = query.shape[-2], key.shape[-2]
    grouped = q_heads != k_heads
    if grouped:
        if q_heads % k_heads:
            raise ValueError(f"query heads ({q_heads}) must be a multiple of key heads ({k_heads})")
        query = query.reshape((*query.shape[:-2], k_heads, q_heads // k_heads, query.shape[-1]))
        key = jnp.expand_dims(key, -2)
        value = jnp.expand_dims(value, -2)
        score_str, value_str = "...qhgd,...kh1d->...hgqk", "...hgqk,...kh1d->...qhgd"
    else:
        score_str, value_str = "...qhd,...khd->...hqk", "...hqk,...khd->...qhd"
    query = query / jnp.sqrt(query.shape[-1]).astype(dtype)
    weights = scores(score_str, query, key)
    if grouped:  # back to [..., q_heads, q, k] for bias, masks, softmax and dropout
        weights = weights.reshape((*weights.shape[:-4], q_heads, *weights.shape[-2:]))
    if bias is not None:
        weights = weights + bias
    masks = [] if mask is None else [mask.astype(bool)]
    if is_causal:
        masks.append(_causal_mask(weights.shape, bool))
    if masks:
        allowed = functools.reduce(jnp.logical_and, masks)
        weights = jnp.where(allowed, weights, jnp.finfo(dtype).min)
    weights = jax.nn.softmax(weights.astype(jnp.float32)).astype(dtype)
    if sow is not None:
        sow(weights)
    if not deterministic and dropout_rate > 0.0:
        keep_prob = 1.0 - dropout_rate
        shape = weights.shape
        if broadcast_dropout:
            shape = (1,) * (weights.ndim - 2) + weights.shape[-2:]
        keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
        weights = weights * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype))
    if grouped:
        weights = weights.reshape(
            (*weights.shape[:-3], k_heads, q_heads // k_heads, *weights.shape[-2:])
        )
    out = values(value_str, weights, value)
    if grouped:
        out = out.reshape((*out.shape[:-3], q_heads, out.shape[-1]))
    return out


def einsum_with(op: Any, precision: Any) -> Einsum:
    """An einsum ``(subscripts, lhs, rhs)`` running on ``op.quantized`` (Linen) or ``op``."""

    def einsum(subscripts: str, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        contract = contraction(jnp.einsum, subscripts, precision=precision)
        axes = functools.partial(ContractionAxes.of_einsum, subscripts, lhs.ndim, rhs.ndim)
        return op.quantized(contract, lhs, rhs, axes)

    return einsum


class QuantAttention(nn.Module):
    """An ``attention_fn`` for ``nn.MultiHeadDotProductAttention`` with quantized matmuls.

    Pass it as ``attention_fn=QuantAttention(config, parent=None)``: Flax then adopts it as the
    child ``attention_fn`` of the attention module.

    Attributes:
      config: the :class:`QuantConfig` of both matmuls (each has its own state).
    """

    config: QuantConfig = QuantConfig()

    @nn.compact
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
        module: nn.Module | None = None,
    ) -> jax.Array:
        scores = QuantDotGeneral(self.config, name="scores")
        values = QuantDotGeneral(self.config, name="values")
        sow = None
        if module is not None:
            sow = lambda w: module.sow("intermediates", "attention_weights", w)  # noqa: E731
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
            scores=einsum_with(scores, precision),
            values=einsum_with(values, precision),
            promote=lambda arrays, dtype: linen_promote_dtype(*arrays, dtype=dtype),
            sow=sow,
        )
