"""Quantize an existing NNX model by path rules, and report what is quantized.

:func:`quantize_model` walks the model graph and, for every ``nnx.Linear``, ``nnx.LinearGeneral``,
``nnx.Einsum``, ``nnx.Conv``, ``nnx.Embed`` and (with ``attention=True``) ``nnx.MultiHeadAttention``
whose '/'-joined path (e.g. ``"blocks/0/attn/query"``) the rules give a :class:`QuantConfig`,
plugs the quantized op into Flax's own hook (``dot_general``, ``einsum_op``,
``conv_general_dilated``, ``attention_fn``) or, for ``nnx.Embed``, which has none, makes the layer
a :class:`~altgrad_jax.nnx.QuantEmbed`. Parameters keep their values (the same arrays) and paths;
the new state (:class:`~altgrad_jax.nnx.QuantState`) lives under the names Linen uses. The input
model is left unchanged (the result is a clone that shares its parameter arrays). A rule that
selects a layer the library cannot quantize (``nnx.ConvTranspose``, a custom ``attention_fn`` or
``dot_general_cls``) raises; :class:`PathRules` patterns that match no layer are announced by an
:class:`~altgrad_jax.linen.UnmatchedRuleWarning`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
from flax.nnx.nn.attention import dot_product_attention as nnx_attention
from jax import lax

from altgrad_jax.config import QuantConfig
from altgrad_jax.linen.report import (
    LayerReport,
    QuantReport,
    Rules,
    lookup,
    shapes_of,
    unmatched_patterns,
    warn_unmatched,
)
from altgrad_jax.linen.rules import ATTENTION_OPT_IN
from altgrad_jax.nnx.layers import QuantAttention, QuantConvOp, QuantEmbed
from altgrad_jax.nnx.modules import QuantDotGeneral, QuantEinsumOp
from altgrad_jax.rules import path_str

__all__ = ["quantization_report", "quantize_model"]

NO_RULES_GIVEN = "no rules given"


@dataclasses.dataclass(frozen=True)
class Layer:
    """A quantizable NNX layer: its kind, the hook attribute, its own config if already
    quantized, and why it cannot be quantized (``""`` when it can)."""

    kind: str
    hook: str = ""
    own_config: QuantConfig | None = None
    unsupported: str = ""


def _hooked(kind: str, module: nnx.Module, hook: str, ours: type) -> Layer:
    op = getattr(module, hook)
    if isinstance(op, ours):
        return Layer(kind, hook, op.config)
    if getattr(module, f"{hook}_cls", None) is not None:
        return Layer(kind, hook, None, f"it has its own {hook}_cls")
    return Layer(kind, hook)


def classify(module: Any) -> Layer | None:
    """The :class:`Layer` of ``module``, or None when it is not a matmul-like layer."""
    if isinstance(module, nnx.Embed):
        return Layer("embed", "", module.config if isinstance(module, QuantEmbed) else None)
    if isinstance(module, nnx.MultiHeadAttention):
        fn = module.attention_fn
        if isinstance(fn, QuantAttention):
            return Layer("attention", "attention_fn", fn.config)
        custom = "" if fn is nnx_attention else "it has its own attention_fn"
        return Layer("attention", "attention_fn", None, custom)
    if isinstance(module, nnx.ConvTranspose):
        return Layer(
            "ConvTranspose", "", None, "nnx.ConvTranspose calls lax.conv_transpose directly"
        )
    if isinstance(module, nnx.Conv):
        return _hooked("conv", module, "conv_general_dilated", QuantConvOp)
    if isinstance(module, nnx.Einsum):
        return _hooked("einsum", module, "einsum_op", QuantEinsumOp)
    if isinstance(module, nnx.LinearGeneral):
        return _hooked("linear_general", module, "dot_general", QuantDotGeneral)
    if isinstance(module, nnx.Linear):
        return _hooked("linear", module, "dot_general", QuantDotGeneral)
    return None


def _decide(
    layer: Layer, path: str, module: Any, rules: Rules | None, attention: bool
) -> tuple[QuantConfig | None, str]:
    """``(config, reason)`` for one layer; raises if the rules select an unsupported one."""
    if layer.own_config is not None:
        return layer.own_config, ""
    if layer.kind == "attention" and not attention:
        return None, ATTENTION_OPT_IN
    if rules is None:
        return None, NO_RULES_GIVEN
    found = lookup(rules, path)
    if found.config is not None and layer.unsupported:
        raise ValueError(
            f"the rules select {path!r} ({type(module).__name__}) for quantization, but "
            f"altgrad_jax cannot quantize it: {layer.unsupported}. Give it None (e.g. a first "
            f"rule ({path!r}, None)) to run it in full precision."
        )
    return found.config, found.reason


def _quantize_layer(module: Any, layer: Layer, config: QuantConfig, rngs: nnx.Rngs | None):
    """Plugs the quantized op into ``module`` (in place)."""
    if layer.kind == "embed":
        module.__class__ = QuantEmbed  # nnx.Embed has no hook; the subclass adds embed_op
        module.embed_op = QuantDotGeneral(config, rngs=rngs)
        return
    if layer.kind == "attention":
        module.attention_fn = nnx.data(QuantAttention(config, rngs=rngs))
        return
    if layer.kind == "conv":
        op = QuantConvOp(config, conv_general_dilated=module.conv_general_dilated, rngs=rngs)
    elif layer.kind == "einsum":
        op = QuantEinsumOp(config, einsum_op=module.einsum_op, rngs=rngs)
    else:
        dot_general = module.dot_general or lax.dot_general  # LinearGeneral's default: None
        op = QuantDotGeneral(config, dot_general=dot_general, rngs=rngs)
    setattr(module, layer.hook, nnx.data(op))


def _layers(model: nnx.Module) -> list[tuple[str, Any, Layer]]:
    found = []
    for path, module in nnx.iter_modules(model):
        layer = classify(module)
        if layer is not None:
            found.append((path_str(path), module, layer))
    return found


def quantize_model(
    model: nnx.Module,
    rules: Rules,
    *,
    attention: bool = False,
    rngs: nnx.Rngs | None = None,
    warn: bool = True,
) -> nnx.Module:
    """A copy of ``model`` whose layers selected by ``rules`` compute quantized.

    Args:
      model: any NNX model (left unchanged; the copy shares its parameter arrays).
      rules: :class:`PathRules` (or any callable) mapping a '/'-joined module path to a
        :class:`QuantConfig` or None (leave the layer alone). First match wins.
      attention: also quantize the two matmuls inside ``nnx.MultiHeadAttention`` layers the
        rules select (opt-in; their projections are ``LinearGeneral`` layers selected by their
        own paths either way).
      rngs: the ``config.rng_stream`` stream, needed when a config rounds stochastically.
      warn: emit an ``UnmatchedRuleWarning`` for patterns that matched no layer.

    Returns:
      The quantized model; train it with :func:`altgrad_jax.nnx.quant_value_and_grad` (plain
      ``nnx.grad`` raises for delayed output-gradient scaling, whose history it would drop).

    Raises:
      ValueError: a rule selects a layer the library cannot quantize.
    """
    model = nnx.clone(model)
    layers = _layers(model)
    for path, module, layer in layers:
        config, _ = _decide(layer, path, module, rules, attention)
        if config is not None and layer.own_config is None:
            _quantize_layer(module, layer, config, rngs)
    if warn:
        warn_unmatched(unmatched_patterns(rules, (path for path, _, _ in layers)))
    return model


def _param_shapes(module: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    params = {k: v[...] for k, v in vars(module).items() if isinstance(v, nnx.Param)}
    return shapes_of(**params)


def quantization_report(
    model: nnx.Module,
    rules: Rules | None = None,
    *,
    attention: bool = False,
    warn: bool = True,
) -> QuantReport:
    """Every linear, einsum, convolution, attention and embedding layer of ``model``: its path,
    kind, parameter shapes and config, or "not quantized" and why.

    Args:
      model: an NNX model, quantized (by :func:`quantize_model` or by hand) or not.
      rules, attention: those given to :func:`quantize_model`, so that the report can say why a
        layer is not quantized ("no rule matched", "rule gave None"); without them the reason
        is "no rules given".
      warn: emit an ``UnmatchedRuleWarning`` for patterns that matched no layer.
    """
    rows = []
    layers = _layers(model)
    for path, module, layer in layers:
        config, reason = _decide(layer, path, module, rules, attention)
        if config is not None and layer.own_config is None:
            config, reason = None, "selected by the rules; quantize_model was not applied"
        rows.append(LayerReport(path, layer.kind, _param_shapes(module), config, reason))
    unmatched = () if rules is None else unmatched_patterns(rules, (p for p, _, _ in layers))
    if warn:
        warn_unmatched(unmatched)
    return QuantReport(tuple(rows), unmatched)
