"""The format-comparison sweep: one model, many formats and update rules, one compiled step each.

For every update rule the train chunk and the evaluation are compiled once with the format as a
traced :class:`FormatParams`, and every format runs through that same program. A run that produces
a non-finite loss or parameter, or a loss above ``diverge_loss``, stops there and is reported as
diverged at that step.

The configuration is one tree of frozen dataclasses (:class:`SweepConfig` holding a
:class:`TrainConfig` and a :class:`ModelSize`); each field's metadata carries its help text, so the
command line (:func:`config_options`) and the validation are built from the fields and their
defaults, never restated. The results schema is :class:`RunResult`: each field's metadata
documents it and says how it appears in ``results.csv``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import field
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from altgrad_jax._checks import (
    check_bool,
    check_choices,
    check_int,
    check_optional_positive_float,
    check_positive_float,
    check_positive_int,
    choices_of,
)
from altgrad_jax.formats import format_params, get_format
from altgrad_jax.optim import HISTOGRAM_LABELS, low_precision_storage, scale_by_ulp
from altgrad_jax.optim.storage import StorageRule

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
    "ROLES",
    "RULE_NAMES",
    "CompiledProgram",
    "ConfigOption",
    "ModelSize",
    "RuleName",
    "RunResult",
    "SweepConfig",
    "SweepResult",
    "build_config",
    "check_choices",
    "check_int",
    "check_optional_positive_float",
    "config_options",
    "get_update_rule",
    "run_sweep",
    "stores_nearest",
]

# --- Checkers: the shared ones, and two the sweep adds (to be folded into _checks) ------------

Checker = Callable[[str, Any], Any]


# The checker of a config field whose metadata names none: numbers are positive unless it says.
_TYPE_CHECKS: dict[Any, Checker] = {
    bool: check_bool,
    int: check_positive_int,
    float: check_positive_float,
}


# --- Update rules --------------------------------------------------------------------------------

BASELINE = "float32"
DEFAULT_FORMATS: tuple[str, ...] = ("E5M2", "E4M3", "E3M4", "E2M5", "E1M6", "E0M7", "E7M0")
RuleName = Literal[StorageRule, "ulp"]
RULE_NAMES: tuple[str, ...] = choices_of(RuleName)
# Plain nearest storage and its remedies; "master" (a float32 master copy, the usual mixed
# precision practice) is available by name.
DEFAULT_RULES: tuple[str, ...] = ("nearest", "stochastic", "compensated", "ulp")


def stores_nearest(rule: str) -> bool:
    """Whether ``rule`` stores weights with plain nearest rounding, so a stalled update is lost.

    Under the other rules (stochastic rounding, error feedback, a master copy) the stall rate is
    what nearest rounding *would* have lost: those rules land such updates, in expectation or
    later.
    """
    return rule in ("nearest", "ulp")


def get_update_rule(name: str, ulp_steps: float = 1.0) -> UpdateRule:
    """The update rule called ``name`` (see :data:`RULE_NAMES`).

    The storage rules of :func:`altgrad_jax.optim.low_precision_storage` follow Adam. "ulp" is
    the ULP-aware step: Adam's normalised direction read as a number of grid steps,
    ``ulp_steps * adam_direction * ulp(w)`` (:func:`altgrad_jax.optim.scale_by_ulp`), stored
    with nearest rounding, so a step of half a ULP or more always lands whatever the binade.
    """
    if name == BASELINE:
        return UpdateRule(BASELINE)
    check_choices("rule", (name,), RULE_NAMES)
    if name == "ulp":
        return UpdateRule(
            name,
            optimizer=lambda fmt, lr: optax.chain(
                optax.scale_by_adam(), optax.scale(-ulp_steps), scale_by_ulp(fmt)
            ),
            storage=lambda fmt: low_precision_storage(fmt, "nearest"),
        )
    return UpdateRule(name, storage=lambda fmt: low_precision_storage(fmt, name))


# --- Configuration -----------------------------------------------------------------------------


def _option(
    default: Any, help: str, *, check: Checker | None = None, flag: str | None = None
) -> Any:
    """A config field with its CLI help, and optionally its checker and flag (``--name`` else)."""
    metadata: dict[str, Any] = {"help": help}
    if check is not None:
        metadata["check"] = check
    if flag is not None:
        metadata["flag"] = flag
    return dataclasses.field(default=default, metadata=metadata)


# Help and flags of ModelConfig's fields, until model.py carries them as field metadata.
_MODEL_OPTIONS: dict[str, dict[str, str]] = {
    "context": {"help": "characters per sequence"},
    "d_model": {"help": "width of the residual stream"},
    "n_heads": {"help": "attention heads", "flag": "--heads"},
    "n_layers": {"help": "transformer blocks", "flag": "--layers"},
    "mlp_ratio": {"help": "MLP hidden width over d_model"},
}


def _model_size_class() -> type:
    """:class:`ModelConfig` without ``vocab_size`` (which comes from the corpus): same defaults."""
    hints = typing.get_type_hints(ModelConfig)
    fields = [
        (
            spec.name,
            hints[spec.name],
            field(
                default=spec.default,
                metadata={**spec.metadata, **_MODEL_OPTIONS.get(spec.name, {})},
            ),
        )
        for spec in dataclasses.fields(ModelConfig)
        if spec.name != "vocab_size"
    ]

    def config(self, vocab_size: int) -> ModelConfig:
        """The :class:`ModelConfig` of this size for a vocabulary of ``vocab_size``."""
        return ModelConfig(vocab_size, **dataclasses.asdict(self))

    doc = "The model's size: the fields and defaults of :class:`ModelConfig` but ``vocab_size``."
    cls = dataclasses.make_dataclass(
        "ModelSize", fields, frozen=True, namespace={"__doc__": doc, "config": config}
    )
    cls.__module__ = __name__  # make_dataclass(module=...) needs Python 3.12
    return cls


ModelSize = _model_size_class()


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """What the sweep trains and how long.

    Training hyperparameters live in ``train`` (:class:`TrainConfig`), the model's size in
    ``model`` (:class:`ModelSize`), each with its own defaults. Every field's help text is its
    ``metadata["help"]``; ``--help`` of ``altgrad-jax sweep`` lists them with their defaults.
    """

    formats: tuple[str, ...] = _option(DEFAULT_FORMATS, "formats to run, each under every rule")
    rules: tuple[str, ...] = _option(DEFAULT_RULES, f"update rules, from {', '.join(RULE_NAMES)}")
    baseline: bool = _option(
        True, "train a float32 run (nothing quantized) for reference", flag="--no-baseline"
    )
    steps: int = _option(300, "train steps per run")
    eval_every: int = _option(50, "steps between validation losses (one compiled chunk)")
    seed: int = _option(0, "parameter initialisation and batch order (every run)", check=check_int)
    ulp_steps: float = _option(1.0, "grid steps per unit of Adam's direction for the 'ulp' rule")
    diverge_loss: float | None = _option(
        None,
        "a training loss above this counts as divergence; None: 2 * log(vocab_size), twice the "
        "loss of a uniform guess",
        check=check_optional_positive_float,
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelSize = field(default_factory=ModelSize)  # type: ignore[valid-type]

    def __post_init__(self) -> None:
        for name, kind in (("train", TrainConfig), ("model", ModelSize)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name} must be a {kind.__name__}, got {getattr(self, name)!r}")
        for option in config_options(type(self)):
            if option.check is not None:
                option.check(option.name, option.value_in(self))
        formats = tuple(get_format(name).name for name in self.formats)
        object.__setattr__(self, "formats", formats)
        object.__setattr__(self, "rules", check_choices("rule", self.rules, RULE_NAMES))
        self.model_config(2)  # ModelConfig's own checks (e.g. d_model divisible by n_heads)
        if not self.formats and self.rules:
            raise ValueError("rules were given but no formats to run them on")
        if not self.baseline and not (self.formats and self.rules):
            raise ValueError("nothing to run: no baseline and no format/rule pairs")

    def model_config(self, vocab_size: int) -> ModelConfig:
        return self.model.config(vocab_size)

    def flat(self) -> dict[str, Any]:
        """Every leaf field by its own name (unique across the tree), as ``results.json`` has it."""
        return {option.name: option.value_in(self) for option in config_options(type(self))}

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> SweepConfig:
        """The config with the leaf fields named in ``values`` set (names as :meth:`flat` has)."""
        paths = {option.name: option.path for option in config_options(cls)}
        unknown = [name for name in values if name not in paths]
        if unknown:
            raise ValueError(
                f"unknown config field {unknown[0]!r}; expected one of {', '.join(paths)}"
            )
        return build_config({paths[name]: value for name, value in values.items()}, cls)

    def runs(self) -> list[tuple[str | None, str]]:
        """``(format, rule)`` pairs in run order: the baseline first, then rule by rule."""
        pairs: list[tuple[str | None, str]] = [(None, BASELINE)] if self.baseline else []
        return pairs + [(fmt, rule) for rule in self.rules for fmt in self.formats]


class ConfigOption(NamedTuple):
    """One leaf field of a config tree: where it sits, its type and default, help and check."""

    path: tuple[str, ...]
    field: dataclasses.Field
    type: Any
    default: Any

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def flag(self) -> str:
        return self.field.metadata.get("flag", "--" + self.name.replace("_", "-"))

    @property
    def help(self) -> str:
        return self.field.metadata.get("help", self.name.replace("_", " "))

    @property
    def check(self) -> Checker | None:
        return self.field.metadata.get("check", _TYPE_CHECKS.get(self.type))

    def value_in(self, config: Any) -> Any:
        for name in self.path:
            config = getattr(config, name)
        return config


def _field_default(spec: dataclasses.Field) -> Any:
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


def config_options(
    cls: type = SweepConfig, path: tuple[str, ...] = (), defaults: Any = None
) -> Iterator[ConfigOption]:
    """The leaf fields of the config dataclass ``cls``, nested dataclasses walked in order.

    A nested config's defaults are those of the instance its field defaults to (``TrainConfig()``
    for ``train``), so each number is written once, where it belongs.
    """
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        kind = hints[spec.name]
        default = _field_default(spec) if defaults is None else getattr(defaults, spec.name)
        if dataclasses.is_dataclass(kind):
            yield from config_options(kind, (*path, spec.name), default)
        else:
            yield ConfigOption((*path, spec.name), spec, kind, default)


def build_config(
    values: Mapping[tuple[str, ...], Any], cls: type = SweepConfig, path: tuple[str, ...] = ()
) -> Any:
    """The config ``cls`` from leaf values keyed by their :func:`config_options` path.

    A leaf not in ``values`` keeps its default; nested configs are built the same way.
    """
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for spec in dataclasses.fields(cls):
        here, kind = (*path, spec.name), hints[spec.name]
        if dataclasses.is_dataclass(kind):
            kwargs[spec.name] = build_config(values, kind, here)
        elif here in values:
            kwargs[spec.name] = values[here]
    return cls(**kwargs)


# --- Results -------------------------------------------------------------------------------------

ROLES: tuple[str, ...] = ("weights", "activations", "gradients")
CsvLayout = Literal["column", "per_role", "json_only"]


def _result(doc: str, csv: CsvLayout = "column") -> dict[str, str]:
    """A result field's metadata: ``doc`` documents it in ``results.json``; ``csv`` its columns.

    "column": one CSV column; "per_role": a dict over :data:`ROLES`, one column per role named
    ``<field>_<role>``; "json_only": curves and histograms, in ``results.json`` only.
    """
    return {"doc": doc, "csv": csv}


@dataclasses.dataclass
class RunResult:
    """Everything measured in one run; each field's ``metadata["doc"]`` says what it is.

    Rates are fractions in [0, 1]; None means "not measured" (the float32 baseline quantizes
    nothing) or "not reached" (a run that diverged has no final loss).
    """

    format: str | None = field(metadata=_result("format name, null for the float32 baseline"))
    rule: str = field(
        metadata=_result(
            "update rule: float32, or the weight storage rule (nearest, stochastic, ...)"
        )
    )
    status: str = field(
        metadata=_result(
            "'ok', or 'diverged' when the loss or a weight became non-finite or too large"
        )
    )
    diverged_step: int | None = field(
        metadata=_result("1-based step of the divergence, null when it finished")
    )
    steps_run: int = field(
        metadata=_result("train steps executed (up to and including the diverged step)")
    )
    final_val_loss: float | None = field(
        metadata=_result("validation loss (nats/char) after the last step; null if diverged")
    )
    best_val_loss: float | None = field(
        metadata=_result("lowest validation loss seen at any evaluation")
    )
    best_step: int | None = field(metadata=_result("the step of best_val_loss"))
    final_train_loss: float | None = field(
        metadata=_result("training loss of the last step before the end or the divergence")
    )
    stall_rate: float | None = field(
        metadata=_result(
            "mean over steps of the fraction of weights with |g| > 1e-10 whose stored value Adam's "
            "update would not change under nearest rounding: Q(w + u) == Q(w). Under nearest "
            "storage these updates are lost; under the other rules it is what nearest rounding "
            "would have lost (they land such updates, in expectation or later)"
        )
    )
    final_stall_rate: float | None = field(
        metadata=_result("stall_rate over the last fifth of the steps")
    )
    flip_rate: float | None = field(
        metadata=_result("mean over steps of the fraction of stored weights that changed")
    )
    landed_ratio: float | None = field(
        metadata=_result(
            "sum |stored weight change| / sum |requested update| over the run: near 1 the movement "
            "arrives (in expectation), near 0 it is lost"
        )
    )
    saturation: dict[str, float | None] = field(
        metadata=_result(
            "per role (weights, activations, gradients): fraction of entries whose scaled "
            "magnitude exceeded the format's largest value",
            "per_role",
        )
    )
    underflow: dict[str, float | None] = field(
        metadata=_result(
            "per role: fraction of nonzero entries that were quantized to zero", "per_role"
        )
    )
    update_ulp_hist: dict[str, int] = field(
        metadata=_result(
            "counts over the run of |u| / ulp(w) in bins (labels are the bin ranges, '0' counts "
            "zero updates; below 1/2 a nearest-rounded update is lost)",
            "json_only",
        )
    )
    wall_time_s: float = field(
        metadata=_result("seconds the run trained and evaluated, compilation excluded")
    )
    compile_time_s: float = field(
        metadata=_result(
            "seconds spent compiling programs this run was the first to need (the first format "
            "of each rule compiles for all of them)"
        )
    )
    eval_steps: list[int] = field(
        metadata=_result("steps at which the validation loss was measured", "json_only")
    )
    val_losses: list[float | None] = field(
        metadata=_result("validation loss at each of eval_steps", "json_only")
    )
    train_loss: list[float | None] = field(
        metadata=_result("training loss at every step", "json_only")
    )
    stall_curve: list[float | None] = field(
        metadata=_result("stall rate at every step (empty for the baseline)", "json_only")
    )
    flip_curve: list[float | None] = field(
        metadata=_result("flip rate at every step (empty for the baseline)", "json_only")
    )

    @property
    def label(self) -> str:
        return self.rule if self.format is None else f"{self.format}/{self.rule}"


def _meta(doc: str) -> dict[str, str]:
    return {"doc": doc}


@dataclasses.dataclass
class SweepResult:
    """A sweep, finished or so far: its runs and how it ran (``metadata["doc"]`` per field)."""

    config: SweepConfig = field(
        metadata=_meta("the SweepConfig (formats, rules, steps, seed, train and model settings)")
    )
    corpus: str = field(metadata=_meta("where the text came from"))
    vocab_size: int = field(metadata=_meta("characters in the vocabulary"))
    num_params: int = field(metadata=_meta("parameters of the model"))
    runs: list[RunResult] = field(metadata=_meta("the runs finished so far, in run order"))
    compilations: dict[str, int] = field(
        metadata=_meta(
            "compiled programs per rule (init, train chunk, tail chunk, evaluation); one set "
            "serves every format"
        )
    )
    wall_time_s: float = field(
        metadata=_meta("seconds for the whole sweep so far, compilation included")
    )
    compile_time_s: float = field(metadata=_meta("seconds of wall_time_s spent compiling"))

    @property
    def complete(self) -> bool:
        """Whether every run of the config has finished (False for an interrupted sweep)."""
        return len(self.runs) == len(self.config.runs())


class CompiledProgram:
    """``fn`` compiled ahead of time, once per argument signature, counting and timing it.

    Owning ``jax.jit(fn).lower(*args).compile()`` makes the number of compilations and their
    time public facts of this object (JAX's jit cache size is private), and keeps compilation
    out of the time of the call that first needs it. The signature is the tree structure and the
    abstract value (shape, dtype, weak type) of every argument leaf, what decides a retrace.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._lower = jax.jit(fn).lower
        self._executables: dict[Hashable, Any] = {}
        self.compile_time_s = 0.0

    @property
    def compilations(self) -> int:
        return len(self._executables)

    def __call__(self, *args: Any) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten(args)
        key = (treedef, tuple(jax.typeof(leaf) for leaf in leaves))
        executable = self._executables.get(key)
        if executable is None:
            start = time.perf_counter()
            executable = self._lower(*args).compile()
            self.compile_time_s += time.perf_counter() - start
            self._executables[key] = executable
        return executable(*args)


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
    compile_time: float,
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
        saturation={role: _rate(rows[role], 3, 0) if measured else None for role in ROLES},
        underflow={role: _rate(rows[role], 2, 1) if measured else None for role in ROLES},
        update_ulp_hist=dict(
            zip(
                HISTOGRAM_LABELS,
                (int(c) for c in rows["hist"].astype(np.float64).sum(axis=0)),
                strict=True,
            )
        ),
        wall_time_s=wall,
        compile_time_s=compile_time,
        eval_steps=eval_steps,
        val_losses=[_finite_or_none(v) for v in val_losses],
        train_loss=[_finite_or_none(v) for v in rows["loss"]],
        stall_curve=[_finite_or_none(v) for v in stall] if measured else [],
        flip_curve=[_finite_or_none(v) for v in flips] if measured else [],
    )


def _first_bad_step(metrics: dict[str, np.ndarray], threshold: float) -> int | None:
    bad = ~metrics["finite"].astype(bool) | ~(metrics["loss"] <= threshold)
    return int(np.argmax(bad)) if bad.any() else None


def _programs(
    model: CharTransformer, rule: UpdateRule, config: SweepConfig, chunk_len: int
) -> dict[str, CompiledProgram]:
    """The programs of one rule, each compiled on first use and shared by all its formats."""
    train = config.train
    tail_len = config.steps % chunk_len or 1
    return {
        "init": CompiledProgram(lambda f: init_state(model, rule, train, f, config.seed)),
        "train_chunk": CompiledProgram(make_train_chunk(model, rule, train, chunk_len)),
        "tail_chunk": CompiledProgram(make_train_chunk(model, rule, train, tail_len)),
        "evaluate": CompiledProgram(
            lambda p, q, f, x, y: evaluate(model, rule, p, f, x, y, quant_state=q)
        ),
    }


def _compile_time(programs: dict[str, dict[str, CompiledProgram]]) -> float:
    return sum(p.compile_time_s for rule in programs.values() for p in rule.values())


def run_sweep(
    config: SweepConfig,
    corpus: CharCorpus,
    progress: Callable[[int, str], Any] | None = None,
    on_run: Callable[[SweepResult], Any] | None = None,
) -> SweepResult:
    """Trains every ``(format, rule)`` pair of ``config`` on ``corpus``.

    Args:
      config: the sweep.
      corpus: train / validation tokens (see :mod:`altgrad_jax.experiments.data`).
      progress: called as ``progress(steps_done, label)`` after each chunk, e.g. to move a bar.
      on_run: called with the sweep so far after each run, e.g. to write the results of every
        finished run, so that an interrupted sweep keeps them.

    Returns:
      A :class:`SweepResult`; ``compilations`` counts the compiled programs per rule (one train
      chunk per chunk length and one evaluation serve every format of a rule).
    """
    start = time.perf_counter()
    model = CharTransformer(config.model_config(corpus.vocab_size))
    context = model.config.context
    if min(len(corpus.train), len(corpus.val)) <= context + 1:
        raise ValueError(
            f"corpus {corpus.name!r} is too short for context {context}: "
            f"{len(corpus.train)} train / {len(corpus.val)} validation characters"
        )
    tokens = jnp.asarray(corpus.train)
    val_inputs, val_targets = (
        jnp.asarray(a)
        for a in validation_batches(
            corpus.val, config.train.batch_size, context, config.train.eval_batches
        )
    )
    threshold = (
        config.diverge_loss
        if config.diverge_loss is not None
        else 2 * math.log(max(corpus.vocab_size, 2))
    )
    chunk_len = min(config.eval_every, config.steps)
    programs: dict[str, dict[str, CompiledProgram]] = {}
    result = SweepResult(config, corpus.name, corpus.vocab_size, 0, [], {}, 0.0, 0.0)
    for fmt_name, rule_name in config.runs():
        rule = get_update_rule(rule_name, config.ulp_steps)
        if rule_name not in programs:
            programs[rule_name] = _programs(model, rule, config, chunk_len)
        program = programs[rule_name]
        fmt = format_params(get_format(fmt_name or "E4M3")).as_arrays()
        run_start, compile_start = time.perf_counter(), _compile_time(programs)
        state = program["init"](fmt)
        result.num_params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(state.params))
        label = fmt_name + "/" + rule_name if fmt_name else rule_name
        metrics, eval_steps, val_losses = [], [], []
        done, diverged = 0, None
        while done < config.steps:
            full = config.steps - done >= chunk_len
            state, chunk_metrics = program["train_chunk" if full else "tail_chunk"](
                state, fmt, tokens
            )
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
            loss = program["evaluate"](
                state.params, state.quant_state, fmt, val_inputs, val_targets
            )
            val_losses.append(float(loss))
        compile_time = _compile_time(programs) - compile_start
        wall = time.perf_counter() - run_start - compile_time
        result.runs.append(
            _summarise(
                fmt_name, rule, metrics, eval_steps, val_losses, diverged, wall, compile_time
            )
        )
        result.compilations = {
            name: sum(p.compilations for p in fns.values()) for name, fns in programs.items()
        }
        result.wall_time_s = time.perf_counter() - start
        result.compile_time_s = _compile_time(programs)
        if on_run is not None:
            on_run(result)
    return result
