"""Low-precision weight storage: weights that live on a format's grid after every step.

``low_precision_storage(fmt, rule)`` goes last in an ``optax.chain``. It turns the update the
optimizer asked for, ``u``, into the update that lands the weights on the grid, ``t - w``, where
the new stored weight ``t`` follows the rule:

* ``nearest``: ``t = Q(w + u)``, the plain case, where updates below half a ULP stall;
* ``stochastic``: ``t = SR(w + u)``, unbiased in expectation (Gupta et al., 2015);
* ``compensated``: error feedback, ``t = Q(w + u + r)`` and ``r <- (w + u + r) - t``, so no
  update is lost in the long run (Kahan summation applied to training; cf. Zamirai et al., 2020,
  "Revisiting BFloat16 Training");
* ``master``: a float32 master copy ``m <- m + u`` in the state, stored weights ``t = Q(m)``:
  standard mixed-precision practice, the baseline.

The scale of a leaf is the smallest power of two at which its weights fit the format
(:func:`pow2_scale`), or a fixed number. It rises only when the amax leaves the format's range
(rounding away only values below the new smallest step); when it falls, the finer grid holds
every stored value, so nothing moves. Being a function of the weights, it needs no state, and
the monitor and the ULP-aware transforms find the same grid. The seed's ``amax * 1.01 / max``
re-applied every step instead moves every weight onto a new grid and inflates the largest one
by ~1% per step.

The update is returned in float32 (for float32, bfloat16 and float16 weights), so
``optax.apply_updates`` computes ``w + (t - w)`` in float32 before casting back. For formats
with up to 4 exponent bits (E4M3 and narrower, the MX element formats) ``t - w`` is exact in
float32 for every pair of grid values (a test checks every pair), so the sum is exactly ``t``:
once the weights are on the grid, plain ``optax.apply_updates`` (as in ``nnx.Optimizer`` and
``TrainState.apply_gradients``) keeps them there, for float32 and bfloat16 weights alike. From an
off-grid start, or with wider exponents (where a jump across ~20 binades rounds), use
:func:`apply_updates`, :class:`GridOptimizer` or :class:`GridTrainState`, which snap the sum onto
the grid the storage rounded to.

Block formats (MXFP8/6/4, NVFP4, tiles) store each leaf with the scales of its own blocks,
recomputed every step from the candidate weights ``w + u`` by the format's scale rule (see
:mod:`altgrad_jax.blocks`); 1-D blocks run along a kernel's input-feature axis (axis -2, the
contraction axis of Flax's Dense and Conv kernels) and along the only axis of a vector. Under
``nearest`` a zero update leaves every stored weight unchanged: with the ``rceil`` rule the
block maximum keeps its scale, and a block whose maximum rounded down halves its scale, which
holds every stored value exactly. The ``scale`` of such leaves in the state is 1.

Small leaves of one format are rounded together, as one vector with per-entry scales or as the
rows of their MX blocks (:func:`~altgrad_jax.optim._common.leaf_groups`): each leaf gets the
values it would get alone, in one kernel instead of one per leaf. A stochastic group draws its
random bits from one key.

The landed movement is measured against what the same rule would have stored for a zero update
(the same scale and random bits): only the movement the update caused counts as landed. The
difference between that and the current weights, the projection of an off-grid start (or of a
rescaled grid), is reported apart as ``projected``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from altgrad_jax._checks import check_choice, choices_of
from altgrad_jax._eager import compiled_when_eager
from altgrad_jax.formats import BlockFormat, FloatFormat, FormatParams
from altgrad_jax.optim._common import (
    LeafFormat,
    RunningSum,
    block_rows,
    check_scale,
    concat_leaves,
    find_states,
    flatten_params,
    from_block_rows,
    iter_leaves,
    leaf_groups,
    per_entry,
    rebox,
    resolve_scale,
    split_leaves,
    unbox,
)
from altgrad_jax.quantize import quantize
from altgrad_jax.rules import FormatSpec, check_format_spec, path_str
from altgrad_jax.stall import safe_ratio

__all__ = [
    "STORAGE_RULES",
    "LandedStats",
    "LowPrecisionState",
    "apply_updates",
    "landed_stats",
    "low_precision_storage",
    "snap_to_grid",
]

StorageRule = Literal["nearest", "stochastic", "compensated", "master"]
STORAGE_RULES: tuple[str, ...] = choices_of(StorageRule)


class LandedStats(NamedTuple):
    """How much of the requested movement reached the stored weights: sum|t - t0| vs sum|u|.

    ``t0`` is what the rule would have stored for a zero update, so the initial projection of
    float weights onto the grid (and a rescale) is not counted as landed: it is ``projected``,
    sum|t0 - w|. A per-step ratio near 0 is harmless when stochastic rounding or a master copy
    keeps the movement in expectation (the run ratio stays near 1) and fatal under nearest
    storage (the run ratio stays near 0).
    """

    landed: jax.Array  # this step, float32
    requested: jax.Array
    projected: jax.Array
    run_landed: RunningSum
    run_requested: RunningSum
    run_projected: RunningSum

    @classmethod
    def zero(cls) -> LandedStats:
        zero = jnp.zeros((), jnp.float32)
        return cls(zero, zero, zero, RunningSum.zero(), RunningSum.zero(), RunningSum.zero())

    def add(self, landed: jax.Array, requested: jax.Array, projected: jax.Array) -> LandedStats:
        return LandedStats(
            landed,
            requested,
            projected,
            self.run_landed.add(landed),
            self.run_requested.add(requested),
            self.run_projected.add(projected),
        )

    @property
    def ratio(self) -> jax.Array:
        """Landed over requested movement in the last step (0 when nothing was requested)."""
        return safe_ratio(self.landed, self.requested)

    @property
    def run_ratio(self) -> jax.Array:
        """Landed over requested movement over the whole run."""
        return safe_ratio(self.run_landed.total, self.run_requested.total)


class LowPrecisionState(NamedTuple):
    """State of :func:`low_precision_storage`.

    Every field is a pytree of arrays (a NamedTuple, so ``optax.tree_utils.tree_get(state,
    "LowPrecisionState")`` finds it). Per-layer entries (``scale``, ``grid``) have the params'
    structure without their boxes, so they get a replicated partition spec; per-entry ones
    (``residual``, ``master``) keep each parameter's box and so its sharding.

    Attributes:
      scale: per leaf, the float32 scale the stored weights were last rounded with (None for
        leaves that are not stored); :func:`apply_updates` snaps to this grid.
      grid: per stored leaf, its format (None for the others), so the grid can be rebuilt
        from the state alone: a traced format as its ``FormatParams`` arrays, a static one as
        a :class:`StaticGrid` (no arrays).
      key: PRNG key (``stochastic``), else None.
      residual: per leaf, the rounding error carried to the next step (``compensated``).
      master: per leaf, the float32 master weights (``master``).
      landed: requested vs landed movement, see :class:`LandedStats`.
      settled: whether the storage has stepped (the weights are then its grid values).
    """

    scale: Any
    grid: Any
    key: jax.Array | None
    residual: Any
    master: Any
    landed: LandedStats
    settled: jax.Array


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class StaticGrid:
    """A static format (per-tensor or block) in the state's ``grid``: it has no arrays, so it
    is part of the program (a block format's scales live in its blocks)."""

    format: FloatFormat | BlockFormat


def storage_axis(fmt: BlockFormat, ndim: int) -> int | None:
    """The blocked axis of a stored (or monitored) leaf of ``ndim`` dimensions: a kernel's input
    features (-2, the contraction axis of Flax's Dense and Conv kernels), a vector's only axis;
    None (the last two axes) for 2-D tiles."""
    if len(fmt.block_shape) == 2:
        return None
    return -2 if ndim >= 2 else -1


def joined_blocks(
    xs: list[jax.Array], fmt: BlockFormat
) -> tuple[jax.Array, Callable[[jax.Array], list[jax.Array]]]:
    """The 1-D blocks of ``xs`` (along each leaf's :func:`storage_axis`) as the rows of one
    matrix (:func:`~altgrad_jax.optim._common.block_rows`), and the function that cuts such a
    matrix back into arrays shaped like ``xs``."""
    size = fmt.block_shape[0]
    axes = [storage_axis(fmt, x.ndim) for x in xs]
    rows = [block_rows(x, size, axis) for x, axis in zip(xs, axes, strict=True)]
    cuts = np.cumsum([len(r) for r in rows])[:-1].tolist()

    def split(matrix: jax.Array) -> list[jax.Array]:
        parts = jnp.split(matrix, cuts)
        return [from_block_rows(p, x, a) for p, x, a in zip(parts, xs, axes, strict=True)]

    return jnp.concatenate(rows), split


def store(x: jax.Array, fmt: Any, s: Any, rounding: str, key: jax.Array | None) -> jax.Array:
    """``x`` rounded onto a leaf's grid: per-tensor ``fmt`` at scale ``s``, or its blocks."""
    if isinstance(fmt, StaticGrid):
        fmt = fmt.format
    if isinstance(fmt, BlockFormat):
        axis = storage_axis(fmt, x.ndim)
        return quantize(x, fmt, rounding=rounding, key=key, axis=axis)
    return quantize(x, fmt, s, rounding=rounding, key=key)


def _grid_entry(fmt: LeafFormat | BlockFormat) -> Any:
    if isinstance(fmt, FormatParams):
        return fmt.as_arrays(within=())  # its own bounds: bfloat16 params fit
    return StaticGrid(fmt)


def _store_group(
    xs: list[jax.Array], fmt: Any, scales: list[Any], rounding: str, key: jax.Array | None
) -> list[jax.Array]:
    """Each of ``xs`` (one :func:`leaf_groups` group) rounded onto its grid by one
    :func:`store`: a single leaf in place; several as one raveled vector with per-entry scales
    (per-tensor formats) or as the rows of their blocks (block formats)."""
    if len(xs) == 1:
        return [store(xs[0], fmt, scales[0], rounding, key)]
    if isinstance(fmt, BlockFormat):
        rows, split = joined_blocks(xs, fmt)
        return split(quantize(rows, fmt, rounding=rounding, key=key, axis=-1))
    stored = store(concat_leaves(xs), fmt, per_entry(scales, xs), rounding, key)
    return split_leaves(stored, xs)


def _zero_update_result(
    ws: list[jax.Array],
    x0s: list[jax.Array],
    fmt: Any,
    scales: list[jax.Array],
    rounding: str,
    key: jax.Array | None,
    settled: jax.Array,
) -> tuple[list[jax.Array], list[jax.Array]]:
    """What the rule stores for a zero update, ``t0``, and the projections ``sum|t0 - w|``, of
    one group.

    Once the storage has stepped and the grid (scale) is unchanged, the weights are the last
    step's grid values and ``t0`` is ``w`` for every rule (``w + r`` and ``m`` round back to
    ``w``), so the rounding pass is skipped (``lax.cond``; under ``vmap`` both sides run).
    """

    def project():
        t0s = _store_group(x0s, fmt, scales, rounding, key)
        return t0s, [jnp.sum(jnp.abs(t0 - w)) for t0, w in zip(t0s, ws, strict=True)]

    zeros = [jnp.zeros((), jnp.float32)] * len(ws)
    return jax.lax.cond(settled, lambda: (ws, zeros), project)


def _static_formats(grids: list[Any]) -> list[Any]:
    """A state's grid entries as formats: static ones unwrapped, traced ones as one object
    (the storage stores one traced format at most, see :func:`_stored_formats`)."""
    traced = next((g for g in grids if isinstance(g, FormatParams)), None)
    return [
        g.format if isinstance(g, StaticGrid) else traced if isinstance(g, FormatParams) else g
        for g in grids
    ]


def _stored_formats(fmt: FormatSpec, params: Any) -> list[LeafFormat | None]:
    out = []
    for _, path, _, leaf_fmt in iter_leaves(fmt, params):
        if isinstance(leaf_fmt, FormatParams) and not isinstance(fmt, FormatParams):
            raise ValueError(
                f"the rule gave traced FormatParams for {path_str(path)!r}; pass traced formats "
                "as the single format, and static formats (or None) from rules"
            )
        out.append(leaf_fmt)
    return out


def _update_dtype(w: Any) -> Any:
    """float32 for float32 and narrower weights (so ``w + u`` is a float32 sum), else w's."""
    return jnp.promote_types(jnp.asarray(w).dtype, jnp.float32)


def low_precision_storage(
    fmt: FormatSpec,
    rule: StorageRule = "nearest",
    *,
    scale: float | Literal["pow2"] = "pow2",
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    """Keeps the weights on ``fmt``'s grid, updating them by ``rule``; goes last in a chain.

    Args:
      fmt: one format for every float leaf (a FloatFormat, a name, or traced ``FormatParams``),
        or a rule ``(path, leaf) -> format | None`` such as :class:`altgrad_jax.rules.PathRules`
        (None leaves a leaf in float32). Non-float leaves pass through.
      rule: "nearest", "stochastic", "compensated" or "master" (see the module docstring).
      scale: "pow2" (the smallest power of two at which the leaf fits, recomputed from the
        candidate weights each step) or a fixed positive float.
      seed: PRNG seed (an int or a key) for ``stochastic``.

    Returns:
      A transformation whose updates are ``t - w`` (float32 for float32 and narrower weights);
      ``update`` needs ``params``. A zero update leaves weights that are on the grid unchanged
      (and an off-grid start is snapped to it).
    """
    check_choice("storage rule", rule, STORAGE_RULES)
    fmt = check_format_spec(fmt)
    scale = check_scale(scale)
    if scale == "amax":
        raise ValueError(
            "scale='amax' re-scales stored weights every step and drifts; use 'pow2' or a float"
        )

    def init_fn(params):
        formats = _stored_formats(fmt, params)
        _, boxes, leaves, layout = flatten_params(params)

        def per_leaf(make):
            return layout.unflatten([None if f is None else make(f) for f in formats])

        def per_entry(make):
            return layout.unflatten(
                [
                    None if f is None else rebox(box, make(w))
                    for box, w, f in zip(boxes, leaves, formats, strict=True)
                ]
            )

        key = None
        if rule == "stochastic":
            key = jax.random.key(seed) if isinstance(seed, int) else seed
        return LowPrecisionState(
            scale=per_leaf(lambda f: jnp.ones((), jnp.float32)),
            grid=per_leaf(_grid_entry),
            key=key,
            residual=per_entry(lambda w: jnp.zeros_like(w, jnp.float32))
            if rule == "compensated"
            else None,
            master=per_entry(lambda w: jnp.asarray(w, jnp.float32)) if rule == "master" else None,
            landed=LandedStats.zero(),
            settled=jnp.zeros((), jnp.bool_),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("low_precision_storage needs params: update(updates, state, params)")
        formats = _stored_formats(fmt, params)
        _, _, leaves, layout = flatten_params(params)
        # Computed once: otherwise every reduction below re-runs the optimizer's arithmetic.
        update_boxes = layout.flatten_up_to(jax.lax.optimization_barrier(updates))
        # A traced format is read from the state, not a closure; one object for all its leaves.
        grids = _static_formats(layout.flatten_up_to(state.grid))
        scales = layout.flatten_up_to(state.scale)
        residuals = layout.flatten_up_to(state.residual) if rule == "compensated" else None
        masters = layout.flatten_up_to(state.master) if rule == "master" else None
        key, step_key = (None, None) if state.key is None else jax.random.split(state.key)

        out, new_scales = list(update_boxes), list(scales)
        new_residuals = list(residuals) if residuals is not None else None
        new_masters = list(masters) if masters is not None else None
        n = len(leaves)
        w32s, xs, x0s, grid_fmts = [None] * n, [None] * n, [None] * n, [None] * n
        requested = jnp.zeros((), jnp.float32)
        for i, (w, u_box) in enumerate(zip(leaves, update_boxes, strict=True)):
            leaf_fmt = formats[i]
            if leaf_fmt is None:
                continue
            if isinstance(leaf_fmt, FormatParams):
                leaf_fmt = grids[i]
            w32, u32 = jnp.asarray(w, jnp.float32), jnp.asarray(unbox(u_box), jnp.float32)
            if rule == "compensated":
                r = unbox(residuals[i])
                x, x0 = w32 + (u32 + r), w32 + r
            elif rule == "master":
                m = unbox(masters[i])
                x, x0 = m + u32, m
                new_masters[i] = rebox(masters[i], x)
            else:
                x, x0 = w32 + u32, w32
            if isinstance(leaf_fmt, BlockFormat):
                new_scales[i] = jnp.ones((), jnp.float32)  # the scales live in the blocks
            else:
                new_scales[i] = jnp.asarray(resolve_scale(scale, x, leaf_fmt), jnp.float32)
            w32s[i], xs[i], x0s[i], grid_fmts[i] = w32, x, x0, leaf_fmt
            requested = requested + jnp.sum(jnp.abs(u32))

        rounding = "stochastic" if rule == "stochastic" else "nearest"
        landed = projected = jnp.zeros((), jnp.float32)
        for group in leaf_groups(xs, grid_fmts):
            idx = group.leaves
            # A group's random bits come from its first leaf's index (a lone leaf: its own).
            group_key = None if step_key is None else jax.random.fold_in(step_key, idx[0])
            group_scales = [new_scales[i] for i in idx]
            ts = _store_group([xs[i] for i in idx], group.fmt, group_scales, rounding, group_key)
            unchanged = state.settled
            for i in idx:
                unchanged = unchanged & (new_scales[i] == scales[i])
            t0s, projections = _zero_update_result(
                [w32s[i] for i in idx], [x0s[i] for i in idx], group.fmt, group_scales,
                rounding, group_key, unchanged,
            )  # fmt: skip
            for i, t, t0, projection in zip(idx, ts, t0s, projections, strict=True):
                if rule == "compensated":
                    new_residuals[i] = rebox(residuals[i], xs[i] - t)
                out[i] = rebox(update_boxes[i], (t - w32s[i]).astype(_update_dtype(leaves[i])))
                landed = landed + jnp.sum(jnp.abs(t - t0))
                projected = projected + projection

        new_state = state._replace(
            scale=layout.unflatten(new_scales),
            key=key,
            residual=layout.unflatten(new_residuals) if new_residuals is not None else None,
            master=layout.unflatten(new_masters) if new_masters is not None else None,
            landed=state.landed.add(landed, requested, projected),
            settled=jnp.ones((), jnp.bool_),
        )
        return layout.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(
        compiled_when_eager(init_fn), compiled_when_eager(update_fn)
    )


def snap_to_grid(params: Any, opt_state: Any) -> Any:
    """``params`` with every stored leaf rounded to the grid of the storage in ``opt_state``.

    The grid is the one the storage rounded to in its last step (its format and scale, read
    from the state). A no-op for weights already on it; ``params`` without a storage state in
    ``opt_state`` are returned as they are. Boxes (NNX variables, Linen partitioning) are kept.
    """
    _, boxes, leaves, layout = flatten_params(params)
    for state in find_states(opt_state, LowPrecisionState):
        grids = _static_formats(layout.flatten_up_to(state.grid))
        scales = layout.flatten_up_to(state.scale)
        for group in leaf_groups(leaves, grids):
            idx = group.leaves
            stored = _store_group(
                [leaves[i] for i in idx], group.fmt, [scales[i] for i in idx], "nearest", None
            )
            for i, t in zip(idx, stored, strict=True):
                leaves[i] = t
    return layout.unflatten([rebox(b, w) for b, w in zip(boxes, leaves, strict=True)])


@compiled_when_eager
def apply_updates(params: Any, updates: Any, opt_state: Any) -> Any:
    """``optax.apply_updates`` that lands stored leaves exactly on their grid.

    Snaps ``params + updates`` to the nearest value of the grid the storage in ``opt_state``
    rounded to this step (:func:`snap_to_grid`). That is a no-op whenever the sum is already
    exact (always for weights on the grid of a format with at most 4 exponent bits), and
    otherwise repairs an off-grid start or a jump across many binades. The stored value is
    exactly the storage's ``t`` unless a weight shrinks by more than ``2**(23 - M)`` in one
    step (then ``t - w`` has no float32 representation close enough to ``t``).
    Raises ``ValueError`` when ``opt_state`` holds no storage state.
    """
    if not find_states(opt_state, LowPrecisionState):
        raise ValueError("opt_state holds no low_precision_storage state to snap to")
    return snap_to_grid(optax.apply_updates(params, updates), opt_state)


def landed_stats(opt_state: Any) -> LandedStats:
    """The :class:`LandedStats` of the first :func:`low_precision_storage` in ``opt_state``.

    Looks through chains, a ``TrainState``'s and an ``nnx.Optimizer``'s ``opt_state``.
    """
    states = find_states(opt_state, LowPrecisionState)
    if not states:
        raise ValueError("opt_state holds no low_precision_storage state")
    return states[0].landed
