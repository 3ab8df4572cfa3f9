"""Quantize an existing Linen model by path rules, through Flax's method interception.

Inside ``with quant_rules(rules):`` every call of a Dense, DenseGeneral, Einsum, Conv, Embed
(lookups and ``attend``) and, with ``attention=True``, MultiHeadDotProductAttention (its two
matmuls) is looked up by its module path ('/'-joined, e.g. ``"Block_0/attn/query"``); a matching
:class:`QuantConfig` swaps in the quantized version for that call, bound to the same scope, so
``params`` keep their paths and any checkpoint of the plain model still loads. A layer whose rule
gives ``None`` runs the original method untouched, bit-identical to plain Flax. A rule that
selects a layer the library cannot quantize (``nn.ConvTranspose``, ``nn.ConvLocal``, a layer with
its own ``*_cls`` op or ``attention_fn``) raises instead of leaving it in full precision.

**jit caveat.** The context manager acts while a function is *traced*: ``jax.jit`` caches the
traced program by the function and its arguments, not by the interceptors active at call time.
A jitted function first traced outside the ``with`` block is never quantized, and one traced
inside stays quantized when later called outside it. Either put the ``with`` block inside the
jitted function, or use :func:`quantize_model`, whose ``init``/``apply`` always apply the rules
(the rules are part of the module, so jit caches the quantized program under its own key).
Nothing in JAX or Flax is patched.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from flax.linen.attention import dot_product_attention as flax_attention

from altgrad_jax.config import QuantConfig
from altgrad_jax.linen.attention import QuantAttention
from altgrad_jax.linen.conv import is_quant_conv_cls, quant_conv_cls
from altgrad_jax.linen.embed import (
    EMBED_OP,
    QuantEmbed,
    embed_attend,
    embed_lookup,
    lookup_config,
)
from altgrad_jax.linen.modules import QuantDotGeneral, QuantEinsum, quant_dot_general_cls
from altgrad_jax.linen.report import (
    LayerReport,
    QuantReport,
    Rules,
    lookup,
    shapes_of,
    unmatched_patterns,
    warn_unmatched,
)

__all__ = ["quant_rules", "quantization_report", "quantize_model", "quantized_clone"]

ATTENTION_OPT_IN = "attention matmuls are opt-in (attention=True)"


def _einsum_fields(module: nn.Einsum) -> dict[str, Any]:
    return {
        f.name: getattr(module, f.name)
        for f in dataclasses.fields(nn.Einsum)
        if f.init and f.name not in ("parent", "name")
    }


def _ours(cls: Any) -> QuantConfig | None:
    """The config of a ``dot_general_cls`` / ``conv_general_dilated_cls`` made by this library."""
    if getattr(cls, "func", None) is QuantDotGeneral or is_quant_conv_cls(cls):
        return cls.keywords["config"]
    return None


@dataclasses.dataclass(frozen=True)
class Layer:
    """What the rules see of one module call: its kind, its own config if it is already
    quantized, and why it cannot be quantized (``""`` when it can)."""

    kind: str
    own_config: QuantConfig | None = None
    unsupported: str = ""


def classify(module: nn.Module, method: str) -> Layer | None:
    """The :class:`Layer` of ``module.method``, or None when it is not a matmul-like layer."""
    if isinstance(module, nn.Embed) and method in ("__call__", "attend"):
        kind = "embed" if method == "__call__" else "embed.attend"
        return Layer(kind, module.config if isinstance(module, QuantEmbed) else None)
    if method != "__call__":
        return None
    if isinstance(module, nn.MultiHeadDotProductAttention):
        fn = module.attention_fn
        if isinstance(fn, QuantAttention):
            return Layer("attention", fn.config)
        custom = fn is not flax_attention or module.qk_attn_weights_einsum_cls is not None
        custom = custom or module.attn_weights_value_einsum_cls is not None
        return Layer("attention", None, "it has its own attention_fn or einsum" if custom else "")
    if isinstance(module, nn.ConvLocal):
        return Layer("ConvLocal", None, "nn.ConvLocal has no hook for its local convolution")
    if isinstance(module, nn.ConvTranspose):
        return Layer(
            "ConvTranspose", None, "nn.ConvTranspose calls lax.conv_transpose directly (no hook)"
        )
    if isinstance(module, nn.Conv):
        cls = module.conv_general_dilated_cls
        own = _ours(cls)
        return Layer("conv", own, "" if own or cls is None else "it has its own *_cls op")
    if isinstance(module, nn.Einsum):
        return Layer("einsum", module.config if isinstance(module, QuantEinsum) else None)
    if isinstance(module, (nn.Dense, nn.DenseGeneral)):
        kind = "dense" if isinstance(module, nn.Dense) else "dense_general"
        cls = module.dot_general_cls
        own = _ours(cls)
        return Layer(kind, own, "" if own or cls is None else "it has its own *_cls op")
    return None


def quantized_call(
    module: nn.Module, method: str, config: QuantConfig, args: tuple, kwargs: dict
) -> Any:
    """``module.method(*args, **kwargs)`` quantized by ``config``, on the module's own scope."""
    scope = module.scope
    if isinstance(module, nn.Embed):
        op = QuantDotGeneral(config, parent=scope.push(EMBED_OP, reuse=True))
        call = embed_lookup if method == "__call__" else embed_attend
        return call(module, op, *args, **kwargs)
    if isinstance(module, nn.MultiHeadDotProductAttention):
        # Flax adopts the unbound QuantAttention as the child "attention_fn" (state paths
        # <attention>/attention_fn/scores/...); its softmax is float32 whatever the dtype.
        clone = module.clone(parent=scope, attention_fn=QuantAttention(config, parent=None))
    elif isinstance(module, nn.Conv):
        cls = quant_conv_cls(config, module.conv_general_dilated)
        clone = module.clone(parent=scope, conv_general_dilated_cls=cls, conv_general_dilated=None)
    elif isinstance(module, nn.Einsum):
        clone = QuantEinsum(**_einsum_fields(module), config=config, parent=scope)
    else:
        cls = quant_dot_general_cls(config, module.dot_general)
        clone = module.clone(parent=scope, dot_general_cls=cls, dot_general=None)
    return clone(*args, **kwargs)


def quantized_clone(module: nn.Module, config: QuantConfig) -> nn.Module:
    """A quantized copy of a bound ``Dense``/``DenseGeneral``/``Einsum``/``Conv`` on the same
    scope (kept for callers of the earlier API; :func:`quant_rules` covers every kind)."""
    if isinstance(module, nn.Einsum):
        return QuantEinsum(**_einsum_fields(module), config=config, parent=module.scope)
    if isinstance(module, nn.Conv):
        cls = quant_conv_cls(config, module.conv_general_dilated)
        return module.clone(
            parent=module.scope, conv_general_dilated_cls=cls, conv_general_dilated=None
        )
    cls = quant_dot_general_cls(config, module.dot_general)
    return module.clone(parent=module.scope, dot_general_cls=cls, dot_general=None)


def _param_shapes(module: nn.Module, args: tuple) -> tuple[tuple[str, tuple[int, ...]], ...]:
    params = module.variables.get("params", {}) if module.scope is not None else {}
    arrays = {k: v for k, v in params.items() if hasattr(v, "shape")}
    return shapes_of(input=args[0] if args else None, **arrays)


def _interceptor(
    rules: Rules, attention: bool, record: Callable[[LayerReport], None] | None
) -> Callable[..., Any]:
    def interceptor(next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        layer = classify(module, method)
        if layer is None:
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        if layer.own_config is not None:
            config, reason = layer.own_config, ""
        elif layer.kind == "attention" and not attention:
            config, reason = None, ATTENTION_OPT_IN
        else:
            found = lookup(rules, path)
            config, reason = found.config, found.reason
            if config is not None and layer.unsupported:
                raise ValueError(
                    f"the rules select {path!r} ({type(module).__name__}) for quantization, "
                    f"but altgrad_jax cannot quantize it: {layer.unsupported}. Give it None "
                    f"(e.g. a first rule ({path!r}, None)) to run it in full precision."
                )
        if config is None or layer.own_config is not None:
            out = next_fun(*args, **kwargs)
        else:
            out = quantized_call(module, method, config, args, kwargs)
        if record is not None:
            shapes = _param_shapes(module, args)
            if config is not None and layer.kind == "embed":
                config = lookup_config(config)  # what a lookup runs with: ids are not quantized
            record(LayerReport(path, layer.kind, shapes, config, reason))
        return out

    return interceptor


def quant_rules(rules: Rules, *, attention: bool = False, _record=None):
    """Context manager quantizing the layers that ``rules`` select, while a function is traced.

    Args:
      rules: :class:`PathRules` (or any callable) mapping a module path to a
        :class:`QuantConfig` or ``None`` (leave the layer alone). First match wins.
      attention: also quantize the two matmuls inside every selected
        ``nn.MultiHeadDotProductAttention`` (opt-in; its projections are Dense layers that the
        rules select by their own paths either way).

    See the module docstring for the jit caveat: put the block inside the jitted function, or
    use :func:`quantize_model`.

    Example::

        rules = PathRules((("head", None), ("attn", QuantConfig())), default=None)
        with quant_rules(rules):
            variables = model.init(key, x)
            y, state = model.apply(variables, x, mutable=["quant_state"])
    """
    return nn.intercept_methods(_interceptor(rules, attention, _record))


@dataclasses.dataclass(frozen=True)
class ModelRules:
    """The rules a :func:`quantize_model` module applies (hashable when ``rules`` is)."""

    rules: Rules
    attention: bool = False


_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("altgrad_model_rules", default=None)


def _with_rules(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        model_rules = self.altgrad_rules
        if _ACTIVE.get() is model_rules:  # init calls init_with_output: apply the rules once
            return method(self, *args, **kwargs)
        token = _ACTIVE.set(model_rules)
        try:
            with quant_rules(model_rules.rules, attention=model_rules.attention):
                return method(self, *args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    return wrapped


@functools.cache
def _quantized_class(cls: type[nn.Module]) -> type[nn.Module]:
    namespace = {
        "__annotations__": {"altgrad_rules": ModelRules},
        "altgrad_rules": None,
        "__module__": cls.__module__,
        **{name: _with_rules(getattr(cls, name)) for name in _ENTRY_POINTS},
    }
    return type(f"Quantized{cls.__name__}", (cls,), namespace)


_ENTRY_POINTS = ("init", "init_with_output", "apply", "lazy_init")


def quantize_model(module: nn.Module, rules: Rules, *, attention: bool = False) -> nn.Module:
    """``module`` as a module whose ``init``/``apply`` always run under ``quant_rules(rules)``.

    The returned module is an instance of a subclass of ``type(module)`` with the same fields
    (so the same ``params`` tree and paths) plus ``altgrad_rules``; it compares unequal to the
    plain module, so ``jax.jit`` never confuses the quantized and the plain program.

    Args:
      module: a top-level (unbound) Linen module.
      rules, attention: as for :func:`quant_rules`.
    """
    if module.scope is not None or module.parent is not None:
        raise ValueError("quantize_model takes a top-level, unbound module (as passed to init)")
    if isinstance(getattr(module, "altgrad_rules", None), ModelRules):
        raise ValueError("this module is already the result of quantize_model")
    fields = {
        f.name: getattr(module, f.name)
        for f in dataclasses.fields(module)
        if f.init and f.name != "parent"
    }
    return _quantized_class(type(module))(**fields, altgrad_rules=ModelRules(rules, attention))


def quantization_report(
    model: nn.Module,
    *args: Any,
    rules: Rules | None = None,
    attention: bool = False,
    rngs: Any = None,
    warn: bool = True,
    **kwargs: Any,
) -> QuantReport:
    """What ``rules`` quantize in ``model.init(rngs, *args, **kwargs)`` (shapes only: nothing
    is computed, ``jax.eval_shape``).

    Args:
      model: a Linen module; a :func:`quantize_model` module brings its own rules.
      *args, **kwargs: the inputs of ``init``.
      rules, attention: as for :func:`quant_rules` (required unless ``model`` has its own).
      rngs: the ``init`` RNGs (default: ``params`` and ``dropout`` keys from seed 0).
      warn: emit an :class:`UnmatchedRuleWarning` for patterns that matched no layer.

    Returns:
      A :class:`QuantReport`: every Dense, DenseGeneral, Einsum, Conv, ConvTranspose,
      ConvLocal, Embed and attention call (deduplicated by path and kind), quantized or not and
      why. Matmuls written directly with ``jnp``/``lax`` inside a module's body are not layers:
      neither the rules nor the report see them.

    Raises:
      ValueError: a rule selects a layer the library cannot quantize (as ``init`` would).
    """
    model_rules = getattr(model, "altgrad_rules", None)
    if isinstance(model_rules, ModelRules):
        rules, attention = model_rules.rules, model_rules.attention
    if rules is None:
        raise ValueError("quantization_report needs rules= (or a quantize_model module)")
    if rngs is None:
        rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    layers: dict[tuple[str, str], LayerReport] = {}

    def record(layer: LayerReport) -> None:
        layers.setdefault((layer.path, layer.kind), layer)

    def init():
        token = _ACTIVE.set(model_rules)  # a quantize_model module: its own rules are these
        try:
            with quant_rules(rules, attention=attention, _record=record):
                return model.init(rngs, *args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    jax.eval_shape(init)
    unmatched = unmatched_patterns(rules, (path for path, _ in layers))
    if warn:
        warn_unmatched(unmatched)
    return QuantReport(tuple(layers.values()), unmatched)
