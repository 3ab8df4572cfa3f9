"""Eager calls run as one compiled program.

The kernels are integer arithmetic on bit patterns, hundreds of primitives. Called outside any
transformation (in a notebook, in a test, in a training loop that is not jitted), JAX would
dispatch, and compile, each primitive on its own: seconds on the first call of each shape, tens
of milliseconds on every later one. :func:`compiled_when_eager` routes such calls through
``jax.jit`` instead (one compile per shape, then one dispatch), and leaves calls inside ``jit``,
``grad``, ``vmap`` or ``scan`` as they are, so traced programs are unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import jax

__all__ = ["compiled_when_eager", "is_traced"]

F = TypeVar("F", bound=Callable[..., Any])


def is_traced(*trees: Any) -> bool:
    """Whether any leaf of ``trees`` is a tracer (the call is inside a JAX transformation)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def compiled_when_eager(fun: F) -> F:
    """``fun`` under ``jax.jit`` when called on concrete arrays, else ``fun`` itself.

    Every argument of ``fun`` must be a pytree of arrays (an optax ``init`` / ``update``); the
    result is the same either way (the same operations, compiled together).
    """
    compiled = jax.jit(fun)

    @functools.wraps(fun)
    def call(*args: Any, **kwargs: Any) -> Any:
        if is_traced(args, kwargs):
            return fun(*args, **kwargs)
        return compiled(*args, **kwargs)

    return call  # type: ignore[return-value]
