"""Drop-ins for Flax's training containers that keep low-precision storage exactly on its grid.

``nnx.Optimizer.update`` and ``TrainState.apply_gradients`` add the updates with
``optax.apply_updates``. For the storage's updates that sum is exact on the grids of formats
with at most 4 exponent bits (see :mod:`altgrad_jax.optim.storage`), but from an off-grid start
or with wider exponents it can miss the grid by a float32 rounding. These subclasses run the
parent's step and then snap the stored leaves onto the grid recorded in the storage state
(:func:`snap_to_grid`), so they behave exactly like the library's :func:`apply_updates` loop.
Without a storage state in the optimizer they behave exactly like their parents.
"""

from __future__ import annotations

from typing import Any

from flax import nnx
from flax.training import train_state

from altgrad_jax.optim.storage import snap_to_grid

__all__ = ["GridOptimizer", "GridTrainState"]


class GridOptimizer(nnx.Optimizer):
    """``nnx.Optimizer`` whose update leaves stored weights exactly on the storage's grid.

    Use it as ``nnx.Optimizer``: ``GridOptimizer(model, tx, wrt=nnx.Param)`` and
    ``optimizer.update(model, grads)`` inside ``nnx.jit``.
    """

    def update(self, model: Any, grads: Any, /, **kwargs) -> Any:
        updates = super().update(model, grads, **kwargs)
        params = nnx.as_pure(nnx.state(model, self.wrt))
        nnx.update(model, snap_to_grid(params, nnx.as_pure(self.opt_state)))
        return updates


class GridTrainState(train_state.TrainState):
    """``TrainState`` whose ``apply_gradients`` leaves stored weights exactly on the grid.

    Create it as ``TrainState``: ``GridTrainState.create(apply_fn=..., params=..., tx=...)``.
    """

    def apply_gradients(self, *, grads: Any, **kwargs) -> GridTrainState:
        state = super().apply_gradients(grads=grads, **kwargs)
        return state.replace(params=snap_to_grid(state.params, state.opt_state))
