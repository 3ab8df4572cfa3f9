"""optax transforms for low-precision training: stall monitoring, grid storage, ULP-aware steps.

Usage (``monitor_stall`` reports what nearest storage would lose, the storage keeps the
weights on the grid and records what actually landed)::

    opt = optax.chain(monitor_stall(optax.adam(1e-3), "e5m2"),
                      low_precision_storage("e5m2", "stochastic"))
    opt_state = opt.init(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = apply_updates(params, updates, opt_state)  # exactly on the E5M2 grid
    rates = stall_stats(opt_state).last.summary(), landed_stats(opt_state).run_ratio

Formats are a FloatFormat, a name, a ``PathRules`` (path -> format | None), or traced
``FormatParams`` arrays, so one jitted step serves every format.
"""

from altgrad_jax._pytree import register_flax_serialization
from altgrad_jax.optim._common import pow2_scale
from altgrad_jax.optim.flax_train import GridOptimizer, GridTrainState
from altgrad_jax.optim.monitor import (
    HISTOGRAM_EDGES,
    HISTOGRAM_LABELS,
    StallMonitorState,
    UpdateStats,
    monitor_stall,
    stall_stats,
)
from altgrad_jax.optim.storage import (
    STORAGE_RULES,
    LandedStats,
    LowPrecisionState,
    apply_updates,
    landed_stats,
    low_precision_storage,
    snap_to_grid,
)
from altgrad_jax.optim.ulp_updates import (
    GridSGDState,
    grid_sgd,
    grid_to_rung,
    rung_to_grid,
    scale_by_stiffness,
    scale_by_ulp,
)

__all__ = [
    "HISTOGRAM_EDGES",
    "HISTOGRAM_LABELS",
    "STORAGE_RULES",
    "GridOptimizer",
    "GridSGDState",
    "GridTrainState",
    "LandedStats",
    "LowPrecisionState",
    "StallMonitorState",
    "UpdateStats",
    "apply_updates",
    "grid_sgd",
    "grid_to_rung",
    "landed_stats",
    "low_precision_storage",
    "monitor_stall",
    "pow2_scale",
    "rung_to_grid",
    "scale_by_stiffness",
    "scale_by_ulp",
    "snap_to_grid",
    "stall_stats",
]

register_flax_serialization()  # checkpoints of the core pytrees via flax.serialization
