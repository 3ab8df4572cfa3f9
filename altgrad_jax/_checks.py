"""The shared argument checkers: one place for every "is this a valid choice / count / number".

Each checker returns the (normalised) value or raises with a message that names the argument,
the bad value and what would be valid, so constructors and trace-time checks all read alike.
Choice tuples come from ``Literal`` types through :func:`choices_of`, so a type and its runtime
check cannot drift apart.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from typing import Any

__all__ = [
    "check_bool",
    "check_choice",
    "check_choices",
    "check_int",
    "check_optional_positive_float",
    "check_positive_float",
    "check_positive_int",
    "check_str",
    "choices_of",
]


def choices_of(literal: Any) -> tuple[Any, ...]:
    """The values of a ``Literal[...]`` type, in order."""
    values = typing.get_args(literal)
    if not values:
        raise TypeError(f"{literal!r} is not a Literal type")
    return values


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``; ``ValueError`` naming both otherwise."""
    if isinstance(value, str) and value in choices:
        return value
    if not isinstance(value, str) and any(value is c or value == c for c in choices):
        return value
    listed = ", ".join(repr(c) for c in choices)
    raise ValueError(f"unknown {name} {value!r}; expected one of {listed}")


def check_positive_int(name: str, value: Any, *, maximum: int | None = None) -> int:
    """``value`` as an int if it is an integer >= 1 (and <= ``maximum``); bools are rejected."""
    is_int = isinstance(value, int) or type(value).__name__.startswith(("int", "uint"))
    if isinstance(value, bool) or not is_int or int(value) < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if maximum is not None and int(value) > maximum:
        raise ValueError(f"{name} must be a positive int <= {maximum}, got {value!r}")
    return int(value)


def check_int(name: str, value: Any) -> int:
    """``value`` if it is an integer of any sign (a seed); bools are rejected."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return value


def check_choices(name: str, values: Any, choices: Sequence[Any]) -> tuple[Any, ...]:
    """``values`` as a tuple, each checked by :func:`check_choice`."""
    return tuple(check_choice(name, value, choices) for value in values)


def check_optional_positive_float(name: str, value: Any) -> float | None:
    """None, or ``value`` as a positive finite float (a threshold that has a computed default)."""
    return None if value is None else check_positive_float(name, value)


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number > 0; bools are rejected."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a real bool (so ``1`` or ``"no"`` never pass as a flag)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_str(name: str, value: Any) -> str:
    """``value`` if it is a non-empty string (``TypeError`` for a non-string)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a non-empty string, got {value!r}")
    if not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value
