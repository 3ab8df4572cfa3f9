"""Path rules: map parameter or module paths to values (formats, configs) by regular expression.

One rule style serves the Flax modules (module paths) and the optax wrappers (parameter paths):
an ordered tuple of ``(pattern, value)`` pairs, where the first pattern that ``re.search``-es the
'/'-joined path wins, as in optax's ``path_aware_map`` conventions and qwix's rules.

:func:`leaf_format` is the one per-leaf resolver of "which format does this leaf get" for the
stall counters, the optax transforms and anything else that walks a parameter tree, and
:func:`check_format_spec` validates such a spec (rules included) when a transform is built.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from altgrad_jax.formats import BlockFormat, FloatFormat, FormatLike, FormatParams, get_format

__all__ = ["FormatSpec", "PathRules", "check_format_spec", "leaf_format", "path_str"]

FormatSpec = FormatLike | Callable[..., Any]
"""One format for every leaf, or a rule ``(path, leaf) -> format | None`` such as ``PathRules``."""


def path_str(path: Sequence[Any] | str) -> str:
    """'/'-joins a JAX key path (``DictKey``, ``GetAttrKey``, ``SequenceKey``...) or names."""
    if isinstance(path, str):
        return path
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
            parts.append(str(entry.key))
        else:
            parts.append(str(entry))
    return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class PathRules:
    """Ordered ``(regex, value)`` rules; the first regex found in the path gives the value.

    Example::

        rules = PathRules((("attention", "E4M3"), ("head", None)), default="E5M2")
        rules("block_0/attention/query/kernel")  # -> "E4M3"

    Calling with ``(path, leaf)`` also works, so rules can be passed wherever a
    ``rule(path, leaf)`` callable is expected. Patterns are compiled (and checked) on creation.
    """

    rules: tuple[tuple[str, Any], ...] = ()
    default: Any = None

    def __post_init__(self) -> None:
        rules = tuple((pattern, value) for pattern, value in self.rules)
        for pattern, _ in rules:
            if not isinstance(pattern, str):
                raise TypeError(f"rule patterns must be strings, got {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"invalid rule pattern {pattern!r}: {err}") from None
        object.__setattr__(self, "rules", rules)

    def __call__(self, path: Sequence[Any] | str, leaf: Any = None) -> Any:
        name = path_str(path)
        for pattern, value in self.rules:
            if re.search(pattern, name):
                return value
        return self.default


def check_format_spec(spec: FormatSpec) -> FormatSpec:
    """Validates a per-leaf format spec when it is built; returns it with names resolved.

    For :class:`PathRules`, every rule value and the default must be a format, a format name,
    :class:`FormatParams` or None, so a typo fails at construction rather than at ``init``.
    """
    if isinstance(spec, (FloatFormat, BlockFormat, FormatParams)):
        return spec
    if isinstance(spec, str):
        return get_format(spec)
    if callable(spec):
        if isinstance(spec, PathRules):
            for value in (*(v for _, v in spec.rules), spec.default):
                if value is not None and not isinstance(value, FormatParams):
                    get_format(value)
        return spec
    raise TypeError(
        f"format must be a FloatFormat, a format name, FormatParams or a rule "
        f"(path, leaf) -> format | None such as PathRules; got {spec!r}"
    )


def leaf_format(spec: FormatSpec, path: Any, leaf: Any) -> FloatFormat | FormatParams | None:
    """The format of one leaf, or None when it is skipped (not floating point, or the rule
    gives None). Names are resolved; traced :class:`FormatParams` pass through."""
    if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
        return None
    if isinstance(spec, (FloatFormat, BlockFormat, FormatParams)):
        return spec
    value = get_format(spec) if isinstance(spec, str) else spec(path, leaf)
    if value is None or isinstance(value, (FloatFormat, BlockFormat, FormatParams)):
        return value
    return get_format(value)
