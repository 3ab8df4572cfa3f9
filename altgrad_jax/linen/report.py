"""What a model-wide rule set quantizes: rule lookup with reasons, and a printable report.

Shared by Linen and NNX. :func:`lookup` says, for one layer path, which config the rules give and
why a layer stays in full precision ("no rule matched" when no pattern matched and the default is
None, "rule gave None" when a pattern or a callable rule chose None). :class:`QuantReport` lists
every matmul-like layer (dense, einsum, convolution, attention, embedding) with its path, kind,
shapes and config or reason; patterns that matched no layer are listed in it and announced by an
:class:`UnmatchedRuleWarning` (a warning, not an error: a rule set shared across models may
legitimately name layers that one model lacks).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from altgrad_jax.config import QuantConfig, TensorQuant
from altgrad_jax.formats import FloatFormat
from altgrad_jax.rules import PathRules

__all__ = [
    "LayerReport",
    "QuantReport",
    "UnmatchedRuleWarning",
    "describe_config",
    "lookup",
]

NO_RULE = "no rule matched"
RULE_NONE = "rule gave None"
Rules = PathRules | Callable[[str], QuantConfig | None]


class UnmatchedRuleWarning(UserWarning):
    """Some patterns of a :class:`PathRules` matched no layer of the model."""


@dataclasses.dataclass(frozen=True)
class Lookup:
    """The outcome of the rules for one path: the config (or None), why, and which pattern."""

    config: QuantConfig | None
    reason: str
    pattern: str | None


def lookup(rules: Rules, path: str) -> Lookup:
    """The config ``rules`` give ``path``, with the reason when it is None.

    Raises:
      TypeError: the rule gave something other than a :class:`QuantConfig` or None.
    """
    if isinstance(rules, PathRules):
        pattern = next((p for p, _ in rules.rules if re.search(p, path)), None)
        value = rules.default if pattern is None else dict(rules.rules)[pattern]
        reason = NO_RULE if pattern is None else RULE_NONE
    else:
        pattern, value, reason = None, rules(path), RULE_NONE
    if value is not None and not isinstance(value, QuantConfig):
        raise TypeError(f"rules gave {value!r} for {path!r}; expected a QuantConfig or None")
    return Lookup(value, "" if value is not None else reason, pattern)


def _describe_role(tq: TensorQuant | None) -> str:
    if tq is None:
        return "-"
    name = tq.format.name if isinstance(tq.format, FloatFormat) else "traced"
    extras = [tq.scaling] if tq.scaling != "current" else []
    extras += [tq.rounding] if tq.rounding != "nearest" else []
    return name + (f"({','.join(extras)})" if extras else "")


def describe_config(config: QuantConfig) -> str:
    """``"in=E4M3 w=E4M3 grad=E5M2"`` (non-default scaling / rounding in parentheses)."""
    parts = (f"{short}={_describe_role(config.role(role))}" for short, role in _SHORT.items())
    return " ".join(parts) + (" +stats" if config.stats else "")


_SHORT = {"in": "inputs", "w": "weights", "grad": "output_grads"}


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One layer of a :class:`QuantReport`.

    Attributes:
      path: '/'-joined module path.
      kind: "dense", "dense_general", "einsum", "conv", "embed", "embed.attend", "attention",
        or the Flax class name of a layer the library cannot quantize.
      shapes: names to shapes (the input and parameters; Linen reports what the call saw).
      config: the :class:`QuantConfig` it runs with, or None.
      reason: why it is not quantized ("" when it is).
    """

    path: str
    kind: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    config: QuantConfig | None
    reason: str = ""

    @property
    def quantized(self) -> bool:
        return self.config is not None


@dataclasses.dataclass(frozen=True)
class QuantReport:
    """Every matmul-like layer of a model and what quantization it got; ``print`` it.

    Attributes:
      layers: one :class:`LayerReport` per layer (per method for embeddings), in call or graph
        order.
      unmatched_patterns: :class:`PathRules` patterns that matched no layer path.
    """

    layers: tuple[LayerReport, ...]
    unmatched_patterns: tuple[str, ...] = ()

    def __getitem__(self, path: str) -> LayerReport:
        for layer in self.layers:
            if layer.path == path:
                return layer
        raise KeyError(f"no layer {path!r}; layers: {[layer.path for layer in self.layers]}")

    @property
    def quantized(self) -> tuple[LayerReport, ...]:
        return tuple(layer for layer in self.layers if layer.quantized)

    def table(self) -> str:
        """The report as a fixed-width text table."""
        rows = [("path", "kind", "shapes", "quantization")]
        for layer in self.layers:
            shapes = " ".join(f"{name}{list(shape)}" for name, shape in layer.shapes)
            what = describe_config(layer.config) if layer.quantized else "not quantized: "
            rows.append((layer.path, layer.kind, shapes, what + layer.reason))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True))
            + "  "
            + row[3]
            for row in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        if self.unmatched_patterns:
            lines.append(f"patterns that matched no layer: {list(self.unmatched_patterns)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def unmatched_patterns(rules: Rules, paths: Iterable[str]) -> tuple[str, ...]:
    """The :class:`PathRules` patterns found in none of ``paths`` (callables: none)."""
    if not isinstance(rules, PathRules):
        return ()
    paths = list(paths)
    return tuple(p for p, _ in rules.rules if not any(re.search(p, path) for path in paths))


def warn_unmatched(patterns: tuple[str, ...], stacklevel: int = 3) -> None:
    """Emits an :class:`UnmatchedRuleWarning` naming ``patterns`` (if any)."""
    if patterns:
        warnings.warn(
            f"rule patterns {list(patterns)} matched no quantizable layer of the model",
            UnmatchedRuleWarning,
            stacklevel=stacklevel,
        )


def shapes_of(**arrays: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``(name, shape)`` pairs of the arguments that have a shape."""
    return tuple((name, tuple(a.shape)) for name, a in arrays.items() if hasattr(a, "shape"))
