"""Path rules: map parameter or module paths to values (formats, configs) by regular expression.

One rule style serves the Flax modules (module paths) and the optax wrappers (parameter paths):
an ordered tuple of ``(pattern, value)`` pairs, where the first pattern that ``re.search``-es the
'/'-joined path wins, as in optax's ``path_aware_map`` conventions and qwix's rules.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax

__all__ = ["PathRules", "path_str"]


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
