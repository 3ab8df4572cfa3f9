"""optax transforms for low-precision training: stall monitoring, grid storage, ULP-aware steps.

Usage::

    opt = optax.chain(optax.adam(1e-3), low_precision_storage("e5m2", "stochastic"))
    opt = monitor_stall(opt, "e5m2", scale="pow2")      # stats of what the stored weights did
    updates, opt_state = opt.update(grads, opt_state, params)
    params = apply_updates(params, updates, opt_state)  # exactly on the E5M2 grid
    stall_stats(opt_state).total.stall_rate, landed_stats(opt_state).run_ratio

Formats are a FloatFormat, a name, a ``PathRules`` (path -> format | None), or traced
``FormatParams`` arrays, so one jitted step serves every format.
"""

from altgrad_jax.optim._common import grid_spacing, pow2_scale
from altgrad_jax.optim.storage import (
    STORAGE_RULES,
    LandedStats,
    LowPrecisionState,
    apply_updates,
    low_precision_storage,
)

__all__ = [
    "STORAGE_RULES",
    "LandedStats",
    "LowPrecisionState",
    "apply_updates",
    "grid_spacing",
    "low_precision_storage",
    "pow2_scale",
]
