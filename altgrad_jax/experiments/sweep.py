"""The format-comparison sweep: one model, many formats and update rules, one compiled step each.

For every update rule the train chunk and the evaluation are jitted once with the format as a
traced :class:`FormatParams`, and every format runs through that same program. A run that produces
a non-finite loss or parameter, or a loss above ``diverge_loss``, stops there and is reported as
diverged at that step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from altgrad_jax.formats import format_params, get_format
from altgrad_jax.optim import HISTOGRAM_LABELS, STORAGE_RULES, low_precision_storage, scale_by_ulp

from .data import CharCorpus
from .model import CharTransformer, ModelConfig
from .train import (
    TrainConfig,
    UpdateRule,
    evaluate,
    init_state,
    make_train_chunk,
    validation_batches,
)

__all__ = [
    "BASELINE",
    "DEFAULT_FORMATS",
    "DEFAULT_RULES",
    "RULE_NAMES",
    "RunResult",
    "SweepConfig",
    "SweepResult",
    "get_update_rule",
    "run_sweep",
]

BASELINE = "float32"
DEFAULT_FORMATS: tuple[str, ...] = ("E5M2", "E4M3", "E3M4", "E2M5", "E1M6", "E0M7", "E7M0")
# Plain nearest storage and its remedies; "master" (a float32 master copy, the usual mixed
# precision practice) is available by name.
DEFAULT_RULES: tuple[str, ...] = ("nearest", "stochastic", "compensated", "ulp")
RULE_NAMES: tuple[str, ...] = (*STORAGE_RULES, "ulp")


def get_update_rule(name: str, ulp_steps: float = 1.0) -> UpdateRule:
    """The update rule called ``name`` (see :data:`RULE_NAMES`).

    The storage rules of :func:`altgrad_jax.optim.low_precision_storage` follow Adam. "ulp" is
    the ULP-aware step: Adam's normalised direction read as a number of grid steps,
    ``ulp_steps * adam_direction * ulp(w)`` (:func:`altgrad_jax.optim.scale_by_ulp`), stored
    with nearest rounding, so a step of half a ULP or more always lands whatever the binade.
    """
    if name == BASELINE:
        return UpdateRule(BASELINE)
    if name not in RULE_NAMES:
        raise ValueError(f"unknown rule {name!r}; known rules: {', '.join(RULE_NAMES)}")
    if name == "ulp":
        return UpdateRule(
            name,
            optimizer=lambda fmt, lr: optax.chain(
                optax.scale_by_adam(), optax.scale(-ulp_steps), scale_by_ulp(fmt)
            ),
            storage=lambda fmt: low_precision_storage(fmt, "nearest"),
        )
    return UpdateRule(name, storage=lambda fmt: low_precision_storage(fmt, name))


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """What the sweep trains and how long.

    Attributes:
      formats: format names, each trained under every rule in ``rules``.
      rules: update rules (see :data:`RULE_NAMES`).
      baseline: also train a float32 run (nothing quantized) for reference.
      steps: train steps per run.
      eval_every: steps between validation losses (the scan length of one compiled chunk).
      seed: parameter initialisation and batch order; the same for every run.
      learning_rate, batch_size, eval_batches: see :class:`TrainConfig`.
      context, d_model, n_heads, n_layers: model size (see :class:`ModelConfig`).
      ulp_steps: grid steps per unit of Adam's direction for the "ulp" rule.
      diverge_loss: a training loss above this counts as divergence; None means
        ``2 * log(vocab_size)``, twice the loss of a uniform guess.
    """

    formats: tuple[str, ...] = DEFAULT_FORMATS
    rules: tuple[str, ...] = DEFAULT_RULES
    baseline: bool = True
    steps: int = 300
    eval_every: int = 50
    seed: int = 0
    learning_rate: float = 3e-3
    batch_size: int = 16
    eval_batches: int = 8
    context: int = 64
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    ulp_steps: float = 1.0
    diverge_loss: float | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "eval_every", "batch_size", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        object.__setattr__(self, "formats", tuple(get_format(name).name for name in self.formats))
        if not (isinstance(self.ulp_steps, (int, float)) and self.ulp_steps > 0):
            raise ValueError(f"ulp_steps must be positive, got {self.ulp_steps!r}")
        for rule in self.rules:
            get_update_rule(rule)
        if not self.formats and self.rules:
            raise ValueError("rules were given but no formats to run them on")
        if not self.baseline and not (self.formats and self.rules):
            raise ValueError("nothing to run: no baseline and no format/rule pairs")

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size, self.context, self.d_model, self.n_heads, self.n_layers)

    def train_config(self) -> TrainConfig:
        return TrainConfig(self.batch_size, self.learning_rate, self.eval_batches)

    def runs(self) -> list[tuple[str | None, str]]:
        """``(format, rule)`` pairs in run order: the baseline first, then rule by rule."""
        pairs: list[tuple[str | None, str]] = [(None, BASELINE)] if self.baseline else []
        return pairs + [(fmt, rule) for rule in self.rules for fmt in self.formats]


@dataclasses.dataclass
class RunResult:
    """Everything measured in one run (see :data:`altgrad_jax.experiments.report.RUN_FIELDS`)."""

    format: str | None
    rule: str
    status: str
    diverged_step: int | None
    steps_run: int
    final_val_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    final_train_loss: float | None
    stall_rate: float | None
    final_stall_rate: float | None
    flip_rate: float | None
    landed_ratio: float | None
    saturation: dict[str, float | None]
    underflow: dict[str, float | None]
    update_ulp_hist: dict[str, int]
    wall_time_s: float
    eval_steps: list[int]
    val_losses: list[float | None]
    train_loss: list[float | None]
    stall_curve: list[float | None]
    flip_curve: list[float | None]

    @property
    def label(self) -> str:
        return self.rule if self.format is None else f"{self.format}/{self.rule}"


@dataclasses.dataclass
class SweepResult:
    """A finished sweep: its runs and how it ran."""

    config: SweepConfig
    corpus: str
    vocab_size: int
    num_params: int
    runs: list[RunResult]
    compilations: dict[str, int]
    wall_time_s: float


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _rate(stats: np.ndarray, part: int, whole: int) -> float | None:
    """Summed counts ``stats[:, part] / stats[:, whole]``, None when not measured."""
    if stats.size == 0 or not np.all(np.isfinite(stats)):
        return None
    total = float(stats[:, whole].sum())
    return float(stats[:, part].sum()) / total if total > 0 else 0.0


def _summarise(
    fmt: str | None,
    rule: UpdateRule,
    metrics: list[dict[str, np.ndarray]],
    eval_steps: list[int],
    val_losses: list[float],
    diverged_step: int | None,
    wall: float,
) -> RunResult:
    rows = {key: np.concatenate([m[key] for m in metrics]) for key in metrics[0]}
    steps_run = len(rows["loss"])
    if diverged_step is not None:
        # Statistics cover the steps before the divergence.
        rows = {key: value[: diverged_step - 1] for key, value in rows.items()}
    finite_vals = [(v, s) for v, s in zip(val_losses, eval_steps, strict=True) if math.isfinite(v)]
    best_val, best_step = min(finite_vals) if finite_vals else (None, None)
    final_val = _finite_or_none(val_losses[-1]) if val_losses and diverged_step is None else None
    stall, flips = rows["stall_rate"], rows["flip_rate"]
    measured = rule.quantized and len(stall) > 0
    tail = stall[-max(len(stall) // 5, 1) :] if measured else stall
    roles = ("weights", "activations", "gradients")
    return RunResult(
        format=fmt,
        rule=rule.name,
        status="diverged" if diverged_step is not None else "ok",
        diverged_step=diverged_step,
        steps_run=steps_run,
        final_val_loss=final_val,
        best_val_loss=best_val,
        best_step=best_step,
        final_train_loss=_finite_or_none(rows["loss"][-1]) if len(rows["loss"]) else None,
        stall_rate=float(stall.mean()) if measured else None,
        final_stall_rate=float(tail.mean()) if measured else None,
        flip_rate=float(flips.mean()) if measured else None,
        landed_ratio=_finite_or_none(rows["landed_ratio"][-1]) if measured else None,
        saturation={role: _rate(rows[role], 3, 0) if measured else None for role in roles},
        underflow={role: _rate(rows[role], 2, 1) if measured else None for role in roles},
        update_ulp_hist=dict(
            zip(
                HISTOGRAM_LABELS,
                (int(c) for c in rows["hist"].astype(np.float64).sum(axis=0)),
                strict=True,
            )
        ),
        wall_time_s=wall,
        eval_steps=eval_steps,
        val_losses=[_finite_or_none(v) for v in val_losses],
        train_loss=[_finite_or_none(v) for v in rows["loss"]],
        stall_curve=[_finite_or_none(v) for v in stall] if measured else [],
        flip_curve=[_finite_or_none(v) for v in flips] if measured else [],
    )


def _first_bad_step(metrics: dict[str, np.ndarray], threshold: float) -> int | None:
    bad = ~metrics["finite"].astype(bool) | ~(metrics["loss"] <= threshold)
    return int(np.argmax(bad)) if bad.any() else None


def run_sweep(
    config: SweepConfig,
    corpus: CharCorpus,
    progress: Callable[[int, str], Any] | None = None,
) -> SweepResult:
    """Trains every ``(format, rule)`` pair of ``config`` on ``corpus``.

    Args:
      config: the sweep.
      corpus: train / validation tokens (see :mod:`altgrad_jax.experiments.data`).
      progress: called as ``progress(steps_done, label)`` after each chunk, e.g. to move a bar.

    Returns:
      A :class:`SweepResult`; ``compilations`` counts the compiled programs per rule (one train
      chunk and one evaluation serve every format of a rule).
    """
    start = time.perf_counter()
    model = CharTransformer(config.model_config(corpus.vocab_size))
    train_config = config.train_config()
    context = model.config.context
    if min(len(corpus.train), len(corpus.val)) <= context + 1:
        raise ValueError(
            f"corpus {corpus.name!r} is too short for context {context}: "
            f"{len(corpus.train)} train / {len(corpus.val)} validation characters"
        )
    tokens = jnp.asarray(corpus.train)
    val_inputs, val_targets = (
        jnp.asarray(a)
        for a in validation_batches(corpus.val, config.batch_size, context, config.eval_batches)
    )
    threshold = (
        config.diverge_loss
        if config.diverge_loss is not None
        else 2 * math.log(max(corpus.vocab_size, 2))
    )
    chunk_len = min(config.eval_every, config.steps)
    programs: dict[str, tuple[Any, ...]] = {}
    results = []
    num_params = 0
    for fmt_name, rule_name in config.runs():
        rule = get_update_rule(rule_name, config.ulp_steps)
        if rule_name not in programs:
            programs[rule_name] = (
                jax.jit(lambda f, rule=rule: init_state(model, rule, train_config, f, config.seed)),
                jax.jit(make_train_chunk(model, rule, train_config, chunk_len)),
                jax.jit(make_train_chunk(model, rule, train_config, config.steps % chunk_len or 1)),
                jax.jit(
                    lambda p, q, f, x, y, rule=rule: evaluate(
                        model, rule, p, f, x, y, quant_state=q
                    )
                ),
            )
        init_fn, chunk, tail_chunk, evaluate_fn = programs[rule_name]
        fmt = format_params(get_format(fmt_name or "E4M3")).as_arrays()
        run_start = time.perf_counter()
        state = init_fn(fmt)
        num_params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(state.params))
        label = fmt_name + "/" + rule_name if fmt_name else rule_name
        metrics, eval_steps, val_losses = [], [], []
        done, diverged = 0, None
        while done < config.steps:
            step_fn = chunk if config.steps - done >= chunk_len else tail_chunk
            state, chunk_metrics = step_fn(state, fmt, tokens)
            chunk_metrics = jax.device_get(chunk_metrics)
            metrics.append(chunk_metrics)
            bad = _first_bad_step(chunk_metrics, threshold)
            n = len(chunk_metrics["loss"])
            if progress is not None:
                progress(n if bad is None else config.steps - done, label)
            if bad is not None:
                diverged = done + bad + 1
                done += n
                break
            done += n
            eval_steps.append(done)
            val_losses.append(
                float(evaluate_fn(state.params, state.quant_state, fmt, val_inputs, val_targets))
            )
        results.append(
            _summarise(
                fmt_name,
                rule,
                metrics,
                eval_steps,
                val_losses,
                diverged,
                time.perf_counter() - run_start,
            )
        )
    compilations = {name: sum(fn._cache_size() for fn in fns) for name, fns in programs.items()}
    return SweepResult(
        config,
        corpus.name,
        corpus.vocab_size,
        num_params,
        results,
        compilations,
        time.perf_counter() - start,
    )
