"""Quantize an existing Linen model by path rules, through Flax's method interception.

Inside ``with quant_rules(rules):`` every ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum``
call is looked up by its module path ('/'-joined, e.g. ``"Block_0/attn/query"``); a matching
:class:`QuantConfig` swaps in the quantized version for that call, bound to the same scope, so
``params`` keep their paths and any checkpoint of the plain model still loads. A layer whose rule
gives ``None`` (or that already has its own ``dot_general``) runs the original method untouched,
bit-identical to plain Flax. Nothing in JAX or Flax is patched; the interceptor is active only
inside the ``with`` block (put it inside the jitted function, around ``init``/``apply``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn

from altgrad_jax.config import QuantConfig
from altgrad_jax.linen.modules import QuantEinsum, quant_dot_general_cls
from altgrad_jax.rules import PathRules

__all__ = ["quant_rules", "quantized_clone"]

_QUANTIZABLE = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def _einsum_fields(module: nn.Einsum) -> dict[str, Any]:
    return {
        f.name: getattr(module, f.name)
        for f in dataclasses.fields(nn.Einsum)
        if f.init and f.name not in ("parent", "name")
    }


def quantized_clone(module: nn.Module, config: QuantConfig) -> nn.Module:
    """A quantized copy of a bound ``Dense``/``DenseGeneral``/``Einsum`` on the same scope."""
    if isinstance(module, nn.Einsum):
        return QuantEinsum(**_einsum_fields(module), config=config, parent=module.scope)
    return module.clone(parent=module.scope, dot_general_cls=quant_dot_general_cls(config))


def _is_quantizable(module: nn.Module) -> bool:
    if not isinstance(module, _QUANTIZABLE) or isinstance(module, QuantEinsum):
        return False
    if isinstance(module, nn.Einsum):
        return True
    return module.dot_general is None and module.dot_general_cls is None


def quant_rules(rules: PathRules | Callable[[str], QuantConfig | None]):
    """Context manager quantizing the Dense/DenseGeneral/Einsum layers that ``rules`` select.

    Args:
      rules: :class:`PathRules` (or any callable) mapping a module path to a
        :class:`QuantConfig` or ``None`` (leave the layer alone). First match wins.

    Example::

        rules = PathRules((("head", None), ("attn", QuantConfig())), default=None)
        with quant_rules(rules):
            variables = model.init(key, x)
            y, state = model.apply(variables, x, mutable=["quant_state"])
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not _is_quantizable(module):
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        config = rules(path)
        if config is None:
            return next_fun(*args, **kwargs)
        if not isinstance(config, QuantConfig):
            raise TypeError(f"rules gave {config!r} for {path!r}; expected a QuantConfig or None")
        return quantized_clone(module, config)(*args, **kwargs)

    return nn.intercept_methods(interceptor)
