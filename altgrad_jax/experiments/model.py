"""A small nanoGPT-style character transformer, written as plain Flax (nothing quantized here).

The sweep quantizes it from the outside with the library's own rules
(:func:`altgrad_jax.linen.quant_rules`), as a user would quantize their model: every ``nn.Dense``
(``qkv``, ``proj``, ``fc``, ``out``, ``head``) becomes a quantized matmul, while the embeddings,
attention scores, softmax, layer norm and residual sums stay in float32, as in FP8 training
practice (Micikevicius et al., 2022, "FP8 Formats for Deep Learning"). See
:func:`altgrad_jax.experiments.train.dense_rules`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from altgrad_jax._checks import check_positive_int

__all__ = ["LAYER_GROUPS", "CharTransformer", "ModelConfig", "layer_group"]

_INIT = nn.initializers.normal(0.02)

LAYER_GROUPS: tuple[str, ...] = ("embedding", "attention", "mlp", "head", "norm")
"""The parameter groups the sweep reports stall for, in model order."""
_GROUP_OF = {
    "embed": "embedding",
    "position": "embedding",
    "qkv": "attention",
    "proj": "attention",
    "fc": "mlp",
    "out": "mlp",
    "head": "head",
}


def layer_group(path: tuple[str, ...]) -> str:
    """The :data:`LAYER_GROUPS` entry of the parameter at ``path`` (e.g. ``("block_0", "qkv",
    "kernel")`` is "attention"); layer norms are "norm"."""
    for name in path:
        if name in _GROUP_OF:
            return _GROUP_OF[name]
        if name.startswith("ln_"):
            return "norm"
    raise ValueError(f"parameter path {'/'.join(path)!r} is in none of {LAYER_GROUPS}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Size of the character transformer."""

    vocab_size: int
    context: int = 64
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check_positive_int(field.name, getattr(self, field.name))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=_INIT, name=name)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP, each with a residual."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        batch, length, width = x.shape
        head_dim = width // cfg.n_heads
        qkv = _dense(3 * width, "qkv")(nn.LayerNorm(name="ln_attn")(x))
        qkv = qkv.reshape(batch, length, 3, cfg.n_heads, head_dim)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / jnp.sqrt(jnp.float32(head_dim))
        causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
        logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
        attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), value)
        x = x + _dense(width, "proj")(attended.reshape(batch, length, width))
        hidden = _dense(cfg.mlp_ratio * width, "fc")(nn.LayerNorm(name="ln_mlp")(x))
        return x + _dense(width, "out")(jax.nn.gelu(hidden))


class CharTransformer(nn.Module):
    """A nanoGPT-style character language model (token + position embeddings, blocks, head).

    ``__call__(tokens)`` maps int tokens ``[batch, length]`` to logits ``[batch, length, vocab]``.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        if tokens.shape[-1] > cfg.context:
            raise ValueError(f"sequence length {tokens.shape[-1]} exceeds context {cfg.context}")
        embed = self.param("embed", _INIT, (cfg.vocab_size, cfg.d_model), jnp.float32)
        position = self.param("position", _INIT, (cfg.context, cfg.d_model), jnp.float32)
        x = embed[tokens] + position[: tokens.shape[-1]]
        for i in range(cfg.n_layers):
            x = Block(cfg, name=f"block_{i}")(x)
        return _dense(cfg.vocab_size, "head")(nn.LayerNorm(name="ln_f")(x))
