"""Bit-stall: updates that the weight format rounds away.

An update stalls when the quantized weight does not change although its gradient is non-zero:
``quantize(w - lr * g) == quantize(w)`` with ``|g| > 1e-10``. With weights ~1 in E5M2 (ULP 0.25
near 1) an SGD step of 0.01 is far below half a ULP, so nearly every update is lost: the failure
mode this library is built to show (cf. Gupta et al., 2015, "Deep Learning with Limited Numerical
Precision", on why stochastic rounding rescues such updates).

Counts come back as values, never as hidden state. Long-run totals use :class:`ExactCount`, a
two-word counter exact to 2**64 without enabling x64 (1e9 parameters x 1e4 steps = 1e13 > 2**32).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from altgrad_jax._pytree import pytree_dataclass
from altgrad_jax.formats import FormatLike
from altgrad_jax.quantize import quantize
from altgrad_jax.rules import FormatSpec, leaf_format
from altgrad_jax.scaling import compute_scale

__all__ = [
    "GRAD_THRESHOLD",
    "BitStallDetector",
    "ExactCount",
    "StallStats",
    "detect_bit_stall",
    "tree_bit_stall",
]

GRAD_THRESHOLD = 1e-10


@pytree_dataclass
class ExactCount:
    """A non-negative integer counter exact up to 2**64, as two uint32 words (high, low).

    The words may be arrays (one counter per entry); indexing gives those counters.
    """

    high: jax.Array
    low: jax.Array

    @classmethod
    def zero(cls) -> ExactCount:
        return cls(jnp.zeros((), jnp.uint32), jnp.zeros((), jnp.uint32))

    def add(self, n: jax.Array) -> ExactCount:
        """Adds uint32 (or smaller non-negative integer) counts, carrying into the high word."""
        n = jnp.asarray(n).astype(jnp.uint32)
        low = self.low + n
        return ExactCount(self.high + (low < self.low).astype(jnp.uint32), low)

    def to_float(self) -> jax.Array:
        """The count as float32 (exact to 2**24, then relative error 2**-24)."""
        return self.high.astype(jnp.float32) * jnp.float32(2.0**32) + self.low.astype(jnp.float32)

    def __getitem__(self, index) -> ExactCount:
        return ExactCount(self.high[index], self.low[index])

    def __int__(self) -> int:
        return (int(self.high) << 32) | int(self.low)

    def __index__(self) -> int:
        return int(self)


def safe_ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator in float32, 0 where the denominator is 0."""
    numerator = jnp.asarray(numerator, jnp.float32)
    denominator = jnp.asarray(denominator, jnp.float32)
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def _ratio(numerator: ExactCount, denominator: ExactCount) -> jax.Array:
    return safe_ratio(numerator.to_float(), denominator.to_float())


def _stall_mask(
    weight: jax.Array,
    new_weight: jax.Array,
    counted: jax.Array,
    fmt: FormatLike,
    scale: float | jax.Array,
) -> jax.Array:
    unchanged = quantize(new_weight, fmt, scale) == quantize(weight, fmt, scale)
    return counted & unchanged


def detect_bit_stall(
    weight: jax.Array,
    grad: jax.Array,
    lr: float | jax.Array,
    fmt: FormatLike,
    scale: float | jax.Array = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Counts the SGD updates ``w - lr * g`` that leave ``quantize(w)`` unchanged.

    Returns ``(stall_count, total_count)`` as uint32 scalars: ``total_count`` entries have
    ``|g| > 1e-10``; ``stall_count`` of those quantize to the same value before and after.
    """
    weight, grad = jnp.asarray(weight), jnp.asarray(grad)
    counted = jnp.abs(grad) > GRAD_THRESHOLD
    new_weight = weight - jnp.asarray(lr, weight.dtype) * grad.astype(weight.dtype)
    stalled = _stall_mask(weight, new_weight, counted, fmt, scale)
    return jnp.sum(stalled, dtype=jnp.uint32), jnp.sum(counted, dtype=jnp.uint32)


@pytree_dataclass
class BitStallDetector:
    """Running bit-stall totals; ``update`` returns a new detector (nothing is mutated)."""

    stall_count: ExactCount
    total_count: ExactCount
    steps: ExactCount

    @classmethod
    def create(cls) -> BitStallDetector:
        return cls(ExactCount.zero(), ExactCount.zero(), ExactCount.zero())

    def update(
        self,
        weight: jax.Array,
        grad: jax.Array,
        lr: float | jax.Array,
        fmt: FormatLike,
        scale: float | jax.Array = 1.0,
    ) -> BitStallDetector:
        stalled, total = detect_bit_stall(weight, grad, lr, fmt, scale)
        return BitStallDetector(
            self.stall_count.add(stalled), self.total_count.add(total), self.steps.add(1)
        )

    def get_stall_rate(self) -> jax.Array:
        """Stalled / counted entries over all updates so far, in [0, 1]; 0 before any."""
        return _ratio(self.stall_count, self.total_count)


class StallStats(NamedTuple):
    """Bit-stall statistics of one update of a whole parameter tree.

    ``leaf_stall`` and ``leaf_total`` have the params' structure (uint32 scalars, None where a
    leaf was skipped); the totals are exact counters.
    """

    leaf_stall: Any
    leaf_total: Any
    stall_count: ExactCount
    total_count: ExactCount

    @property
    def stall_rate(self) -> jax.Array:
        return _ratio(self.stall_count, self.total_count)


def tree_bit_stall(
    params: Any,
    updates: Any,
    fmt: FormatSpec,
    scale: float | Any | None = None,
    grads: Any | None = None,
) -> StallStats:
    """Bit-stall of an optax-style update ``params + updates``, per leaf and in total.

    Args:
      params: the weights before the step.
      updates: what the optimizer returned (already scaled by the learning rate and negated).
      fmt: one format for every leaf, or ``rule(path, leaf) -> format | None`` (None skips).
      scale: the weights' quantization scale: a number, a tree like ``params``, or None for
        each leaf's current scale ``compute_scale(max|w|, fmt)``.
      grads: when given, an entry counts if ``|g| > 1e-10`` (the definition of stall);
        otherwise it counts if its update is non-zero.

    Non-float leaves are skipped.
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    update_leaves = treedef.flatten_up_to(updates)
    grad_leaves = treedef.flatten_up_to(grads) if grads is not None else [None] * len(update_leaves)
    if scale is None or isinstance(scale, (int, float)):
        scale_leaves = [scale] * len(update_leaves)
    else:
        scale_leaves = treedef.flatten_up_to(scale)

    stall, total = [], []
    stall_count, total_count = ExactCount.zero(), ExactCount.zero()
    for (path, w), u, g, s in zip(
        leaves_with_path, update_leaves, grad_leaves, scale_leaves, strict=True
    ):
        leaf_fmt = leaf_format(fmt, path, w)
        w = jnp.asarray(w)
        if leaf_fmt is None:
            stall.append(None)
            total.append(None)
            continue
        u = jnp.asarray(u).astype(w.dtype)
        counted = jnp.abs(g) > GRAD_THRESHOLD if g is not None else u != 0
        if s is None:
            s = compute_scale(jnp.max(jnp.abs(w), initial=0.0), leaf_fmt)
        stalled = _stall_mask(w, w + u, counted, leaf_fmt, s)
        leaf_stall = jnp.sum(stalled, dtype=jnp.uint32)
        leaf_total = jnp.sum(counted, dtype=jnp.uint32)
        stall.append(leaf_stall)
        total.append(leaf_total)
        stall_count, total_count = stall_count.add(leaf_stall), total_count.add(leaf_total)
    return StallStats(
        jax.tree_util.tree_unflatten(treedef, stall),
        jax.tree_util.tree_unflatten(treedef, total),
        stall_count,
        total_count,
    )
