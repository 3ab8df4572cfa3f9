"""Shared pieces of the optax transforms: per-leaf formats, grid scales, sums.

Formats may be static (a :class:`FloatFormat`, resolved at trace time) or traced
(:class:`FormatParams` of arrays), so one compiled train step can serve every format. Everything
here works for both: format constants are read from ``FormatParams``, which holds Python ints for
a static format (folded away) and arrays for a traced one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax.tree_utils
from flax import nnx
from flax.core import meta

from altgrad_jax._checks import check_choice, check_positive_float
from altgrad_jax.bits import power_of_two
from altgrad_jax.formats import BlockFormat, FloatFormat, FormatParams, as_params
from altgrad_jax.rules import FormatSpec, leaf_format
from altgrad_jax.scaling import amax_and_finite, compute_scale

LeafFormat = FloatFormat | FormatParams
SCALE_MODES: tuple[str, ...] = ("pow2", "amax")


def check_scale(scale: float | str) -> float | str:
    """Validates a scale option: a positive float, "pow2" or "amax"."""
    if isinstance(scale, str):
        return check_choice("scale", scale, SCALE_MODES)
    return check_positive_float("scale", scale)


# ------------------------------------------------------------------ boxed parameters
def is_box(node: Any) -> bool:
    """Whether ``node`` wraps one parameter array with metadata: an NNX ``Variable`` (as in
    ``nnx.state(model)``) or a Linen ``AxisMetadata`` box (``nn.Partitioned``,
    ``nn.LogicallyPartitioned``, as in Flax's partition-spec recipe)."""
    return isinstance(node, (nnx.Variable, meta.AxisMetadata))


def unbox(node: Any) -> Any:
    """The array inside a box (see :func:`is_box`); anything else as is."""
    if isinstance(node, nnx.Variable):
        return node.get_value()
    if isinstance(node, meta.AxisMetadata):
        return node.unbox()
    return node


def rebox(box: Any, value: Any) -> Any:
    """``value`` in a box like ``box`` (same metadata, so the same sharding), or bare."""
    if isinstance(box, nnx.Variable):
        return box.replace(value)
    if isinstance(box, meta.AxisMetadata):
        return box.replace_boxed(value)
    return value


def flatten_params(params: Any) -> tuple[list[tuple], list[Any], list[Any], Any]:
    """Paths, boxes, arrays and layout of ``params``, one entry per parameter.

    The layout is the params' tree structure with each box as one leaf: unflattening
    per-parameter values with it gives the params' structure without the boxes, so a per-layer
    scalar carries none of its weight's metadata (a replicated partition spec, an ``OptArray``
    in ``nnx.Optimizer``), while :func:`rebox` keeps the metadata for per-entry state.
    """
    flat, layout = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)
    paths = [path for path, _ in flat]
    boxes = [box for _, box in flat]
    return paths, boxes, [unbox(box) for box in boxes], layout


def unbox_tree(tree: Any) -> Any:
    """``tree`` with every box replaced by its contents."""
    return jax.tree.map(unbox, tree, is_leaf=is_box)


def iter_leaves(
    fmt: FormatSpec, params: Any
) -> Iterator[tuple[int, tuple, Any, LeafFormat | None]]:
    """Yields ``(index, path, leaf, format)`` per parameter (boxes opened, see
    :func:`flatten_params`)."""
    paths, _, leaves, _ = flatten_params(params)
    for i, (path, leaf) in enumerate(zip(paths, leaves, strict=True)):
        yield i, path, leaf, leaf_format(fmt, path, leaf)


def sharding_of(x: jax.Array) -> Any:
    """The sharding in ``x``'s type (None outside an explicit-sharding context)."""
    return getattr(jax.typeof(x), "sharding", None)


def explicitly_sharded(x: jax.Array) -> bool:
    """Whether ``x`` is split over an explicit-sharding mesh axis (``AxisType.Explicit``).

    Flattening or concatenating such an array is a sharding type error whenever the split
    dimensions do not divide evenly, so those leaves keep their shape.
    """
    spec = getattr(sharding_of(x), "spec", None) or ()
    return any(axis is not None for axis in spec)


# Leaves up to this size that share a per-tensor format are rounded as one raveled vector.
FUSED_MAX_ENTRIES = 2**16


class LeafGroup(NamedTuple):
    """Leaves rounded together: their indices and the format they share."""

    leaves: tuple[int, ...]
    fmt: Any


def leaf_groups(xs: list[Any], fmts: list[Any]) -> list[LeafGroup]:
    """The leaves with a format (``fmts[i]`` not None) in rounding groups, by first index.

    Small leaves (up to :data:`FUSED_MAX_ENTRIES` entries, not explicitly sharded) of one format
    and dtype form one group: a model's many biases, norms and small kernels then compile and
    run as one rounding kernel instead of one per leaf (XLA's compile time grows with every copy
    of the kernel: 30 leaves of a small transformer took 7.5 s to compile their storage step one
    by one, 2.3 s as groups). Per-tensor formats join as raveled vectors (:func:`concat_leaves`),
    block formats with 1-D blocks and no tensor scale (MXFP8/6/4) as rows of whole blocks
    (:func:`block_rows`); NVFP4's tensor scale and 2-D tiles need the whole leaf, so those leaves
    stay alone, as do larger ones (concatenating them would copy, and when sharded gather,
    them). Traced ``FormatParams`` group by identity (the same object is the same format).
    """
    fused: dict[Any, list[int]] = {}
    groups: list[LeafGroup] = []
    for i, (x, fmt) in enumerate(zip(xs, fmts, strict=True)):
        if fmt is None:
            continue
        joins = isinstance(fmt, (FloatFormat, FormatParams)) or (
            _rows_of_blocks(fmt) and jnp.ndim(x) > 0
        )
        if joins and jnp.size(x) <= FUSED_MAX_ENTRIES and not explicitly_sharded(x):
            kind = ("traced", id(fmt)) if isinstance(fmt, FormatParams) else fmt
            fused.setdefault((kind, jnp.asarray(x).dtype), []).append(i)
        else:
            groups.append(LeafGroup((i,), fmt))
    groups += [LeafGroup(tuple(leaves), fmts[leaves[0]]) for leaves in fused.values()]
    return sorted(groups, key=lambda group: group.leaves[0])


def _rows_of_blocks(fmt: Any) -> bool:
    """Whether ``fmt`` is a block format whose blocks can be rounded as rows of any matrix."""
    return isinstance(fmt, BlockFormat) and len(fmt.block_shape) == 1 and not fmt.tensor_scale


def block_rows(x: jax.Array, size: int, axis: int) -> jax.Array:
    """``x``'s blocks of ``size`` along ``axis`` as the rows of a matrix: the axis moved last and
    zero-padded to whole blocks (a shorter last block is one "as if zero-padded", see
    :mod:`altgrad_jax.blocks`, so each row keeps its block's scale)."""
    moved = jnp.moveaxis(x, axis, -1)
    n = moved.shape[-1]
    padded = jnp.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, -n % size)])
    return padded.reshape(-1, size)


def from_block_rows(rows: jax.Array, x: jax.Array, axis: int) -> jax.Array:
    """The inverse of :func:`block_rows` for a leaf shaped like ``x``."""
    shape = list(jnp.shape(x))
    n = shape.pop(axis)
    padded = rows.reshape(*shape, -1)[..., :n]
    return jnp.moveaxis(padded, -1, axis)


def concat_leaves(xs: list[jax.Array]) -> jax.Array:
    """``xs`` raveled and concatenated (a single leaf: raveled)."""
    return jnp.concatenate([jnp.ravel(x) for x in xs])


def per_entry(values: list[Any], xs: list[jax.Array]) -> jax.Array:
    """float32 ``values[k]`` repeated over the entries of ``xs[k]``, as :func:`concat_leaves`
    lays them out."""
    return jnp.concatenate(
        [
            jnp.broadcast_to(jnp.asarray(v, jnp.float32), (jnp.size(x),))
            for v, x in zip(values, xs, strict=True)
        ]
    )


def split_leaves(flat: jax.Array, xs: list[jax.Array]) -> list[jax.Array]:
    """The inverse of :func:`concat_leaves`: ``flat`` cut into arrays shaped like ``xs``."""
    sizes = [jnp.size(x) for x in xs]
    offsets = [sum(sizes[:k]) for k in range(1, len(sizes))]
    parts = jnp.split(flat, offsets)
    return [part.reshape(jnp.shape(x)) for part, x in zip(parts, xs, strict=True)]


def find_states(opt_state: Any, state_type: type) -> list[Any]:
    """All states of ``state_type`` inside a (nested) optax state, in tree order, unboxed.

    Found by the NamedTuple's name with ``optax.tree_utils``, so this looks through ``chain``,
    ``inject_hyperparams``, ``MultiSteps``, a ``TrainState``'s ``opt_state`` and
    ``nnx.Optimizer``'s (whose arrays are ``OptState`` variables: they are read out).
    """
    found = optax.tree_utils.tree_get_all_with_path(
        opt_state, state_type.__name__, filtering=lambda _, node: isinstance(node, state_type)
    )
    return [unbox_tree(node) for _, node in found]


def max_value(fmt: LeafFormat) -> jax.Array:
    """The format's largest finite value as float32 (traced for ``FormatParams``)."""
    return as_params(fmt).max_value


def pow2_scale(amax: jax.Array, fmt: LeafFormat) -> jax.Array:
    """The smallest power of two ``s`` with ``amax / s <= max_value``.

    Weights stored at this scale never saturate, a power of two rescales them exactly, and the
    scale is a function of the weights alone, so the storage, the monitor and the ULP-aware
    transforms agree on the grid without sharing state. A zero (or non-finite) amax has no
    range to fit and falls back to a unit one, ``amax = 1``: formats that differ only by a power
    of two (E1M6 and E0M7) then keep the same grid even for all-zero tensors.
    """
    amax = jnp.asarray(amax, jnp.float32)
    ratio = amax / max_value(fmt)
    usable = (ratio > 0) & jnp.isfinite(ratio)
    ratio = jnp.where(usable, ratio, 1 / max_value(fmt))
    mantissa, exponent = jnp.frexp(ratio)
    ceil_log2 = jnp.where(mantissa == 0.5, exponent - 1, exponent)
    return power_of_two(jnp.clip(ceil_log2, -126, 127))


def resolve_scale(scale: float | str, x: jax.Array, fmt: LeafFormat) -> jax.Array | float:
    """The quantization scale of ``x``: fixed, :func:`pow2_scale` or the seed's amax scaling.

    The amax is that of x's finite entries (:func:`altgrad_jax.scaling.amax_and_finite`): an inf or
    NaN weight or update stays visible in its own entry (inf saturates or stays inf, NaN stays
    NaN) and never becomes the leaf's scale, so its neighbours keep the grid of their range.
    """
    if not isinstance(scale, str):
        return scale
    _, amax = amax_and_finite(x)
    return pow2_scale(amax, fmt) if scale == "pow2" else compute_scale(amax, fmt)


class RunningSum(NamedTuple):
    """A float32 sum with Kahan compensation, so long runs of small terms are not lost."""

    total: jax.Array
    compensation: jax.Array

    @classmethod
    def zero(cls) -> RunningSum:
        return cls(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))

    def add(self, value: jax.Array) -> RunningSum:
        y = jnp.asarray(value, jnp.float32) - self.compensation
        total = self.total + y
        return RunningSum(total, (total - self.total) - y)
