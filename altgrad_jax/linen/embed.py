"""A quantized Linen embedding: the table is the ``weights`` role of lookups and of ``attend``.

A lookup ``take(table, ids)`` is linear in the table, so it is a ``contract`` of the core with the
integer ids as the left operand (never quantized: the ``inputs`` role is dropped for lookups);
``attend`` (a tied output head, ``query @ table.T``) quantizes the query as ``inputs`` as well.
Both share one state under ``quant_state/<layer>/embed_op``, so the table has one amax history
(and an output-gradient history, delayed scaling, that both uses feed: an overestimate, as for
any layer applied twice in a step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from altgrad_jax.config import QuantConfig
from altgrad_jax.linen.modules import QuantDotGeneral
from altgrad_jax.quant_dot import ContractionAxes

__all__ = ["QuantEmbed", "attend_axes", "lookup_axes", "lookup_config"]

EMBED_OP = "embed_op"


def lookup_config(config: QuantConfig) -> QuantConfig:
    """The config of a lookup: ``config`` without the ``inputs`` role (the ids are integers)
    and without a Hadamard transform (it rotates the weight-gradient GEMM's operands; a
    lookup's weight gradient adds rows of dY, with no left operand to rotate)."""
    return dataclasses.replace(config, inputs=None, hadamard=None)


def lookup_axes(ids_ndim: int) -> ContractionAxes:
    """The axes block formats use for a lookup ``take(table, ids)``: the table blocks along its
    features (each row is read whole, so its blocks are those of the row), dY along the
    features for the (unused) ids gradient and along the tokens for the table's gradient."""
    return ContractionAxes((), (1,), tuple(range(ids_ndim)), (ids_ndim,))


def attend_axes(query_ndim: int) -> ContractionAxes:
    """The axes of ``attend``, ``query @ table.T``: a dot over the features."""
    return ContractionAxes.of_dot_general(query_ndim, 2, (((query_ndim - 1,), (1,)), ((), ())))


def lookup_contract(
    num_embeddings: int, features: int
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``(ids, table) -> rows``, as ``nn.Embed.__call__`` computes them."""

    def contract(ids: jax.Array, table: jax.Array) -> jax.Array:
        if num_embeddings == 1:
            return jnp.broadcast_to(table, (*ids.shape, features))
        return jnp.take(table, ids, axis=0)

    return contract


def attend_contract(query: jax.Array, table: jax.Array) -> jax.Array:
    """``query @ table.T``, as ``nn.Embed.attend`` computes it."""
    return jnp.dot(query, table.T)


def embed_lookup(module: nn.Embed, op: QuantDotGeneral, inputs: jax.Array) -> jax.Array:
    """``nn.Embed.__call__`` of ``module`` with the table quantized by ``op``."""
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
        raise ValueError("Input type must be an integer or unsigned integer.")
    (embedding,) = module.promote_dtype(module.embedding, dtype=module.dtype, inexact=False)
    contract = lookup_contract(module.num_embeddings, module.features)
    axes = lookup_axes(inputs.ndim)
    return op.quantized(contract, inputs, embedding, axes, config=lookup_config(op.config))


def embed_attend(module: nn.Embed, op: QuantDotGeneral, query: jax.Array) -> jax.Array:
    """``nn.Embed.attend`` of ``module`` with query and table quantized by ``op``."""
    query, embedding = module.promote_dtype(query, module.embedding, dtype=module.dtype)
    return op.quantized(attend_contract, query, embedding, attend_axes(query.ndim))


class QuantEmbed(nn.Embed):
    """``nn.Embed`` whose table is quantized (``weights``) for lookups and ``attend``.

    Same ``params`` layout as ``nn.Embed``; state under ``quant_state/<layer>/embed_op``.

    Attributes:
      config: the :class:`QuantConfig` (all ``nn.Embed`` attributes apply as well).
    """

    config: QuantConfig = QuantConfig()

    def setup(self) -> None:
        super().setup()
        self.embed_op = QuantDotGeneral(self.config)

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return embed_lookup(self, self.embed_op, inputs)

    def attend(self, query: jax.Array) -> jax.Array:
        return embed_attend(self, self.embed_op, query)
