"""Stall monitoring: wrap any optax transform and measure what a format does to its updates.

For every float leaf the wrapper compares the quantized weight before and after the update the
inner transform produced, ``Q(w)`` and ``Q(w + u)``, at the leaf's format and scale:

* stall: ``|g| > 1e-10`` but ``Q(w + u) == Q(w)`` (the definition of :func:`detect_bit_stall`);
* flip rate: the fraction of weights whose quantized value (its code) changed;
* update rate: the fraction that received a non-zero update;
* histogram of ``|u| / ulp(w)`` in fixed bins (:data:`HISTOGRAM_LABELS`): below half a ULP
  round-to-nearest always stalls, so this shows *where* a format loses updates;
* landed ratio: ``sum|Q(w + u) - Q(w)| / sum|u|``, per step and over the run.

Wrapping the float optimizer (``monitor_stall(optax.adam(lr), fmt)``) shows what nearest
storage would keep. Wrapping a chain that ends in :func:`low_precision_storage` with
``scale="pow2"`` shows what the stored weights actually did (their grid is that scale's grid).
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from altgrad_jax.bits import ulp
from altgrad_jax.optim._common import (
    FormatSpec,
    RunningSum,
    check_format_spec,
    check_scale,
    find_states,
    iter_leaves,
    resolve_scale,
)
from altgrad_jax.quantize import quantize
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


def _as_float(value: Any) -> jax.Array:
    if isinstance(value, ExactCount):
        return value.to_float()
    if isinstance(value, RunningSum):
        return value.total
    return jnp.asarray(value, jnp.float32)


def _add_count(total: ExactCount, n: Any) -> ExactCount:
    """Adds a uint32 count or another :class:`ExactCount` exactly."""
    if not isinstance(n, ExactCount):
        return total.add(n)
    summed = total.add(n.low)
    return ExactCount(summed.high + n.high, summed.low)


class UpdateStats(NamedTuple):
    """Counts and sums of one update, or of a run of them.

    Counts are uint32 for one leaf and one step, :class:`ExactCount` for totals and runs; the
    sums are float32 for one step and :class:`RunningSum` for runs.
    """

    stalled: Any  # |g| > 1e-10 and the quantized weight did not change
    counted: Any  # |g| > 1e-10
    flipped: Any  # the quantized weight changed
    moved: Any  # u != 0
    entries: Any  # float entries looked at
    histogram: Any  # [len(HISTOGRAM_LABELS)] counts of |u| / ulp(w)
    landed: Any  # sum |Q(w + u) - Q(w)|
    requested: Any  # sum |u|

    @classmethod
    def zero(cls, running: bool = True) -> UpdateStats:
        """Exact-counter totals at zero; sums are running (Kahan) sums or plain float32."""
        bins = jnp.zeros((_NUM_BINS,), jnp.uint32)
        counts = [ExactCount.zero() for _ in range(5)]
        sums = [RunningSum.zero() if running else jnp.zeros((), jnp.float32) for _ in range(2)]
        return cls(*counts, ExactCount(bins, bins), *sums)

    def accumulate(self, step: UpdateStats) -> UpdateStats:
        """Adds one step's (or one leaf's) counts and sums to these totals."""
        return UpdateStats(
            *(_add_count(total, n) for total, n in zip(self[:6], step[:6], strict=True)),
            *(
                total.add(x) if isinstance(total, RunningSum) else total + x
                for total, x in zip(self[6:], step[6:], strict=True)
            ),
        )

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
    ``leaf_last`` and ``leaf_total`` have the params' structure (None for skipped leaves).
    """

    inner_state: Any
    steps: ExactCount
    last: UpdateStats
    total: UpdateStats
    leaf_last: Any
    leaf_total: Any


def _count_flags(flags: list[jax.Array]) -> list[jax.Array]:
    """Sums of several boolean arrays in one pass (a variadic reduction), as uint32.

    Separate sums of the same inputs become one multi-output loop that XLA's CPU backend runs
    far slower than this single reduction with several accumulators.
    """
    operands = [jnp.ravel(flag).astype(jnp.uint32) for flag in flags]
    zeros = [jnp.uint32(0)] * len(operands)
    return jax.lax.reduce(
        operands, zeros, lambda a, b: [x + y for x, y in zip(a, b, strict=True)], (0,)
    )


def _leaf_stats(
    w: jax.Array,
    u: jax.Array,
    g: jax.Array,
    fmt: Any,
    scale: float | str,
) -> UpdateStats:
    w32, u32 = jnp.asarray(w, jnp.float32), jnp.asarray(u, jnp.float32)
    s = resolve_scale(scale, w32, fmt)
    old, new = quantize(w32, fmt, s), quantize(w32 + u32, fmt, s)
    flipped = new != old
    counted = jnp.abs(g) > GRAD_THRESHOLD
    magnitude = jnp.abs(u32)
    spacing = ulp(old / s, fmt) * s
    level = sum((magnitude >= edge * spacing).astype(jnp.uint8) for edge in HISTOGRAM_EDGES)
    bins = jnp.where(u32 != 0, 1 + level, 0).astype(jnp.uint8)
    # One byte per entry: histogram bin, flipped, counted; all counts come from it.
    code = (bins << 2) | (flipped.astype(jnp.uint8) << 1) | counted.astype(jnp.uint8)
    # Materialised once by a parallel elementwise loop; the counting loop below then only
    # reads bytes instead of re-running the rounding kernels one element at a time.
    code = jax.lax.optimization_barrier(code)
    flags = [(code & 2) != 0, (code & 1) != 0, (code & 3) == 1]
    flags += [code >= 4 * k for k in range(1, _NUM_BINS)]
    n_flipped, n_counted, n_stalled, *at_least = _count_flags(flags)
    entries = jnp.asarray(w.size, jnp.uint32)
    cumulative = jnp.stack([entries, *at_least, jnp.uint32(0)])
    return UpdateStats(
        stalled=n_stalled,
        counted=n_counted,
        flipped=n_flipped,
        moved=at_least[0],
        entries=entries,
        histogram=cumulative[:-1] - cumulative[1:],
        landed=jnp.sum(jnp.abs(new - old)),
        requested=jnp.sum(magnitude),
    )


def _is_sampled_step(steps: ExactCount, every: int) -> jax.Array:
    """Whether the exact step count is a multiple of ``every`` (< 2**16, so nothing overflows)."""
    if every == 1:
        return jnp.bool_(True)
    e = jnp.uint32(every)
    wrap = jnp.uint32(2**32 % every)
    return ((steps.high % e) * wrap + steps.low % e) % e == 0


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
      fmt: one format for every float leaf (a FloatFormat, a name, or traced ``FormatParams``),
        or a rule ``(path, leaf) -> format | None`` such as :class:`altgrad_jax.rules.PathRules`
        (None skips the leaf). Non-float leaves are skipped.
      scale: "amax" (the seed's current scaling, ``compute_scale(max|w|)``, as in
        :func:`tree_bit_stall`), "pow2" (the grid of :func:`low_precision_storage`) or a fixed
        positive float.
      every: measure every ``every``-th step only (steps 0, every, 2 * every, ...), like a
        logging interval: the statistics cost about two rounding passes per weight, which on a
        CPU is as much as Adam's own arithmetic, and ``lax.cond`` skips them on other steps.
        ``last`` then holds the latest measured step and ``total`` sums measured steps only.

    Returns:
      A transformation with :class:`StallMonitorState`; read it with :func:`stall_stats`.
    """
    inner = optax.with_extra_args_support(inner)
    fmt = check_format_spec(fmt)
    scale = check_scale(scale)
    if isinstance(every, bool) or not isinstance(every, int) or not 1 <= every < 2**16:
        raise ValueError(f"every must be an int in [1, 65535], got {every!r}")

    def init_fn(params):
        treedef = jax.tree_util.tree_structure(params)
        leaf_last, leaf_total = [], []
        for _, _, w, leaf_fmt in iter_leaves(fmt, params):
            if leaf_fmt is None:
                leaf_last.append(None)
                leaf_total.append(None)
                continue
            if jnp.size(w) >= 2**32:
                raise ValueError(f"a leaf of {jnp.size(w)} entries overflows the uint32 counts")
            zero = jnp.zeros((), jnp.uint32)
            leaf_last.append(
                UpdateStats(*[zero] * 5, jnp.zeros((_NUM_BINS,), jnp.uint32), *[jnp.float32(0)] * 2)
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
        if every == 1:
            # Computed once: otherwise every statistic re-runs the optimizer's arithmetic.
            # (Operands of a cond are materialised anyway.)
            new_updates = jax.lax.optimization_barrier(new_updates)
        treedef = jax.tree_util.tree_structure(params)

        def measure(operands):
            params, new_updates, updates, old = operands  # old: the state without inner_state
            update_leaves = treedef.flatten_up_to(new_updates)
            grad_leaves = treedef.flatten_up_to(updates)
            old_totals = treedef.flatten_up_to(old.leaf_total)
            leaf_last, leaf_total = [], []
            last = UpdateStats.zero(running=False)
            for i, _, w, leaf_fmt in iter_leaves(fmt, params):
                if leaf_fmt is None:
                    leaf_last.append(None)
                    leaf_total.append(None)
                    continue
                stats = _leaf_stats(w, update_leaves[i], grad_leaves[i], leaf_fmt, scale)
                leaf_last.append(stats)
                leaf_total.append(old_totals[i].accumulate(stats))
                last = last.accumulate(stats)
            return old._replace(
                last=last,
                total=old.total.accumulate(last),
                leaf_last=treedef.unflatten(leaf_last),
                leaf_total=treedef.unflatten(leaf_total),
            )

        # The inner state stays out of the cond: carried through it, it would be copied.
        operands = (params, new_updates, updates, state._replace(inner_state=None))
        if every == 1:
            measured = measure(operands)
        else:
            measured = jax.lax.cond(
                _is_sampled_step(state.steps, every), measure, lambda ops: ops[3], operands
            )
        return new_updates, measured._replace(inner_state=inner_state, steps=state.steps.add(1))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def stall_stats(opt_state: Any) -> StallMonitorState:
    """The state of the first :func:`monitor_stall` inside a (nested) optax state.

    Looks through ``chain``, ``inject_hyperparams``, ``MultiSteps`` and any other pytree of
    states. Raises ``ValueError`` when there is none.
    """
    states = find_states(opt_state, StallMonitorState)
    if not states:
        raise ValueError("opt_state holds no monitor_stall state")
    return states[0]
