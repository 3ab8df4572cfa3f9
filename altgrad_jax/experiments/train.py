"""The train step of the sweep, with the format as a traced value.

One step samples a batch, runs the model forward and backward with every dense layer quantized by
the library's own rules (:func:`dense_rules`, :func:`altgrad_jax.linen.quant_rules`), lets the
optimizer propose an update ``u``, lets the update rule store the weights on the format's grid
(:func:`altgrad_jax.optim.low_precision_storage`; the float32 baseline keeps plain weights), and
measures what the format did to the step: bit-stall, flips, saturation and underflow, and the
histogram of ``|u| / ulp(w)``, and stall per layer group. A chunk of steps runs as one
``lax.scan``.

Passing the format as :class:`FormatParams` arrays makes it data rather than program: one
compilation serves every format, and the chunk is a pure function of the state and format, so
the sweep maps it over seeds and formats. Passing a :class:`FloatFormat` gives the static
program, which the tests compare against; a :class:`BlockFormat` is always static.

The learning rate follows :func:`learning_rate`: linear warmup then cosine decay (``optax``'s
schedule) by default, or constant.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from altgrad_jax import optim
from altgrad_jax._checks import check_choice
from altgrad_jax.config import QuantConfig, TensorQuant
from altgrad_jax.formats import BlockFormat, FloatFormat, FormatParams
from altgrad_jax.linen import QUANT_STATE, QUANT_STATS, quant_rules, quant_value_and_grad
from altgrad_jax.optim import HISTOGRAM_LABELS, landed_stats, monitor_stall, stall_stats
from altgrad_jax.quant_dot import QuantStats
from altgrad_jax.rules import PathRules

from .data import sample_batch
from .model import LAYER_GROUPS, CharTransformer, layer_group

__all__ = [
    "RunState",
    "TrainConfig",
    "UpdateRule",
    "dense_rules",
    "evaluate",
    "init_state",
    "learning_rate",
    "make_train_chunk",
    "validation_batches",
]

Fmt = FloatFormat | FormatParams | BlockFormat
StorageFactory = Callable[[Fmt], optax.GradientTransformation]
OptimizerFactory = Callable[[Fmt, "TrainConfig"], optax.GradientTransformation]
Schedule = Literal["cosine", "constant"]
SCHEDULES: tuple[str, ...] = ("cosine", "constant")


def _adam(fmt: Fmt, config: TrainConfig) -> optax.GradientTransformation:
    del fmt
    return optax.adam(learning_rate(config))


@dataclasses.dataclass(frozen=True)
class UpdateRule:
    """How a run updates and stores its weights.

    Attributes:
      name: shown in reports.
      optimizer: ``optimizer(fmt, train_config)`` -> the transformation proposing the update
        ``u`` (Adam at :func:`learning_rate` unless a rule changes it, e.g. ULP-aware steps).
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


def _check_schedule(name: str, value: Any) -> str:
    return check_choice(name, value, SCHEDULES)


def _check_fraction(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static hyperparameters of a run (hashable); the sweep's CLI shows each ``help``."""

    steps: int = dataclasses.field(default=150, metadata={"help": "train steps per run"})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "sequences per step"})
    learning_rate: float = dataclasses.field(
        default=3e-3, metadata={"help": "Adam's (peak) learning rate", "flag": "--lr"}
    )
    schedule: str = dataclasses.field(
        default="cosine",
        metadata={
            "help": "learning rate schedule: cosine (linear warmup, then cosine decay to "
            "min_lr_fraction of the peak) or constant",
            "check": _check_schedule,
        },
    )
    warmup_fraction: float = dataclasses.field(
        default=0.1,
        metadata={
            "help": "fraction of the steps spent warming up (cosine)",
            "check": _check_fraction,
        },
    )
    min_lr_fraction: float = dataclasses.field(
        default=0.1,
        metadata={
            "help": "learning rate at the last step over the peak (cosine)",
            "check": _check_fraction,
        },
    )
    eval_batches: int = dataclasses.field(
        default=8, metadata={"help": "fixed validation batches per evaluation"}
    )


def learning_rate(config: TrainConfig) -> float | optax.Schedule:
    """The learning rate of ``config``: a float (constant) or an ``optax`` schedule.

    "cosine" rises linearly from 0 over ``warmup_fraction`` of the steps, then decays along a
    cosine to ``min_lr_fraction`` of the peak at the last step (the nanoGPT recipe). Under it the
    updates shrink late in training, which is where low-precision storage stalls most.
    """
    if config.schedule == "constant":
        return config.learning_rate
    warmup = math.ceil(config.warmup_fraction * config.steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(config.steps, warmup + 1),
        end_value=config.learning_rate * config.min_lr_fraction,
    )


class RunState(NamedTuple):
    """Everything a run carries from step to step."""

    params: Any
    quant_state: Any
    opt_state: Any
    storage_state: Any
    key: jax.Array


# The statistics rows the sweep reports: [entries, nonzero, underflowed, saturated].
_REPORTED_STATS = 4


def dense_rules(fmt: Fmt, grad_fmt: Fmt | None = None) -> PathRules:
    """Every dense layer's activations in ``fmt`` and output gradients in ``grad_fmt`` (``fmt``
    when None), with current per-tensor scaling (``scale = max|x| * 1.01 / max_value``, a
    history of one), statistics on.

    Per-tensor weights are not quantized in the GEMMs: the storage keeps them on the grid
    already, and rounding them again would be a no-op at best. A block format's weights are:
    each of the three GEMMs blocks its operands along its own contraction axis, and the weight
    gradient GEMM's axis is not the one the weights are stored along.
    """
    role = TensorQuant(fmt, history_len=1)
    grad_role = role if grad_fmt is None else TensorQuant(grad_fmt, history_len=1)
    weights = role if isinstance(fmt, BlockFormat) else None
    return PathRules((), default=QuantConfig(role, weights, grad_role, stats=True))


def _loss(model: CharTransformer, params, quant_state, inputs, targets, rules):
    variables = {"params": params, QUANT_STATE: quant_state}
    with quant_rules(rules):
        logits, state = model.apply(variables, inputs, mutable=[QUANT_STATE, QUANT_STATS])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return loss, (state.get(QUANT_STATE, {}), state.get(QUANT_STATS, {}))


def _summed(stats_by_layer: list[QuantStats]) -> jax.Array:
    """The reported counts of the sum of ``stats_by_layer``, as float32."""
    total = sum(stats_by_layer[1:], stats_by_layer[0])
    return total.counts[:_REPORTED_STATS].astype(jnp.float32)


def _sown_stats(quant_stats, role: str) -> list[QuantStats]:
    """Every :class:`QuantStats` sown for ``role`` anywhere in the ``quant_stats`` collection."""
    is_stats = lambda node: isinstance(node, QuantStats)  # noqa: E731
    return [
        leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(quant_stats, is_leaf=is_stats)[0]
        if any(getattr(entry, "key", None) == role for entry in path)
    ]


def _grad_stats(quant_state) -> list[QuantStats]:
    """The output-gradient statistics of every layer, from the state after a train step."""
    return [
        QuantStats.from_probe(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(quant_state)[0]
        if getattr(path[-1], "key", None) == "output_grads_stats"
    ]


def _stored_vectors(params, new_params, updates, new_scales):
    """Raveled, concatenated ``w``, ``w_new``, ``u`` and per-entry scale over the stored leaves.

    A leaf is stored when the storage state has a scale for it (not None). One vector per
    quantity keeps each statistic a single kernel whatever the number of leaves.
    """
    treedef = jax.tree_util.tree_structure(params)
    scales = treedef.flatten_up_to(new_scales)
    columns: list[list[jax.Array]] = [[], [], [], []]
    for w, w_new, u, scale in zip(
        treedef.flatten_up_to(params),
        treedef.flatten_up_to(new_params),
        treedef.flatten_up_to(updates),
        scales,
        strict=True,
    ):
        if scale is None:
            continue
        for column, value in zip(columns, (w, w_new, u), strict=False):
            column.append(jnp.ravel(value).astype(jnp.float32))
        columns[3].append(jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (jnp.size(w),)))
    return tuple(jnp.concatenate(column) for column in columns)


def _saturated(target: jax.Array, scale: jax.Array, fmt: Fmt) -> jax.Array:
    """Entries of ``target`` beyond the largest value of their grid, as float32; NaN (not
    measured) for a block format, whose scales follow each block's maximum and live in the
    blocks rather than in ``scale``."""
    if isinstance(fmt, BlockFormat):
        return jnp.float32(jnp.nan)
    return jnp.sum(jnp.abs(target) / scale > fmt.max_value, dtype=jnp.float32)


def _storage_metrics(params, new_params, updates, new_scales, fmt: Fmt):
    """Flip rate and weight statistics of one step of low-precision storage.

    ``updates`` is what the optimizer proposed (``u``); ``new_scales`` are the per-leaf scales of
    the grid the weights are stored on after the step (None for leaves kept in float32, which
    are left out). A weight flipped when its stored value changed; it underflowed when ``w + u``
    was nonzero and is stored as 0; it saturated when ``|w + u| / scale`` exceeded the format's
    largest value (not measured for block formats, see :func:`_saturated`).
    """
    w, w_new, u, new_scale = _stored_vectors(params, new_params, updates, new_scales)
    target = w + u
    nonzero = target != 0
    stats = jnp.stack(
        [
            jnp.float32(w.size),
            jnp.sum(nonzero, dtype=jnp.float32),
            jnp.sum(nonzero & (w_new == 0), dtype=jnp.float32),
            _saturated(target, new_scale, fmt),
        ]
    )
    return jnp.mean(w_new != w, dtype=jnp.float32), stats


def _optimizer(rule: UpdateRule, fmt: Fmt, config: TrainConfig) -> optax.GradientTransformation:
    """The rule's optimizer; for quantized runs wrapped in the stall monitor on the storage grid
    (per-tensor formats at the storage's power-of-two scale, block formats with their blocks)."""
    optimizer = rule.optimizer(fmt, config)
    if rule.quantized:
        return monitor_stall(optimizer, fmt, scale="pow2")
    return optimizer


def _layer_stall(leaf_stats: Any) -> jax.Array:
    """``[len(LAYER_GROUPS), 2]`` float32: stalled and counted entries of each layer group."""
    totals = [[jnp.float32(0), jnp.float32(0)] for _ in LAYER_GROUPS]
    is_stats = lambda node: isinstance(node, optim.UpdateStats)  # noqa: E731
    for path, stats in jax.tree_util.tree_flatten_with_path(leaf_stats, is_leaf=is_stats)[0]:
        if not is_stats(stats):
            continue
        names = tuple(str(getattr(entry, "key", entry)) for entry in path)
        row = totals[LAYER_GROUPS.index(layer_group(names))]
        row[0] = row[0] + stats.stalled.astype(jnp.float32)
        row[1] = row[1] + stats.counted.astype(jnp.float32)
    return jnp.stack([jnp.stack(row) for row in totals])


def init_state(
    model: CharTransformer,
    rule: UpdateRule,
    config: TrainConfig,
    fmt: Fmt,
    seed: int | jax.Array,
    grad_fmt: Fmt | None = None,
) -> RunState:
    """Initial state; the parameters depend only on the seed, so every format starts alike.

    Stored weights start on the grid: the storage rule is applied to a zero update once.
    ``seed`` may be traced (the sweep maps over seeds).
    """
    init_key, data_key = jax.random.split(jax.random.PRNGKey(seed))
    dummy = jnp.zeros((1, model.config.context), jnp.int32)
    with quant_rules(dense_rules(fmt, grad_fmt) if rule.quantized else PathRules()):
        variables = model.init(init_key, dummy)
    params, quant_state = variables["params"], variables.get(QUANT_STATE, {})
    storage_state = ()
    if rule.storage is not None:
        storage = rule.storage(fmt)
        zero = jax.tree_util.tree_map(jnp.zeros_like, params)
        delta, storage_state = storage.update(zero, storage.init(params), params)
        params = optim.apply_updates(params, delta, storage_state)
    opt_state = _optimizer(rule, fmt, config).init(params)
    return RunState(params, quant_state, opt_state, storage_state, data_key)


def make_train_chunk(
    model: CharTransformer, rule: UpdateRule, config: TrainConfig, steps: int
) -> Callable[..., tuple[RunState, dict[str, jax.Array]]]:
    """``chunk(state, fmt, train_tokens, grad_fmt=None) -> (state, metrics)``: ``steps`` train
    steps in a scan (``grad_fmt``: the output gradients' format, ``fmt`` when None).

    ``metrics`` holds one row per step: ``loss``; ``stall_rate`` and ``hist`` (counts of |u|/ulp
    in the bins of :data:`altgrad_jax.optim.HISTOGRAM_LABELS`) from the stall monitor around the
    optimizer, on the storage grid; ``flip_rate`` (stored weights that changed);
    ``landed_ratio`` (run so far); the statistics vectors ``weights``, ``activations``,
    ``gradients`` (``[entries, nonzero, underflow, saturated]``); ``layer_stall`` (stalled and
    counted entries per :data:`LAYER_GROUPS` group); ``finite`` (loss and parameters finite).
    What a run does not measure is NaN (everything for the float32 baseline; the weights'
    saturation for a block format). Jit the result with ``fmt`` static for a
    :class:`FloatFormat`, traced for :class:`FormatParams`.
    """

    def step(state: RunState, fmt: Fmt, tokens: jax.Array, grad_fmt: Fmt | None):
        key, batch_key = jax.random.split(state.key)
        inputs, targets = sample_batch(tokens, batch_key, config.batch_size, model.config.context)
        rules = dense_rules(fmt, grad_fmt) if rule.quantized else PathRules()

        def loss_fn(params, quant_state):
            loss, (new_state, quant_stats) = _loss(
                model, params, quant_state, inputs, targets, rules
            )
            return loss, (new_state, quant_stats)

        (loss, quant_stats), grads, quant_state = quant_value_and_grad(loss_fn, has_aux=True)(
            state.params, state.quant_state
        )
        updates, opt_state = _optimizer(rule, fmt, config).update(
            grads, state.opt_state, state.params
        )
        nan = jnp.float32(jnp.nan)
        stall = flips = landed = nan
        weights = activations = gradients = jnp.full((_REPORTED_STATS,), nan)
        hist = jnp.zeros((len(HISTOGRAM_LABELS),), jnp.float32)
        layers = jnp.full((len(LAYER_GROUPS), 2), nan)
        if rule.storage is not None:
            stored, storage_state = rule.storage(fmt).update(
                updates, state.storage_state, state.params
            )
            params = optim.apply_updates(state.params, stored, storage_state)
            landed = landed_stats(storage_state).run_ratio
            activations = _summed(_sown_stats(quant_stats, "inputs"))
            gradients = _summed(_grad_stats(quant_state))
            flips, weights = _storage_metrics(
                state.params, params, updates, storage_state.scale, fmt
            )
            monitor = stall_stats(opt_state)
            stall, hist = monitor.last.stall_rate, monitor.last.histogram.to_float()
            layers = _layer_stall(monitor.leaf_last)
        else:
            storage_state = state.storage_state
            params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss)
        for leaf in jax.tree_util.tree_leaves(params):
            finite = finite & jnp.all(jnp.isfinite(leaf))
        metrics = {
            "loss": loss,
            "stall_rate": stall,
            "flip_rate": flips,
            "landed_ratio": landed,
            "weights": weights,
            "activations": activations,
            "gradients": gradients,
            "hist": hist,
            "layer_stall": layers,
            "finite": finite,
        }
        return RunState(params, quant_state, opt_state, storage_state, key), metrics

    def chunk(state: RunState, fmt: Fmt, tokens: jax.Array, grad_fmt: Fmt | None = None):
        return jax.lax.scan(lambda s, _: step(s, fmt, tokens, grad_fmt), state, None, length=steps)

    return chunk


def evaluate(
    model: CharTransformer,
    rule: UpdateRule,
    params,
    fmt: Fmt,
    inputs: jax.Array,
    targets: jax.Array,
    *,
    quant_state: Any,
    grad_fmt: Fmt | None = None,
) -> jax.Array:
    """Mean validation loss over fixed batches ``inputs, targets`` ``[n, batch, length]``, with
    the run's quantization (``quant_state`` from its :class:`RunState`; nothing advances)."""
    rules = dense_rules(fmt, grad_fmt) if rule.quantized else PathRules()

    def one(_, batch):
        loss, _ = _loss(model, params, quant_state, batch[0], batch[1], rules)
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
