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

For formats with up to 4 exponent bits (E4M3 and narrower, the MX element formats), ``w + (t -
w)`` is exactly ``t`` in float32 for every pair of grid values, so once the weights are on the
grid ``optax.apply_updates`` keeps them there. From an off-grid start, or with wider exponents
(where a jump across ~20 binades can round), use :func:`apply_updates`, which snaps the sum onto
the grid the storage rounded to.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from altgrad_jax.formats import FloatFormat, FormatParams
from altgrad_jax.optim._common import (
    RunningSum,
    check_scale,
    find_states,
    iter_leaves,
    resolve_scale,
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
]

StorageRule = Literal["nearest", "stochastic", "compensated", "master"]
STORAGE_RULES: tuple[str, ...] = ("nearest", "stochastic", "compensated", "master")


class LandedStats(NamedTuple):
    """How much of the requested movement reached the stored weights: sum|t - w| vs sum|u|.

    A per-step ratio near 0 is harmless when stochastic rounding or a master copy keeps the
    movement in expectation (the run ratio stays near 1) and fatal under nearest storage (the
    run ratio stays near 0).
    """

    landed: jax.Array  # this step, float32
    requested: jax.Array
    run_landed: RunningSum
    run_requested: RunningSum

    @classmethod
    def zero(cls) -> LandedStats:
        zero = jnp.zeros((), jnp.float32)
        return cls(zero, zero, RunningSum.zero(), RunningSum.zero())

    def add(self, landed: jax.Array, requested: jax.Array) -> LandedStats:
        return LandedStats(
            landed, requested, self.run_landed.add(landed), self.run_requested.add(requested)
        )

    @property
    def ratio(self) -> jax.Array:
        """Landed over requested movement in the last step (0 when nothing was requested)."""
        return safe_ratio(self.landed, self.requested)

    @property
    def run_ratio(self) -> jax.Array:
        """Landed over requested movement over the whole run."""
        return safe_ratio(self.run_landed.total, self.run_requested.total)


@flax.struct.dataclass
class LowPrecisionState:
    """State of :func:`low_precision_storage`.

    Attributes:
      scale: per leaf, the float32 scale the stored weights were last rounded with (None for
        leaves that are not stored); :func:`apply_updates` snaps to this grid.
      key: PRNG key (``stochastic``), else None.
      residual: per leaf, the rounding error carried to the next step (``compensated``).
      master: per leaf, the float32 master weights (``master``).
      landed: requested vs landed movement, see :class:`LandedStats`.
      traced_format: the format when it was given as traced ``FormatParams``, else None.
      formats: static; per flattened leaf, its FloatFormat, "traced" or None (not stored).
    """

    scale: Any
    key: jax.Array | None
    residual: Any
    master: Any
    landed: LandedStats
    traced_format: FormatParams | None
    formats: tuple = flax.struct.field(pytree_node=False)


def _stored_formats(fmt: FormatSpec, params: Any) -> tuple[FloatFormat | str | None, ...]:
    out = []
    for _, path, _, leaf_fmt in iter_leaves(fmt, params):
        if isinstance(leaf_fmt, FormatParams) and not isinstance(fmt, FormatParams):
            raise ValueError(
                f"the rule gave traced FormatParams for {path_str(path)!r}; pass traced formats "
                "as the single format, and static formats (or None) from rules"
            )
        out.append("traced" if isinstance(leaf_fmt, FormatParams) else leaf_fmt)
    return tuple(out)


def _leaf_fmt(state: LowPrecisionState, index: int) -> FloatFormat | FormatParams | None:
    fmt = state.formats[index]
    return state.traced_format if fmt == "traced" else fmt


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
      A transformation whose updates are ``t - w``; ``update`` needs ``params``. A zero update
      leaves weights that are on the grid unchanged (and an off-grid start is snapped to it).
    """
    if rule not in STORAGE_RULES:
        raise ValueError(f"unknown storage rule {rule!r}; expected one of {STORAGE_RULES}")
    fmt = check_format_spec(fmt)
    scale = check_scale(scale)
    if scale == "amax":
        raise ValueError(
            "scale='amax' re-scales stored weights every step and drifts; use 'pow2' or a float"
        )

    def init_fn(params):
        formats = _stored_formats(fmt, params)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        stored = [f is not None for f in formats]

        def per_leaf(make):
            return treedef.unflatten(
                [make(w) if keep else None for w, keep in zip(leaves, stored, strict=True)]
            )

        key = None
        if rule == "stochastic":
            key = jax.random.key(seed) if isinstance(seed, int) else seed
        return LowPrecisionState(
            scale=per_leaf(lambda w: jnp.ones((), jnp.float32)),
            key=key,
            residual=per_leaf(lambda w: jnp.zeros(jnp.shape(w), jnp.float32))
            if rule == "compensated"
            else None,
            master=per_leaf(lambda w: jnp.asarray(w, jnp.float32)) if rule == "master" else None,
            landed=LandedStats.zero(),
            traced_format=fmt if isinstance(fmt, FormatParams) else None,
            formats=formats,
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("low_precision_storage needs params: update(updates, state, params)")
        leaves, treedef = jax.tree_util.tree_flatten(params)
        # Computed once: otherwise every reduction below re-runs the optimizer's arithmetic.
        update_leaves = treedef.flatten_up_to(jax.lax.optimization_barrier(updates))
        scales = treedef.flatten_up_to(state.scale)
        residuals = treedef.flatten_up_to(state.residual) if rule == "compensated" else None
        masters = treedef.flatten_up_to(state.master) if rule == "master" else None
        key, step_key = (None, None) if state.key is None else jax.random.split(state.key)

        out, new_scales = list(update_leaves), list(scales)
        new_residuals = list(residuals) if residuals is not None else None
        new_masters = list(masters) if masters is not None else None
        landed = requested = jnp.zeros((), jnp.float32)
        for i, (w, u) in enumerate(zip(leaves, update_leaves, strict=True)):
            leaf_fmt = _leaf_fmt(state, i)
            if leaf_fmt is None:
                continue
            w32, u32 = jnp.asarray(w, jnp.float32), jnp.asarray(u, jnp.float32)
            if rule == "compensated":
                x = w32 + (u32 + residuals[i])
            elif rule == "master":
                x = new_masters[i] = masters[i] + u32
            else:
                x = w32 + u32
            s = resolve_scale(scale, x, leaf_fmt)
            if rule == "stochastic":
                leaf_key = jax.random.fold_in(step_key, i)
                t = quantize(x, leaf_fmt, s, rounding="stochastic", key=leaf_key)
            else:
                t = quantize(x, leaf_fmt, s)
            if rule == "compensated":
                new_residuals[i] = x - t
            delta = t - w32
            out[i] = delta.astype(jnp.asarray(w).dtype)
            new_scales[i] = jnp.asarray(s, jnp.float32)
            landed = landed + jnp.sum(jnp.abs(delta))
            requested = requested + jnp.sum(jnp.abs(u32))

        new_state = state.replace(
            scale=treedef.unflatten(new_scales),
            key=key,
            residual=treedef.unflatten(new_residuals) if new_residuals is not None else None,
            master=treedef.unflatten(new_masters) if new_masters is not None else None,
            landed=state.landed.add(landed, requested),
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def apply_updates(params: Any, updates: Any, opt_state: Any) -> Any:
    """``optax.apply_updates`` that lands stored leaves exactly on their grid.

    Snaps ``params + updates`` to the nearest value of the grid the storage in ``opt_state``
    rounded to this step. That is a no-op whenever the sum is already exact (always for float32
    weights on the grid of a format with at most 4 exponent bits), and otherwise repairs an
    off-grid start, a jump across many binades, or an update rounded to a narrower dtype.
    Raises ``ValueError`` when ``opt_state`` holds no storage state.
    """
    states = find_states(opt_state, LowPrecisionState)
    if not states:
        raise ValueError("opt_state holds no low_precision_storage state to snap to")
    new_params = optax.apply_updates(params, updates)
    leaves, treedef = jax.tree_util.tree_flatten(new_params)
    for state in states:
        scales = treedef.flatten_up_to(state.scale)
        for i, w in enumerate(leaves):
            leaf_fmt = _leaf_fmt(state, i)
            if leaf_fmt is not None:
                leaves[i] = quantize(w, leaf_fmt, scales[i])
    return treedef.unflatten(leaves)


def landed_stats(opt_state: Any) -> LandedStats:
    """The :class:`LandedStats` of the first :func:`low_precision_storage` in ``opt_state``."""
    states = find_states(opt_state, LowPrecisionState)
    if not states:
        raise ValueError("opt_state holds no low_precision_storage state")
    return states[0].landed
