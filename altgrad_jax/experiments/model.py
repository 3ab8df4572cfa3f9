"""A small nanoGPT-style character transformer whose dense layers compute in a simulated format.

Every dense layer quantizes its input (activations) and kernel (weights) with current per-tensor
scaling, ``quantize(x, fmt, compute_scale(max|x|, fmt))``, and quantizes the gradient of its output
in the backward pass the same way. Attention scores, softmax, layer norm and residual sums stay in
float32, as in FP8 training practice (Micikevicius et al., 2022, "FP8 Formats for Deep Learning").

The format is an argument of ``__call__``, not a module attribute: a :class:`FloatFormat` makes a
static program, a :class:`FormatParams` of arrays a traced one, so one compiled train step serves
every format. Quantization statistics (how much underflowed to zero or saturated) are sown into the
``"qstats"`` collection for the forward pass; the backward pass's statistics travel out as the
cotangent of a zero "probe" vector (see :func:`quantize_cotangent`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from altgrad_jax.formats import FloatFormat, FormatParams
from altgrad_jax.quantize import quantize
from altgrad_jax.scaling import compute_scale

__all__ = [
    "NUM_STATS",
    "CharTransformer",
    "ModelConfig",
    "Quant",
    "quantize_cotangent",
    "quantize_with_stats",
    "tensor_stats",
]

Fmt = FloatFormat | FormatParams

# A statistics vector holds counts: [entries, nonzero entries, underflowed to 0, saturated].
NUM_STATS = 4


def tensor_stats(x: jax.Array, q: jax.Array, scale: jax.Array, fmt: Fmt) -> jax.Array:
    """Counts for one quantized tensor: ``[entries, nonzero, underflowed, saturated]``, float32.

    An entry underflowed when it was nonzero and quantized to zero; it saturated when
    ``|x / scale|`` exceeded the format's largest value (so it was clipped).
    """
    x = jax.lax.stop_gradient(x).astype(jnp.float32)
    nonzero = x != 0
    underflow = nonzero & (q == 0)
    saturated = jnp.abs(x / scale) > fmt.max_value
    return jnp.stack(
        [
            jnp.float32(x.size),
            jnp.sum(nonzero, dtype=jnp.float32),
            jnp.sum(underflow, dtype=jnp.float32),
            jnp.sum(saturated, dtype=jnp.float32),
        ]
    )


def quantize_with_stats(x: jax.Array, fmt: Fmt) -> tuple[jax.Array, jax.Array]:
    """Quantizes ``x`` with current per-tensor scaling; returns it and its :func:`tensor_stats`."""
    scale = compute_scale(jnp.max(jnp.abs(jax.lax.stop_gradient(x))), fmt)
    q = quantize(x, fmt, scale)
    return q, tensor_stats(x, q, scale, fmt)


@jax.custom_vjp
def _cotangent_traced(y: jax.Array, fmt: FormatParams, probe: jax.Array) -> jax.Array:
    return y


def _cotangent_traced_fwd(y, fmt, probe):
    return y, fmt


def _cotangent_traced_bwd(fmt, g):
    q, stats = quantize_with_stats(g, fmt)
    return q, None, stats


_cotangent_traced.defvjp(_cotangent_traced_fwd, _cotangent_traced_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _cotangent_static(y: jax.Array, fmt: FloatFormat, probe: jax.Array) -> jax.Array:
    return y


def _cotangent_static_fwd(y, fmt, probe):
    return y, None


def _cotangent_static_bwd(fmt, _residual, g):
    q, stats = quantize_with_stats(g, fmt)
    return q, stats


_cotangent_static.defvjp(_cotangent_static_fwd, _cotangent_static_bwd)


def quantize_cotangent(y: jax.Array, fmt: Fmt, probe: jax.Array) -> jax.Array:
    """Identity forward; the backward pass quantizes the cotangent of ``y`` (current scaling).

    ``probe`` is a float32 ``[NUM_STATS]`` zero vector: its gradient receives the statistics of
    the quantized cotangent, summed over every call that shares it. This is how the backward
    pass's statistics leave ``jax.grad`` functionally.
    """
    if isinstance(fmt, FormatParams):
        return _cotangent_traced(y, fmt, probe)
    return _cotangent_static(y, fmt, probe)


class Quant(NamedTuple):
    """What a forward pass quantizes: the format, the gradient probe, and whether weights count.

    Attributes:
      fmt: a static :class:`FloatFormat` or traced :class:`FormatParams`.
      probe: float32 ``[NUM_STATS]`` zeros; differentiate with respect to it to read the
        gradient statistics.
      weights: quantize kernels in the forward pass; False when the stored weights already lie
        on the format's grid (low-precision storage), so they are not rounded twice.
    """

    fmt: Fmt
    probe: jax.Array
    weights: bool = True


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
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field.name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")


class QDense(nn.Module):
    """``x @ kernel + bias``; with ``q``, input, kernel and output gradient are quantized."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, q: Quant | None) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        if q is not None:
            x, stats = quantize_with_stats(x, q.fmt)
            self.sow("qstats", "activations", stats)
            if q.weights:
                kernel, stats = quantize_with_stats(kernel, q.fmt)
                self.sow("qstats", "weights", stats)
        y = x @ kernel
        if q is not None:
            y = quantize_cotangent(y, q.fmt, q.probe)
        return y + bias


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP, each with a residual."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, q: Quant | None) -> jax.Array:
        cfg = self.config
        batch, length, width = x.shape
        head_dim = width // cfg.n_heads
        qkv = QDense(3 * width, name="qkv")(nn.LayerNorm(name="ln_attn")(x), q)
        qkv = qkv.reshape(batch, length, 3, cfg.n_heads, head_dim)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / jnp.sqrt(jnp.float32(head_dim))
        causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
        logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
        attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), value)
        x = x + QDense(width, name="proj")(attended.reshape(batch, length, width), q)
        hidden = QDense(cfg.mlp_ratio * width, name="fc")(nn.LayerNorm(name="ln_mlp")(x), q)
        return x + QDense(width, name="out")(jax.nn.gelu(hidden), q)


class CharTransformer(nn.Module):
    """A nanoGPT-style character language model (token + position embeddings, blocks, head).

    ``__call__(tokens, q)`` maps int tokens ``[batch, length]`` to logits
    ``[batch, length, vocab]``; ``q=None`` runs in float32.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, q: Quant | None = None) -> jax.Array:
        cfg = self.config
        if tokens.shape[-1] > cfg.context:
            raise ValueError(f"sequence length {tokens.shape[-1]} exceeds context {cfg.context}")
        init = nn.initializers.normal(0.02)
        embed = self.param("embed", init, (cfg.vocab_size, cfg.d_model), jnp.float32)
        position = self.param("position", init, (cfg.context, cfg.d_model), jnp.float32)
        if q is not None and q.weights:
            embed, stats = quantize_with_stats(embed, q.fmt)
            self.sow("qstats", "weights", stats)
        x = embed[tokens] + position[: tokens.shape[-1]]
        for i in range(cfg.n_layers):
            x = Block(cfg, name=f"block_{i}")(x, q)
        return QDense(cfg.vocab_size, name="head")(nn.LayerNorm(name="ln_f")(x), q)
