"""One non-finite weight tensor, or one non-finite update, stays in its own leaf.

Under ``monitor_stall`` around SGD and ``low_precision_storage``, a leaf whose weights hold an
inf and a leaf whose gradient turns inf at one step leave every other leaf exactly as in the
run where those two leaves are clean: the same stored weights, per-leaf statistics, scales,
residuals and master copies, bit for bit.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from altgrad_jax.optim import low_precision_storage, monitor_stall, stall_stats
from altgrad_jax.optim.storage import LowPrecisionState

STEPS, BAD_STEP = 3, 1
# Sorted by name, so the clean leaf comes after the bad ones (and its stochastic-rounding key,
# folded from its index, is the same in both runs).
INF_WEIGHT, INF_UPDATE, CLEAN = "a", "b", "c"
NAMES = (INF_WEIGHT, INF_UPDATE, CLEAN)
WEIGHT_AT, UPDATE_AT = (2, 1), (0, 3)


def _params(bad: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    # Ranges far from 1, so a scale from anything but the leaf's finite entries shows.
    params = {name: rng.standard_normal((8, 4), np.float32) * 30 for name in NAMES}
    params[INF_WEIGHT][WEIGHT_AT] = np.inf if bad else 0.0
    return params


def _grads(step: int, bad: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1 + step)
    grads = {name: rng.standard_normal((8, 4), np.float32) for name in NAMES}
    if step == BAD_STEP:
        grads[INF_UPDATE][UPDATE_AT] = -np.inf if bad else 0.0
    return grads


def _run(optimizer, step, bad: bool):
    params = _params(bad)
    state = optimizer.init(params)
    for i in range(STEPS):
        params, state = step(params, state, _grads(i, bad))
    return params, state


def _leaf_view(params, state) -> dict[str, list[np.ndarray]]:
    """Everything the run keeps about each leaf, as flat arrays."""
    monitor = stall_stats(state)
    storage = next(s for s in jax.tree.leaves(state, is_leaf=_is_storage) if _is_storage(s))
    view = {}
    for name in NAMES:
        kept = [params[name], monitor.leaf_last[name], monitor.leaf_total[name]]
        kept += [storage.scale[name], storage.residual, storage.master]
        kept = [x[name] if isinstance(x, dict) else x for x in kept]
        view[name] = [np.asarray(x) for x in jax.tree.leaves(kept)]
    return view


def _is_storage(node) -> bool:
    return isinstance(node, LowPrecisionState)


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint32) if x.dtype == np.float32 else x


@pytest.mark.parametrize(
    ("rule", "monitor_scale"),
    [("stochastic", "pow2"), ("compensated", "amax")],
)
def test_a_non_finite_leaf_leaves_the_others_exact(rule, monitor_scale):
    optimizer = monitor_stall(
        optax.chain(optax.sgd(1.0), low_precision_storage("E4M3", rule)),
        "E4M3",
        scale=monitor_scale,
    )

    @jax.jit
    def step(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    clean_params, clean_state = _run(optimizer, step, bad=False)
    bad_params, bad_state = _run(optimizer, step, bad=True)
    clean, bad = _leaf_view(clean_params, clean_state), _leaf_view(bad_params, bad_state)
    for ours, reference in zip(bad[CLEAN], clean[CLEAN], strict=True):
        np.testing.assert_array_equal(_bits(ours), _bits(reference))
    # The inf weight's neighbours are stored on the grid of their own range; the inf itself
    # stays visible (the storage's update t - w to it is inf - inf: NaN).
    weights, reference = np.array(bad_params[INF_WEIGHT]), np.array(clean_params[INF_WEIGHT])
    assert np.isnan(weights[WEIGHT_AT])
    weights[WEIGHT_AT] = reference[WEIGHT_AT] = 0
    np.testing.assert_array_equal(_bits(weights), _bits(reference))
    # E4M3 has no inf: the -inf update saturates, and that weight stays finite.
    assert np.all(np.isfinite(np.asarray(bad_params[INF_UPDATE])))
    assert bad_params[INF_UPDATE][UPDATE_AT] != clean_params[INF_UPDATE][UPDATE_AT]
