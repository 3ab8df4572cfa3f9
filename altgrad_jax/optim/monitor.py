"""Stall monitoring: wrap any optax transform and measure what a format does to its updates.

For every float leaf the wrapper compares the quantized weight before and after the update the
inner transform produced, ``Q(w)`` and ``Q(w + u)``, at the leaf's format and scale:

* stall: ``|g| > 1e-10`` but ``Q(w + u) == Q(w)`` (the definition of :func:`detect_bit_stall`);
* flip rate: the fraction of weights whose quantized value (its code) changed;
* update rate: the fraction that received a non-zero update;
* histogram of ``|u| / ulp(w)`` in fixed bins (:data:`HISTOGRAM_LABELS`): below half a ULP
  round-to-nearest always stalls, so this shows *where* a format loses updates;
* landed ratio: ``sum|Q(w + u) - Q(w)| / sum|u|``, per step and over the run.

Small leaves of one format are rounded together (one vector, or the rows of their MX blocks:
:func:`~altgrad_jax.optim._common.leaf_groups`), then counted leaf by leaf, so each leaf's counts
are those it would have alone. All counts are exact integers (``ExactCount`` totals never
overflow). With ``every=k`` each step
measures one rotating block of ``1/k`` of every tensor, so each weight is seen every k-th step.

Wrapping the float optimizer (``monitor_stall(optax.adam(lr), fmt)``) shows what nearest
storage would keep. Wrapping a chain that ends in :func:`low_precision_storage` with
``scale="pow2"`` shows what the stored weights actually did (their grid is that scale's grid).
Block formats (MXFP8/6/4, NVFP4) are counted against the block grid the storage keeps: each
side of ``Q(w + u) == Q(w)`` rounded with the scales of its own blocks (see
:func:`monitor_stall`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from altgrad_jax._checks import check_positive_int
from altgrad_jax._eager import compiled_when_eager
from altgrad_jax.bits import round_float32, ulp
from altgrad_jax.blocks import block_grid, quantize_blocks
from altgrad_jax.formats import BlockFormat, as_params
from altgrad_jax.optim._common import (
    RunningSum,
    check_scale,
    concat_leaves,
    explicitly_sharded,
    find_states,
    flatten_params,
    iter_leaves,
    leaf_groups,
    per_entry,
    resolve_scale,
    sharding_of,
    split_leaves,
    unbox,
)
from altgrad_jax.optim.storage import joined_blocks, storage_axis
from altgrad_jax.rules import FormatSpec, check_format_spec
from altgrad_jax.stall import GRAD_THRESHOLD, ExactCount, safe_ratio

__all__ = [
    "HISTOGRAM_EDGES",
    "HISTOGRAM_LABELS",
    "StallMonitorState",
    "UpdateStats",
    "monitor_stall",
    "stall_stats",
]

HISTOGRAM_EDGES: tuple[float, ...] = (2.0**-6, 2.0**-4, 2.0**-2, 2.0**-1, 1.0, 4.0)
"""Bin edges of |u| / ulp(w); zero updates get a bin of their own in front."""
HISTOGRAM_LABELS: tuple[str, ...] = (
    "0",
    "(0, 1/64)",
    "[1/64, 1/16)",
    "[1/16, 1/4)",
    "[1/4, 1/2)",
    "[1/2, 1)",
    "[1, 4)",
    ">=4",
)
_NUM_BINS = len(HISTOGRAM_LABELS)
_NUM_COUNTS = 5 + _NUM_BINS  # stalled, counted, flipped, moved, entries, then the histogram


def _as_float(value: Any) -> jax.Array:
    if isinstance(value, ExactCount):
        return value.to_float()
    return jnp.asarray(value, jnp.float32)


def _add_counts(total: ExactCount, n: Any) -> ExactCount:
    """Adds uint32 counts or another :class:`ExactCount` exactly."""
    if not isinstance(n, ExactCount):
        return total.add(n)
    summed = total.add(n.low)
    return ExactCount(summed.high + n.high, summed.low)


def _count(index: int | slice):
    return property(lambda self: self.counts[index])


def _sum(index: int):
    def read(self):
        sums = self.sums.total if isinstance(self.sums, RunningSum) else self.sums
        return sums[index]

    return property(read)


class UpdateStats(NamedTuple):
    """Counts and sums of one update, or of a run of them, as two vectors.

    ``counts`` holds stalled, counted, flipped, moved, entries and the ``|u| / ulp`` histogram:
    uint32 for one leaf and one step, an :class:`ExactCount` for totals. ``sums`` holds landed
    and requested: float32 for one step, a :class:`RunningSum` for runs. Read them by name
    (``stats.stalled``, ``stats.histogram``, ``stats.landed``); two arrays instead of thirteen
    keep the optimizer state, and the bookkeeping of every step, small.
    """

    counts: Any
    sums: Any

    stalled = _count(0)  # |g| > 1e-10 and the quantized weight did not change
    counted = _count(1)  # |g| > 1e-10
    flipped = _count(2)  # the quantized weight changed
    moved = _count(3)  # u != 0
    entries = _count(4)  # float entries looked at
    histogram = _count(slice(5, None))  # counts of |u| / ulp(w) in HISTOGRAM_LABELS' bins
    landed = _sum(0)  # sum |Q(w + u) - Q(w)|
    requested = _sum(1)  # sum |u|

    @classmethod
    def zero(cls, running: bool = True) -> UpdateStats:
        """Exact-counter totals at zero; sums are running (Kahan) sums or plain float32."""
        zeros = jnp.zeros((_NUM_COUNTS,), jnp.uint32)
        sums = jnp.zeros((2,), jnp.float32)
        return cls(ExactCount(zeros, zeros), RunningSum(sums, sums) if running else sums)

    def accumulate(self, step: UpdateStats) -> UpdateStats:
        """Adds one step's (or one leaf's) counts and sums to these totals."""
        if isinstance(self.sums, RunningSum):
            sums = self.sums.add(step.sums)
        else:
            sums = self.sums + step.sums
        return UpdateStats(_add_counts(self.counts, step.counts), sums)

    @property
    def stall_rate(self) -> jax.Array:
        """Stalled over counted entries (0 when none counted)."""
        return safe_ratio(_as_float(self.stalled), _as_float(self.counted))

    @property
    def flip_rate(self) -> jax.Array:
        """Fraction of entries whose quantized value changed."""
        return safe_ratio(_as_float(self.flipped), _as_float(self.entries))

    @property
    def update_rate(self) -> jax.Array:
        """Fraction of entries with a non-zero update."""
        return safe_ratio(_as_float(self.moved), _as_float(self.entries))

    @property
    def landed_ratio(self) -> jax.Array:
        """Movement of the quantized weights over the movement requested."""
        return safe_ratio(_as_float(self.landed), _as_float(self.requested))

    @property
    def histogram_fraction(self) -> jax.Array:
        """The |u| / ulp(w) histogram as fractions of the entries."""
        return safe_ratio(_as_float(self.histogram), _as_float(self.entries))

    def summary(self) -> dict[str, jax.Array]:
        """The rates as a flat dict of float32 scalars (and the histogram), for logging."""
        return {
            "stall_rate": self.stall_rate,
            "flip_rate": self.flip_rate,
            "update_rate": self.update_rate,
            "landed_ratio": self.landed_ratio,
            "histogram": self.histogram_fraction,
        }


class StallMonitorState(NamedTuple):
    """State of :func:`monitor_stall`.

    ``last`` and ``total`` are over all monitored leaves (this step, and the whole run);
    ``leaf_last`` and ``leaf_total`` have the params' structure without their NNX / Linen boxes
    (None for skipped leaves), so Flax's partition-spec recipes replicate them.
    """

    inner_state: Any
    steps: ExactCount
    last: UpdateStats
    total: UpdateStats
    leaf_last: Any
    leaf_total: Any


_ROW = 512
"""Entries per first-level partial count: a row's counts stay below 2**10 (see _pack)."""


def _pack(flags: list[jax.Array]) -> list[jax.Array]:
    """Packs 0/1 uint32 flags three to a word in 10-bit fields, so one sum counts three."""
    return [
        sum(flag << (10 * k) for k, flag in enumerate(flags[i : i + 3]))
        for i in range(0, len(flags), 3)
    ]


def _unpack(words: list[jax.Array], count: int) -> list[jax.Array]:
    return [(words[i // 3] >> (10 * (i % 3))) & 1023 for i in range(count)]


def _sum_all(operands: list[jax.Array], axis: int) -> list[jax.Array]:
    """One variadic integer reduction: a single loop over the data, one accumulator per sum."""
    zeros = [jnp.zeros((), x.dtype) for x in operands]
    return jax.lax.reduce(
        operands, zeros, lambda a, b: [x + y for x, y in zip(a, b, strict=True)], (axis,)
    )


Grid = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]
"""Entrywise ``(inputs...) -> (Q(w), Q(w + u), spacing of the grid at Q(w))``."""


def _tensor_grid(fmt: Any, s: jax.Array) -> Grid:
    """The grid of a per-tensor format at scale ``s``, from ``(w, u)`` entrywise (so it runs
    fused into the row loops of :func:`_leaf_stats`)."""
    p = as_params(fmt)

    def grid(w: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        inverse = 1 / s  # as quantize: x / scale is x * (1 / scale)
        rounded_old = round_float32(w * inverse, p)
        old, new = rounded_old * s, round_float32((w + u) * inverse, p) * s
        return old, new, ulp(rounded_old, p) * s

    return grid


def _block_grid_inputs(
    w: jax.Array, u: jax.Array, fmt: BlockFormat
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``Q(w)``, ``Q(w + u)`` and the spacing at ``Q(w)`` of a leaf in a block format.

    Each side is rounded with the scales of its own blocks, by the format's scale rule, along
    the storage's axis (:func:`~altgrad_jax.optim.storage.storage_axis`): exactly what nearest
    :func:`~altgrad_jax.optim.low_precision_storage` stores for ``w`` and for ``w + u``, so a
    flip is a stored weight that would move. The blocks need the whole leaf, so this runs on
    its shape before the entrywise counts.
    """
    axis = storage_axis(fmt, w.ndim)
    old, spacing = block_grid(w, fmt, axis)
    return old, quantize_blocks(w + u, fmt, axis), spacing


def _rounded_together(
    w32s: list[Any], updates: list[Any], fmts: list[Any], scales: list[Any]
) -> dict[int, tuple[jax.Array, jax.Array, jax.Array]]:
    """``Q(w)``, ``Q(w + u)`` and the spacing at ``Q(w)`` of the small leaves, rounded as groups
    (:func:`~altgrad_jax.optim._common.leaf_groups`): per-tensor formats as one raveled vector
    with per-entry scales, block formats as the rows of their blocks. By leaf index. The results
    are materialised (an optimisation barrier), so each leaf's counts read them instead of
    recompiling the rounding per sum."""
    out = {}
    for group in leaf_groups(w32s, fmts):
        if len(group.leaves) == 1:
            continue
        ws = [w32s[i] for i in group.leaves]
        us = [jnp.asarray(updates[i], jnp.float32) for i in group.leaves]
        if isinstance(group.fmt, BlockFormat):
            old_rows, split = joined_blocks(ws, group.fmt)
            new_rows, _ = joined_blocks([w + u for w, u in zip(ws, us, strict=True)], group.fmt)
            old, spacing = block_grid(old_rows, group.fmt, -1)
            new = quantize_blocks(new_rows, group.fmt, -1)
            parts = [split(x) for x in jax.lax.optimization_barrier((old, new, spacing))]
        else:
            grid = _tensor_grid(group.fmt, per_entry([scales[i] for i in group.leaves], ws))
            rounded = jax.lax.optimization_barrier(grid(concat_leaves(ws), concat_leaves(us)))
            parts = [split_leaves(x, ws) for x in rounded]
        out.update(zip(group.leaves, zip(*parts, strict=True), strict=True))
    return out


def _on_grid(
    old: jax.Array, new: jax.Array, spacing: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The :data:`Grid` of inputs already rounded (:func:`_block_grid_inputs`)."""
    return old, new, spacing


def _entry_terms(
    inputs: list[jax.Array],
    u: jax.Array,
    g: jax.Array,
    valid: jax.Array | None,
    grid: Grid,
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """Per entry: the 0/1 uint32 flags, |Q(w + u) - Q(w)| and |u| (zero where not ``valid``)."""
    old, new, spacing = grid(*inputs)
    flipped = new != old
    counted = jnp.abs(g) > GRAD_THRESHOLD
    magnitude = jnp.abs(u)
    at_least = [u != 0] + [magnitude >= edge * spacing for edge in HISTOGRAM_EDGES]
    flags = [*at_least, flipped, counted, counted & ~flipped]
    delta = jnp.abs(new - old)
    if valid is not None:
        flags = [flag & valid for flag in flags]
        delta, magnitude = jnp.where(valid, delta, 0), jnp.where(valid, magnitude, 0)
    return [flag.astype(jnp.uint32) for flag in flags], delta, magnitude


def _leaf_stats(
    arrays: tuple[jax.Array, ...],
    grid: Grid,
    valid: jax.Array | None = None,
    entries: jax.Array | int | None = None,
) -> UpdateStats:
    """Statistics of one leaf's entries (flattened; ``valid`` masks some out).

    ``arrays`` are the grid's inputs, then ``u`` and ``g``, all of one size.

    XLA's CPU backend runs a reduction whose input is computed on the fly as a sequential loop:
    fine for integer adds, which it vectorises, slow for float adds, which it must not reorder.
    So the flags are summed as integers, packed three to a word over rows of ``_ROW`` entries
    (a parallel loop over rows, then a small sum), and the float sums are matrix-vector
    products, whose inputs are materialised by parallel loops first (HIGHEST precision, so no
    TF32 on GPUs).
    """
    arrays = [jnp.ravel(x).astype(jnp.float32) for x in arrays]
    n = arrays[0].size
    body = n - n % _ROW
    num_flags = 1 + len(HISTOGRAM_EDGES) + 3  # moved, |u| past each edge, flipped, counted, stalled
    counts = [jnp.uint32(0)] * num_flags
    landed = requested = jnp.float32(0)
    for part, rows in ((slice(0, body), (-1, _ROW)), (slice(body, n), (1, n - body))):
        if part.stop == part.start:
            continue
        *inputs, u, g = [x[part].reshape(rows) for x in arrays]
        mask = None if valid is None else valid[part].reshape(rows)
        flags, delta, magnitude = _entry_terms(inputs, u, g, mask, grid)
        fields = _sum_all(_unpack(_sum_all(_pack(flags), 1), num_flags), 0)
        counts = [total + n_part for total, n_part in zip(counts, fields, strict=True)]
        ones = jnp.ones((rows[1],), jnp.float32)
        landed += jnp.sum(jnp.dot(delta, ones, precision=jax.lax.Precision.HIGHEST))
        requested += jnp.sum(jnp.dot(magnitude, ones, precision=jax.lax.Precision.HIGHEST))
    return _stats_of(counts, landed, requested, n if entries is None else entries)


def _stats_of(
    counts: list[jax.Array], landed: jax.Array, requested: jax.Array, entries: Any
) -> UpdateStats:
    """Packs the flag sums of :func:`_entry_terms` into an :class:`UpdateStats`."""
    moved, *at_least, flipped, counted, stalled = counts
    entries = jnp.asarray(entries, jnp.uint32)
    cumulative = jnp.stack([entries, moved, *at_least, jnp.uint32(0)])
    histogram = cumulative[:-1] - cumulative[1:]
    counts = jnp.concatenate([jnp.stack([stalled, counted, flipped, moved, entries]), histogram])
    return UpdateStats(counts, jnp.stack([landed, requested]))


def _leaf_stats_by_dot(
    arrays: tuple[jax.Array, ...],
    grid: Grid,
    valid: jax.Array | None = None,
    entries: jax.Array | int | None = None,
) -> UpdateStats:
    """:func:`_leaf_stats` for grid inputs that are costly to compute (block formats).

    XLA fuses an elementwise producer into every consumer, so the several sums of
    :func:`_leaf_stats` would each recompute (and compile) the whole block rounding. Here
    every per-entry term is one stacked array, summed over rows of ``_ROW`` entries by a single
    matrix-vector product (its operand is materialised once); the 0/1 flags' row sums are exact
    in float32 and are then added as uint32.
    """
    arrays = [jnp.ravel(x).astype(jnp.float32) for x in arrays]
    n = arrays[0].size
    rows = max(1, -(-n // _ROW))
    padded = [jnp.pad(x, (0, rows * _ROW - n)).reshape(rows, _ROW) for x in arrays]
    if valid is None:
        valid = jnp.ones((n,), jnp.bool_)
    mask = jnp.pad(valid, (0, rows * _ROW - n)).reshape(rows, _ROW)  # padding is not valid
    *inputs, u, g = padded
    flags, delta, magnitude = _entry_terms(inputs, u, g, mask, grid)
    terms = jnp.stack([*(f.astype(jnp.float32) for f in flags), delta, magnitude])
    ones = jnp.ones((_ROW,), jnp.float32)
    sums = jnp.dot(terms, ones, precision=jax.lax.Precision.HIGHEST)  # [terms, rows]
    counts = list(jnp.sum(sums[:-2].astype(jnp.uint32), axis=1))
    landed, requested = jnp.sum(sums[-2]), jnp.sum(sums[-1])
    return _stats_of(counts, landed, requested, n if entries is None else entries)


def _leaf_stats_in_place(
    arrays: tuple[jax.Array, ...],
    grid: Grid,
    block: tuple[jax.Array, int] | None = None,
) -> UpdateStats:
    """:func:`_leaf_stats` on the leaf's own shape and sharding (explicitly sharded leaves).

    The same integer counts from plain sums (exact, as uint32); the sampled block of ``every``
    is a mask over the row-major index instead of a slice, so nothing is resharded.
    """
    *inputs, u, g = (jnp.asarray(x, jnp.float32) for x in arrays)
    w = inputs[0]
    n = w.size
    valid, entries = None, n
    if block is not None:
        phase, every = block
        size = -(-n // every)
        index = jnp.zeros(w.shape, jnp.uint32)
        stride = 1
        for axis in reversed(range(w.ndim)):
            iota = jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis, out_sharding=sharding_of(w))
            index = index + iota * jnp.uint32(stride)
            stride *= w.shape[axis]
        first = phase * jnp.uint32(size)
        valid = (index >= first) & (index < first + jnp.uint32(size))
        entries = jnp.where(first < n, jnp.minimum(jnp.uint32(n) - first, jnp.uint32(size)), 0)
    flags, delta, magnitude = _entry_terms(inputs, u, g, valid, grid)
    counts = [jnp.sum(flag, dtype=jnp.uint32) for flag in flags]
    return _stats_of(counts, jnp.sum(delta), jnp.sum(magnitude), entries)


def _step_phase(steps: ExactCount, every: int) -> jax.Array:
    """The exact step count modulo ``every`` (< 2**16, so nothing overflows), uint32."""
    e = jnp.uint32(every)
    wrap = jnp.uint32(2**32 % every)
    return ((steps.high % e) * wrap + steps.low % e) % e


def _block(
    arrays: tuple[jax.Array, ...], phase: jax.Array, every: int
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """Block ``phase`` of ``every`` contiguous blocks of same-size flattened arrays.

    Returns the blocks, the mask of entries that belong to this block, and their count. The
    blocks have ``ceil(n / every)`` entries; the last ones are shifted back to fit inside the
    arrays and the mask drops the entries of an earlier block, so over ``every`` consecutive
    phases each entry is measured exactly once.
    """
    n = arrays[0].size
    size = -(-n // every)
    first = phase * jnp.uint32(size)
    start = jnp.minimum(first, jnp.uint32(n - size))
    blocks = [jax.lax.dynamic_slice(jnp.ravel(x), (start,), (size,)) for x in arrays]
    valid = jnp.arange(size, dtype=jnp.uint32) + start >= first
    count = jnp.where(first < n, jnp.minimum(jnp.uint32(n) - first, jnp.uint32(size)), 0)
    return blocks, valid, count


def monitor_stall(
    inner: optax.GradientTransformation,
    fmt: FormatSpec,
    *,
    scale: float | Literal["amax", "pow2"] = "amax",
    every: int = 1,
) -> optax.GradientTransformationExtraArgs:
    """Wraps ``inner`` so that each step also records the bit-stall and flip statistics.

    The updates are those of ``inner``, unchanged. The incoming updates count as the gradients
    (``|g| > 1e-10``), so put the wrapper first, around the whole optimizer.

    Args:
      inner: any optax transformation (extra args are passed through).
      fmt: one format for every float leaf (a FloatFormat, a block format such as ``MXFP4``, a
        name, or traced ``FormatParams``), or a rule ``(path, leaf) -> format | None`` such as
        :class:`altgrad_jax.rules.PathRules` (None skips the leaf). Non-float leaves are
        skipped. A block-format leaf is counted against its block grid as the storage keeps
        it: ``Q(w)`` and ``Q(w + u)`` each with the scales of their own blocks (recomputed
        from the weights every step by the format's scale rule), blocked along a kernel's
        input features (see :func:`~altgrad_jax.optim.storage.storage_axis`); ``ulp(w)`` is
        the element's ULP times the block scale of ``w``.
      scale: for per-tensor formats, "amax" (the seed's current scaling,
        ``compute_scale(max|w|)``, as in :func:`tree_bit_stall`), "pow2" (the grid of
        :func:`low_precision_storage`) or a fixed positive float. Block formats take their
        scales from their blocks.
      every: measure each weight every ``every``-th step: each step looks at one contiguous
        block of ``1/every`` of every leaf's entries, the next block on the next step, so the
        rounding work per step drops by ``every`` (the leaf's amax, for "amax" and "pow2",
        is still read in full, and block formats round the whole leaf) and every weight is
        still seen once per ``every`` steps.
        ``last`` then holds the statistics of the block measured last (its ``entries`` say
        how many) and ``total`` sums measured entries, so the rates are those of a systematic
        sample. 1 (the default) measures every weight every step.

    Returns:
      A transformation with :class:`StallMonitorState`; read it with :func:`stall_stats`.
    """
    inner = optax.with_extra_args_support(inner)
    fmt = check_format_spec(fmt)
    scale = check_scale(scale)
    every = check_positive_int("every", every, maximum=2**16 - 1)

    def init_fn(params):
        treedef = flatten_params(params)[3]
        leaf_last, leaf_total = [], []
        for _, _, w, leaf_fmt in iter_leaves(fmt, params):
            if leaf_fmt is None:
                leaf_last.append(None)
                leaf_total.append(None)
                continue
            if jnp.size(w) >= 2**32:
                raise ValueError(f"a leaf of {jnp.size(w)} entries overflows the uint32 counts")
            leaf_last.append(
                UpdateStats(jnp.zeros((_NUM_COUNTS,), jnp.uint32), jnp.zeros((2,), jnp.float32))
            )
            leaf_total.append(UpdateStats.zero())
        return StallMonitorState(
            inner_state=inner.init(params),
            steps=ExactCount.zero(),
            last=UpdateStats.zero(running=False),
            total=UpdateStats.zero(),
            leaf_last=treedef.unflatten(leaf_last),
            leaf_total=treedef.unflatten(leaf_total),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("monitor_stall needs params: update(updates, state, params)")
        new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        treedef = flatten_params(params)[3]
        update_leaves = [unbox(u) for u in treedef.flatten_up_to(new_updates)]
        grad_leaves = [unbox(g) for g in treedef.flatten_up_to(updates)]
        old_totals = treedef.flatten_up_to(state.leaf_total)
        phase = None if every == 1 else _step_phase(state.steps, every)
        measured = list(iter_leaves(fmt, params))
        w32s = [None if f is None else jnp.asarray(w, jnp.float32) for _, _, w, f in measured]
        fmts = [f for *_, f in measured]
        scales = [
            None
            if f is None or isinstance(f, BlockFormat)
            else jnp.asarray(resolve_scale(scale, w32, f), jnp.float32)
            for w32, f in zip(w32s, fmts, strict=True)
        ]
        rounded = {} if phase is not None else _rounded_together(w32s, update_leaves, fmts, scales)
        leaf_last, leaf_total = [], []
        last = UpdateStats.zero(running=False)
        for i, leaf_fmt in enumerate(fmts):
            if leaf_fmt is None:
                leaf_last.append(None)
                leaf_total.append(None)
                continue
            w32, u, g = w32s[i], update_leaves[i], grad_leaves[i]
            if i in rounded:
                inputs, grid = rounded[i], _on_grid
                sums = _leaf_stats_by_dot if isinstance(leaf_fmt, BlockFormat) else _leaf_stats
            elif isinstance(leaf_fmt, BlockFormat):
                inputs = _block_grid_inputs(w32, jnp.asarray(u, jnp.float32), leaf_fmt)
                grid, sums = _on_grid, _leaf_stats_by_dot
            else:
                inputs, grid, sums = (w32, u), _tensor_grid(leaf_fmt, scales[i]), _leaf_stats
            leaf = (*inputs, u, g)
            if explicitly_sharded(w32):
                block = None if phase is None else (phase, every)
                stats = _leaf_stats_in_place(leaf, grid, block)
            else:
                if phase is None:
                    stats = sums(leaf, grid)
                else:
                    blocks, valid, count = _block(leaf, phase, every)
                    stats = sums(tuple(blocks), grid, valid, count)
            leaf_last.append(stats)
            leaf_total.append(old_totals[i].accumulate(stats))
            last = last.accumulate(stats)
        return new_updates, StallMonitorState(
            inner_state=inner_state,
            steps=state.steps.add(1),
            last=last,
            total=state.total.accumulate(last),
            leaf_last=treedef.unflatten(leaf_last),
            leaf_total=treedef.unflatten(leaf_total),
        )

    return optax.GradientTransformationExtraArgs(
        compiled_when_eager(init_fn), compiled_when_eager(update_fn)
    )


def stall_stats(opt_state: Any) -> StallMonitorState:
    """The state of the first :func:`monitor_stall` inside a (nested) optax state.

    Looks through ``chain``, ``inject_hyperparams``, ``MultiSteps``, a ``TrainState``'s and an
    ``nnx.Optimizer``'s ``opt_state`` (or the optimizer itself) and any other pytree of states;
    the result holds plain arrays. Raises ``ValueError`` when there is none.
    """
    states = find_states(opt_state, StallMonitorState)
    if not states:
        raise ValueError("opt_state holds no monitor_stall state")
    return states[0]
