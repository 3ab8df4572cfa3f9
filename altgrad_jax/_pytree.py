"""Frozen dataclasses registered as JAX pytrees, without Flax, for the core's state objects.

``jax.tree_util.register_dataclass`` gives key paths (``.history``, ``.count``) and keeps fields
marked ``static`` in the treedef, as ``flax.struct`` does, but without importing Flax: the core
(``formats`` .. ``stall``) depends on JAX and NumPy only. Flax's ``serialization`` learns these
classes from :func:`register_flax_serialization`, which the Flax-facing packages call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax

__all__ = ["pytree_dataclass", "register_flax_serialization", "static_field"]

T = TypeVar("T")
_CLASSES: list[type] = []
_SERIALIZABLE: set[type] = set()


def static_field(**kwargs: Any) -> Any:
    """A dataclass field kept in the treedef (hashable, part of the jit cache key)."""
    return dataclasses.field(metadata={"static": True}, **kwargs)


def pytree_dataclass(cls: type[T]) -> type[T]:
    """Makes ``cls`` a frozen dataclass and a pytree; ``.replace(**changes)`` as in flax.struct."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data = [f.name for f in fields if not f.metadata.get("static", False)]
    meta = [f.name for f in fields if f.metadata.get("static", False)]
    jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
    cls.replace = lambda self, **changes: dataclasses.replace(self, **changes)
    _CLASSES.append(cls)
    return cls


def _to_state_dict(node: Any) -> dict[str, Any]:
    from flax import serialization

    return {
        f.name: serialization.to_state_dict(getattr(node, f.name))
        for f in dataclasses.fields(node)
        if not f.metadata.get("static", False)
    }


def _from_state_dict(node: Any, state: dict[str, Any]) -> Any:
    from flax import serialization

    changes = {}
    for f in dataclasses.fields(node):
        if f.metadata.get("static", False):
            continue
        if f.name not in state:
            raise ValueError(f"missing field {f.name!r} restoring {type(node).__name__}")
        changes[f.name] = serialization.from_state_dict(getattr(node, f.name), state[f.name])
    return dataclasses.replace(node, **changes)


def register_flax_serialization() -> None:
    """Teaches ``flax.serialization`` every pytree dataclass of the library (idempotent)."""
    from flax import serialization

    for cls in _CLASSES:
        if cls not in _SERIALIZABLE:
            serialization.register_serialization_state(cls, _to_state_dict, _from_state_dict)
            _SERIALIZABLE.add(cls)
