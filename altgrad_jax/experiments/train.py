"""The train step of the sweep, with the format as a traced value.

One step samples a batch, runs the quantized model forward and backward, lets Adam propose an
update ``u``, lets the update rule store the weights (plain float32, or on the format's grid), and
measures what the format did to the step: bit-stall, flips, saturation and underflow, and the
histogram of ``|u| / ulp(w)``. A chunk of steps runs as one ``lax.scan``.

Passing the format as :class:`FormatParams` arrays makes it data rather than program: one
compilation serves every format, and ``vmap`` over a stack of formats trains several in one
program. Passing a :class:`FloatFormat` gives the static program, which the tests compare against.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from altgrad_jax import optim
from altgrad_jax.formats import FloatFormat, FormatParams
from altgrad_jax.optim import LowPrecisionState, grid_spacing
from altgrad_jax.stall import GRAD_THRESHOLD, tree_bit_stall

from .data import sample_batch
from .model import NUM_STATS, CharTransformer, Quant, format_max_value

__all__ = [
    "HIST_EDGES",
    "HIST_LABELS",
    "RunState",
    "TrainConfig",
    "UpdateRule",
    "evaluate",
    "init_state",
    "make_train_chunk",
    "storage_scales",
    "validation_batches",
]

Fmt = FloatFormat | FormatParams
StorageFactory = Callable[[Fmt], optax.GradientTransformation]
OptimizerFactory = Callable[[Fmt, float], optax.GradientTransformation]

# Bins of |u| / ulp(w): below 1/2 a nearest-rounded update is lost, beyond 1 it always lands.
HIST_EDGES: tuple[float, ...] = (1 / 64, 1 / 16, 1 / 4, 1 / 2, 1.0, 2.0)
HIST_LABELS: tuple[str, ...] = ("<1/64", "1/64-1/16", "1/16-1/4", "1/4-1/2", "1/2-1", "1-2", ">=2")


def _adam(fmt: Fmt, learning_rate: float) -> optax.GradientTransformation:
    del fmt
    return optax.adam(learning_rate)


@dataclasses.dataclass(frozen=True)
class UpdateRule:
    """How a run updates and stores its weights.

    Attributes:
      name: shown in reports.
      optimizer: ``optimizer(fmt, learning_rate)`` -> the transformation proposing the update
        ``u`` (Adam unless a rule changes it, e.g. ULP-aware steps).
      storage: ``storage(fmt)`` -> the transformation that lands the stored weights on the
        format's grid (:func:`altgrad_jax.optim.low_precision_storage`); None for the float32
        baseline, which quantizes nothing.
    """

    name: str
    optimizer: OptimizerFactory = _adam
    storage: StorageFactory | None = None

    @property
    def quantized(self) -> bool:
        return self.storage is not None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static hyperparameters of a run (hashable)."""

    batch_size: int = 32
    learning_rate: float = 3e-3
    eval_batches: int = 8


class RunState(NamedTuple):
    """Everything a run carries from step to step."""

    params: Any
    opt_state: Any
    storage_state: Any
    key: jax.Array


def storage_scales(storage_state: Any) -> Any:
    """The per-leaf scales of the grid the stored weights live on (from the storage state)."""
    found = jax.tree_util.tree_leaves(
        storage_state, is_leaf=lambda node: isinstance(node, LowPrecisionState)
    )
    states = [node for node in found if isinstance(node, LowPrecisionState)]
    if len(states) != 1:
        raise ValueError(f"expected one low_precision_storage state, found {len(states)}")
    return states[0].scale


def _loss(model: CharTransformer, params, inputs, targets, q: Quant | None):
    logits, state = model.apply({"params": params}, inputs, q, mutable=["qstats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return loss, state.get("qstats", {})


def _sum_sown(qstats, name: str) -> jax.Array:
    """Sums the statistics vectors sown under ``name`` anywhere in the collection."""
    total = jnp.zeros((NUM_STATS,), jnp.float32)
    for path, leaf in jax.tree_util.tree_flatten_with_path(qstats)[0]:
        if any(getattr(entry, "key", None) == name for entry in path):
            total = total + leaf
    return total


def _flat(tree: Any, like: Any | None = None) -> jax.Array:
    """All leaves of ``tree`` raveled into one float32 vector; with ``like``, each (scalar) leaf
    of ``tree`` is broadcast to the size of the matching leaf of ``like`` first."""
    leaves = jax.tree_util.tree_leaves(tree)
    if like is not None:
        sizes = [leaf.size for leaf in jax.tree_util.tree_leaves(like)]
        leaves = [jnp.broadcast_to(leaf, (n,)) for leaf, n in zip(leaves, sizes, strict=True)]
    return jnp.concatenate([jnp.ravel(leaf).astype(jnp.float32) for leaf in leaves])


def _update_metrics(params, new_params, updates, grads, old_scales, new_scales, fmt: Fmt):
    """Stall, flip and storage statistics, and the |u|/ulp histogram, of one step.

    ``updates`` is what the optimizer proposed (``u``); ``old_scales`` / ``new_scales`` are the
    per-leaf scales of the grid the weights were stored on before / after the step. A weight
    underflowed when ``w + u`` was nonzero and is stored as 0; it saturated when
    ``|w + u| / scale`` exceeded the format's largest value. All leaves are raveled into one
    vector first, so each statistic is one kernel whatever the number of leaves.
    """
    w, w_new, u, g = (_flat(t) for t in (params, new_params, updates, grads))
    scale, new_scale = _flat(old_scales, params), _flat(new_scales, params)
    stall = tree_bit_stall(w, u, fmt, scale=scale, grads=g).stall_rate
    target = w + u
    nonzero = target != 0
    storage = jnp.stack(
        [
            jnp.float32(w.size),
            jnp.sum(nonzero, dtype=jnp.float32),
            jnp.sum(nonzero & (w_new == 0), dtype=jnp.float32),
            jnp.sum(jnp.abs(target) / new_scale > format_max_value(fmt), dtype=jnp.float32),
        ]
    )
    flips = jnp.mean(w_new != w, dtype=jnp.float32)
    ratio = jnp.abs(u) / (grid_spacing(w / scale, fmt) * scale)
    bins = jnp.sum(ratio[:, None] >= jnp.asarray(HIST_EDGES, jnp.float32), axis=-1)
    counted = (jnp.abs(g) > GRAD_THRESHOLD).astype(jnp.int32)
    hist = jnp.bincount(bins, counted, length=len(HIST_EDGES) + 1)
    return stall, flips, storage, hist


def init_state(
    model: CharTransformer, rule: UpdateRule, config: TrainConfig, fmt: Fmt, seed: int
) -> RunState:
    """Initial state; the parameters depend only on the seed, so every format starts alike.

    Stored weights start on the grid: the storage rule is applied to a zero update once.
    """
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    dummy = jnp.zeros((1, model.config.context), jnp.int32)
    params = model.init(init_key, dummy)["params"]
    storage_state = ()
    if rule.storage is not None:
        storage = rule.storage(fmt)
        zero = jax.tree_util.tree_map(jnp.zeros_like, params)
        delta, storage_state = storage.update(zero, storage.init(params), params)
        params = optim.apply_updates(params, delta, storage_state)
    optimizer = rule.optimizer(fmt, config.learning_rate)
    return RunState(params, optimizer.init(params), storage_state, data_key)


def make_train_chunk(
    model: CharTransformer, rule: UpdateRule, config: TrainConfig, steps: int
) -> Callable[[RunState, Fmt, jax.Array], tuple[RunState, dict[str, jax.Array]]]:
    """``chunk(state, fmt, train_tokens) -> (state, metrics)``: ``steps`` train steps in a scan.

    ``metrics`` holds one row per step: ``loss``, ``stall_rate``, ``flip_rate``, the statistics
    vectors ``weights``, ``activations``, ``gradients`` (``[entries, nonzero, underflow,
    saturated]``), the ``hist`` counts of |u|/ulp (bins :data:`HIST_EDGES`) and ``finite`` (loss
    and parameters finite). The float32 baseline has NaN for what it does not measure. Jit the
    result with ``fmt`` static for a :class:`FloatFormat`, traced for :class:`FormatParams`.
    """

    def step(state: RunState, fmt: Fmt, tokens: jax.Array):
        key, batch_key = jax.random.split(state.key)
        inputs, targets = sample_batch(tokens, batch_key, config.batch_size, model.config.context)
        probe = jnp.zeros((NUM_STATS,), jnp.float32)

        def loss_fn(params, probe):
            # Stored weights are on the grid already, so only activations and gradients round.
            q = Quant(fmt, probe, weights=False) if rule.quantized else None
            return _loss(model, params, inputs, targets, q)

        (loss, qstats), (grads, grad_stats) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(state.params, probe)
        optimizer = rule.optimizer(fmt, config.learning_rate)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        if rule.storage is not None:
            stored, storage_state = rule.storage(fmt).update(
                updates, state.storage_state, state.params
            )
            params = optim.apply_updates(state.params, stored, storage_state)
            stall, flips, weights, hist = _update_metrics(
                state.params,
                params,
                updates,
                grads,
                storage_scales(state.storage_state),
                storage_scales(storage_state),
                fmt,
            )
            activations = _sum_sown(qstats, "activations")
        else:
            storage_state = state.storage_state
            params = optax.apply_updates(state.params, updates)
            stall = flips = jnp.float32(jnp.nan)
            weights = activations = grad_stats = jnp.full((NUM_STATS,), jnp.nan, jnp.float32)
            hist = jnp.zeros((len(HIST_EDGES) + 1,), jnp.int32)
        finite = jnp.isfinite(loss)
        for leaf in jax.tree_util.tree_leaves(params):
            finite = finite & jnp.all(jnp.isfinite(leaf))
        metrics = {
            "loss": loss,
            "stall_rate": stall,
            "flip_rate": flips,
            "weights": weights,
            "activations": activations,
            "gradients": grad_stats,
            "hist": hist,
            "finite": finite,
        }
        return RunState(params, opt_state, storage_state, key), metrics

    def chunk(state: RunState, fmt: Fmt, tokens: jax.Array):
        return jax.lax.scan(lambda s, _: step(s, fmt, tokens), state, None, length=steps)

    return chunk


def evaluate(
    model: CharTransformer,
    rule: UpdateRule,
    params,
    fmt: Fmt,
    inputs: jax.Array,
    targets: jax.Array,
) -> jax.Array:
    """Mean validation loss over fixed batches ``inputs, targets`` ``[n, batch, length]``."""
    q = Quant(fmt, jnp.zeros((NUM_STATS,), jnp.float32), weights=False) if rule.quantized else None

    def one(_, batch):
        loss, _stats = _loss(model, params, batch[0], batch[1], q)
        return None, loss

    return jax.lax.scan(one, None, (inputs, targets))[1].mean()


def validation_batches(
    tokens: np.ndarray, batch_size: int, context: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` fixed batches of windows evenly spread over ``tokens`` (deterministic)."""
    windows = count * batch_size
    starts = np.linspace(0, len(tokens) - context - 1, windows).astype(np.int64)
    idx = starts[:, None] + np.arange(context + 1)[None, :]
    data = tokens[idx].reshape(count, batch_size, context + 1)
    return data[..., :-1], data[..., 1:]
