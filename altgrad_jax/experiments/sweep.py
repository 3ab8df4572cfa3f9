"""The format-comparison sweep: one model, many formats, update rules and seeds, batched.

For every update rule one program is compiled (a chunk of train steps followed by the validation
loss, and the initialisation) with the format as a traced :class:`FormatParams`, mapped over
every (format, seed) member of the rule: all formats and seeds of a rule run as one batch. The
batch axis is sharded over every device through a ``jax.sharding.Mesh`` (``shard_map``: one
device on a laptop, every GPU of a workstation); members never interact, so no device talks to
another. On each device the members run one after another (``lax.map``), not vmapped:
measured on 2 CPU cores, ``vmap`` over 15 members was 1.11x the throughput at the default model
size and 0.45x at the ``--full`` size, and its numbers depend on the batch size (XLA fuses a
batched program differently), whereas ``lax.map`` gives every member exactly the numbers of the
same run alone on its device. Sharded over 8 simulated CPU devices a tiny model gets the numbers
of one device. At d_model 16, 8 devices and 2 give the same numbers bit for bit (16 seeds), while
one device differs from them in the last bits of the loss for about half the seeds: XLA:CPU
compiles the one-device program differently from the partitioned one (measured, not fixed).
A block format (MXFP8, MXFP4, NVFP4) is static, so it gets a program of its own, batched over
seeds. The compiled programs are cached per process (:func:`batch_programs`), so a second sweep
with the same settings compiles nothing. Each batch after the first is compiled in a background
thread while the one before it trains (XLA's compiler and the training share the cores instead of
taking turns), and every wait polls, so Ctrl-C stops a sweep at once. On several hosts,
``jax.distributed.initialize()`` before the sweep makes ``jax.devices()``, and so the mesh,
span them all.

A member that produces a non-finite loss or parameter, or a loss above ``diverge_loss``, is
reported as diverged at that step (its statistics stop before it); the batch stops when all of
its members have diverged.

The configuration is one tree of frozen dataclasses (:class:`SweepConfig` holding a
:class:`TrainConfig` and a :class:`ModelSize`); each field's metadata carries its help text, so the
command line (:func:`config_options`) and the validation are built from the fields and their
defaults, never restated. The results schema is :class:`RunResult`: each field's metadata
documents it and says how it appears in ``results.csv``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
import typing
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import field
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from altgrad_jax._checks import (
    check_bool,
    check_choices,
    check_int,
    check_optional_positive_float,
    check_positive_float,
    check_positive_int,
    choices_of,
)
from altgrad_jax.formats import BlockFormat, FormatParams, format_params, get_format
from altgrad_jax.optim import HISTOGRAM_LABELS, low_precision_storage, scale_by_ulp
from altgrad_jax.optim.storage import StorageRule

from . import stats
from .data import CharCorpus
from .model import LAYER_GROUPS, CharTransformer, ModelConfig
from .train import (
    TrainConfig,
    UpdateRule,
    evaluate,
    init_state,
    learning_rate,
    make_train_chunk,
    validation_batches,
)

__all__ = [
    "BASELINE",
    "DEFAULT_FORMATS",
    "DEFAULT_RULES",
    "FULL_GRID",
    "ROLES",
    "RULE_NAMES",
    "CellResult",
    "CompiledProgram",
    "ConfigOption",
    "ModelSize",
    "RuleName",
    "RunResult",
    "SweepConfig",
    "SweepResult",
    "batch_programs",
    "build_config",
    "check_choices",
    "check_int",
    "check_optional_positive_float",
    "config_options",
    "extra_state_bytes",
    "get_update_rule",
    "grad_format_for",
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
# The default grid fits 5 minutes on 2 CPU cores: the FP8 pair and E7M0 (the three 8-bit
# stories: range, precision, no mantissa) beside the 16-bit storage formats, 150 steps (fewer
# leave some seeds on the unigram plateau, and the intervals wide); --full adds the other 8-bit
# formats, every rule and 300 steps.
DEFAULT_FORMATS: tuple[str, ...] = ("E5M2", "E4M3", "E7M0", "BF16", "FP16")
RuleName = Literal[StorageRule, "ulp"]
RULE_NAMES: tuple[str, ...] = choices_of(RuleName)
# Plain nearest storage, the free remedy (stochastic rounding) and the float32 master copy (the
# usual mixed precision practice, 4 bytes per parameter) as the reference. "compensated" (error
# feedback, also 4 bytes) matched master within 0.01 nats in every cell of a 150-step run and
# "ulp" is an experiment: both are available by name and in --full.
DEFAULT_RULES: tuple[str, ...] = ("nearest", "stochastic", "master")
# --full: every 8-bit format, BF16 and FP16 under every rule, at the model size of the earlier
# single-seed sweep (values by flat config name).
FULL_GRID: dict[str, Any] = {
    "formats": ("E5M2", "E4M3", "E3M4", "E2M5", "E1M6", "E0M7", "E7M0", "BF16", "FP16"),
    "rules": RULE_NAMES,
    "steps": 300,
    "eval_every": 50,
    "context": 64,
    "d_model": 64,
    "n_heads": 4,
    "n_layers": 2,
}
GRAD_FORMAT_CHOICES = ("auto", "same")


def grad_format_for(fmt: str, grad_format: str) -> str:
    """The output gradients' format of a run whose forward format is ``fmt``.

    "same": ``fmt``. "auto": E5M2 when the forward format is E4M3 (the FP8 pair of
    Micikevicius et al. 2022: E4M3's precision forward, E5M2's range for gradients), else
    ``fmt``. Any other value is a format name used for every run.
    """
    if grad_format == "same" or (grad_format == "auto" and fmt != "E4M3"):
        return fmt
    return "E5M2" if grad_format == "auto" else grad_format


def _check_grad_format(name: str, value: Any) -> str:
    if value in GRAD_FORMAT_CHOICES:
        return value
    try:
        return get_format(value).name
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: {err}; or one of {', '.join(GRAD_FORMAT_CHOICES)}") from None


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
            optimizer=lambda fmt, config: optax.chain(
                optax.scale_by_adam(), _ulp_scale(config, ulp_steps), scale_by_ulp(fmt)
            ),
            storage=lambda fmt: low_precision_storage(fmt, "nearest"),
        )
    return UpdateRule(name, storage=lambda fmt: low_precision_storage(fmt, name))


def _ulp_scale(config: TrainConfig, ulp_steps: float) -> optax.GradientTransformation:
    """``-ulp_steps`` grid steps, following the schedule's shape (its value over the peak)."""
    rate = learning_rate(config)
    if not callable(rate):
        return optax.scale(-ulp_steps)
    return optax.scale_by_schedule(lambda count: -ulp_steps * rate(count) / config.learning_rate)


def extra_state_bytes(state: Any, num_params: int) -> float:
    """Bytes per parameter the storage rule keeps besides the stored weights: its per-entry
    arrays (the compensated residual, the master copy), from a (batched) :class:`RunState`."""
    storage = state.storage_state
    if not storage:
        return 0.0
    batch = jax.tree_util.tree_leaves(state.params)[0].shape[0]
    arrays = jax.tree_util.tree_leaves((storage.residual, storage.master))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in arrays) / batch / num_params


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

    formats: tuple[str, ...] = _option(
        DEFAULT_FORMATS,
        "formats to run, each under every rule (also the block formats MXFP8_E4M3, MXFP4, "
        "NVFP4: activations, weights and gradients of every dense layer blocked, weights "
        "stored in it)",
    )
    rules: tuple[str, ...] = _option(DEFAULT_RULES, f"update rules, from {', '.join(RULE_NAMES)}")
    baseline: bool = _option(
        True, "train float32 runs (nothing quantized) for reference", flag="--no-baseline"
    )
    seeds: int = _option(3, "seeds per (format, rule) cell, batched in one program")
    seed: int = _option(
        0,
        "first seed (initialisation and batch order); the cells use seed .. seed+seeds-1",
        check=check_int,
    )
    eval_every: int = _option(50, "steps between validation losses (one compiled chunk)")
    grad_format: str = _option(
        "auto",
        "format of the output gradients: auto (E5M2 for an E4M3 run, the FP8 pair; else the "
        "forward format), same (the forward format), or a format name",
        check=_check_grad_format,
    )
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

    @property
    def steps(self) -> int:
        return self.train.steps

    @property
    def seed_list(self) -> tuple[int, ...]:
        return tuple(range(self.seed, self.seed + self.seeds))

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

    def cells(self) -> list[tuple[str | None, str]]:
        """``(format, rule)`` cells in run order: the baseline first, then rule by rule."""
        pairs: list[tuple[str | None, str]] = [(None, BASELINE)] if self.baseline else []
        return pairs + [(fmt, rule) for rule in self.rules for fmt in self.formats]

    def runs(self) -> list[tuple[str | None, str, int]]:
        """``(format, rule, seed)`` of every run, cell by cell."""
        return [(fmt, rule, seed) for fmt, rule in self.cells() for seed in self.seed_list]


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
CsvLayout = Literal["column", "per_role", "per_layer", "json_only"]


def _result(doc: str, csv: CsvLayout = "column") -> dict[str, str]:
    """A result field's metadata: ``doc`` documents it in ``results.json``; ``csv`` its columns.

    "column": one CSV column; "per_role": a dict over :data:`ROLES`, one column per role named
    ``<field>_<role>``; "per_layer": the same over :data:`LAYER_GROUPS`; "json_only": curves and
    histograms, in ``results.json`` only.
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
    seed: int = field(metadata=_result("seed of the initialisation and the batch order"))
    grad_format: str | None = field(
        metadata=_result("format of the output gradients (null for the baseline)")
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
    layer_stall: dict[str, float | None] = field(
        metadata=_result(
            "per layer group (embedding, attention, mlp, head, norm): stalled over counted "
            "entries over the run",
            "per_layer",
        )
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
            "magnitude exceeded the format's largest value (weights of a block format: null, "
            "their block scales follow each block's maximum)",
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
        metadata=_result(
            "its share of the seconds its batch trained and evaluated, compilation excluded"
        )
    )
    compile_time_s: float = field(
        metadata=_result("its share of the seconds its batch's programs took to compile")
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
class CellResult:
    """One (format, rule) cell over its seeds: means and 95% Student-t intervals.

    Each statistic is a :class:`~altgrad_jax.experiments.stats.Interval` over the seeds that
    measured it (``n``); a diverged seed has no final loss, so it is counted in ``diverged``
    and left out of the loss intervals.
    """

    format: str | None = field(metadata=_meta("format name, null for the float32 baseline"))
    rule: str = field(metadata=_meta("update rule"))
    grad_format: str | None = field(metadata=_meta("format of the output gradients"))
    seeds: int = field(metadata=_meta("seeds run"))
    diverged: int = field(metadata=_meta("seeds that diverged"))
    extra_state_bytes: float = field(
        metadata=_meta(
            "bytes per parameter the rule keeps besides the stored weights (compensated's "
            "residual, master's float32 copy: 4; nearest, stochastic: 0)"
        )
    )
    final_val_loss: stats.Interval = field(metadata=_meta("final validation loss"))
    best_val_loss: stats.Interval = field(metadata=_meta("best validation loss"))
    stall_rate: stats.Interval = field(metadata=_meta("stall rate over the run"))
    final_stall_rate: stats.Interval = field(metadata=_meta("stall rate, last fifth of steps"))
    flip_rate: stats.Interval = field(metadata=_meta("flip rate over the run"))
    landed_ratio: stats.Interval = field(metadata=_meta("landed ratio over the run"))
    layer_stall: dict[str, stats.Interval] = field(metadata=_meta("stall rate per layer group"))

    @property
    def label(self) -> str:
        return self.rule if self.format is None else f"{self.format}/{self.rule}"


def summarise_cell(runs: list[RunResult], extra_bytes: float) -> CellResult:
    """The :class:`CellResult` of the seeds ``runs`` of one cell."""
    first = runs[0]

    def over(name: str) -> stats.Interval:
        return stats.interval([getattr(run, name) for run in runs])

    return CellResult(
        format=first.format,
        rule=first.rule,
        grad_format=first.grad_format,
        seeds=len(runs),
        diverged=sum(run.status == "diverged" for run in runs),
        extra_state_bytes=extra_bytes,
        final_val_loss=over("final_val_loss"),
        best_val_loss=over("best_val_loss"),
        stall_rate=over("stall_rate"),
        final_stall_rate=over("final_stall_rate"),
        flip_rate=over("flip_rate"),
        landed_ratio=over("landed_ratio"),
        layer_stall={
            group: stats.interval([run.layer_stall[group] for run in runs])
            for group in LAYER_GROUPS
        },
    )


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
    cells: list[CellResult] = field(metadata=_meta("per (format, rule): seed statistics"))
    compilations: dict[str, int] = field(
        metadata=_meta(
            "compiled programs per rule (init, train chunk with its evaluation, tail chunk); "
            "one set serves every format and seed of the rule (block formats add their own); "
            "programs an earlier sweep of the same process compiled are reused and not counted"
        )
    )
    devices: int = field(metadata=_meta("devices the batch axis was sharded over"))
    wall_time_s: float = field(
        metadata=_meta("seconds for the whole sweep so far, compilation included")
    )
    compile_time_s: float = field(
        metadata=_meta(
            "seconds spent compiling; each batch after the first compiles in a background "
            "thread while the one before it trains, so this overlaps the training"
        )
    )
    compile_wait_s: float = field(
        default=0.0,
        metadata=_meta("seconds of wall_time_s the training waited for compilation"),
    )

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
    :meth:`prepare` compiles without running, from any thread (the sweep compiles the next
    batch while one trains); a call that needs a compilation in progress waits for it.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._lower = jax.jit(fn).lower
        self._executables: dict[Hashable, Any] = {}
        self._lock = threading.Lock()
        self.compile_time_s = 0.0

    @property
    def compilations(self) -> int:
        return len(self._executables)

    def prepare(self, *args: Any) -> Any:
        """The executable for ``args``' signature, compiled now unless it already is."""
        leaves, treedef = jax.tree_util.tree_flatten(args)
        key = (treedef, tuple(jax.typeof(leaf) for leaf in leaves))
        with self._lock:
            executable = self._executables.get(key)
            if executable is None:
                start = time.perf_counter()
                executable = self._lower(*args).compile()
                self.compile_time_s += time.perf_counter() - start
                self._executables[key] = executable
        return executable

    def __call__(self, *args: Any) -> Any:
        return self.prepare(*args)(*args)


class InBackground:
    """``fn(*args)`` running in a daemon thread; :meth:`result` waits for it.

    A daemon, so an interrupted sweep exits without waiting for a compilation; the wait polls,
    so Ctrl-C reaches the main thread at once (a blocking join or device read would hold it
    until XLA returns).
    """

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self._outcome: tuple[bool, Any] | None = None
        self._thread = threading.Thread(
            target=self._run, args=(fn, args), name=_BACKGROUND_NAME, daemon=True
        )
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self._outcome = (True, fn(*args))
        except BaseException as err:  # re-raised by result(), in the caller's thread
            self._outcome = (False, err)

    def result(self) -> Any:
        while self._thread.is_alive():
            self._thread.join(_POLL_S)
        ok, value = self._outcome
        if not ok:
            raise value
        return value


_POLL_S = 0.05
_BACKGROUND_NAME = "altgrad-jax-prepare"


def wait_ready(tree: Any) -> Any:
    """``jax.device_get(tree)`` once every array of it is computed, polling so that Ctrl-C
    interrupts the wait (the computation itself cannot be stopped)."""
    for leaf in jax.tree_util.tree_leaves(tree):
        while not leaf.is_ready():
            time.sleep(_POLL_S)
    return jax.device_get(tree)


def _finite_or_none(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _rate(stats_rows: np.ndarray, part: int, whole: int) -> float | None:
    """Summed counts ``stats_rows[:, part] / stats_rows[:, whole]``, None when not measured."""
    if stats_rows.size == 0 or not np.all(np.isfinite(stats_rows[:, [part, whole]])):
        return None
    total = float(stats_rows[:, whole].sum())
    return float(stats_rows[:, part].sum()) / total if total > 0 else 0.0


class Member(NamedTuple):
    """One run of a batch: its format (None for the baseline), gradient format and seed."""

    format: str | None
    grad_format: str | None
    seed: int


def _summarise(
    member: Member,
    rule: UpdateRule,
    rows: dict[str, np.ndarray],
    eval_steps: list[int],
    val_losses: list[float],
    diverged_step: int | None,
    steps_run: int,
    wall: float,
    compile_time: float,
) -> RunResult:
    """The :class:`RunResult` of one member from its per-step ``rows`` (all steps it ran)."""
    if diverged_step is not None:
        # Statistics cover the steps before the divergence.
        rows = {key: value[: diverged_step - 1] for key, value in rows.items()}
    finite_vals = [(v, s) for v, s in zip(val_losses, eval_steps, strict=True) if math.isfinite(v)]
    best_val, best_step = min(finite_vals) if finite_vals else (None, None)
    final_val = _finite_or_none(val_losses[-1]) if val_losses and diverged_step is None else None
    stall, flips = rows["stall_rate"], rows["flip_rate"]
    quantized = rule.quantized and len(stall) > 0
    measured = quantized and member.format is not None
    tail = stall[-max(len(stall) // 5, 1) :] if measured else stall
    layers = rows["layer_stall"].sum(axis=0) if measured else None
    return RunResult(
        format=member.format,
        rule=rule.name,
        seed=member.seed,
        grad_format=member.grad_format,
        status="diverged" if diverged_step is not None else "ok",
        diverged_step=diverged_step,
        steps_run=steps_run,
        final_val_loss=final_val,
        best_val_loss=best_val,
        best_step=best_step,
        final_train_loss=_finite_or_none(rows["loss"][-1]) if len(rows["loss"]) else None,
        stall_rate=float(stall.mean()) if measured else None,
        final_stall_rate=float(tail.mean()) if measured else None,
        layer_stall={
            group: (float(layers[i, 0] / layers[i, 1]) if layers[i, 1] > 0 else None)
            if layers is not None
            else None
            for i, group in enumerate(LAYER_GROUPS)
        },
        flip_rate=float(flips.mean()) if measured else None,
        landed_ratio=_finite_or_none(rows["landed_ratio"][-1]) if quantized else None,
        saturation={role: _rate(rows[role], 3, 0) if quantized else None for role in ROLES},
        underflow={role: _rate(rows[role], 2, 1) if quantized else None for role in ROLES},
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


def _first_bad_steps(metrics: dict[str, np.ndarray], threshold: float) -> list[int | None]:
    """Per member (leading axis), the 0-based index of its first bad step in the chunk."""
    bad = ~metrics["finite"].astype(bool) | ~(metrics["loss"] <= threshold)
    return [int(np.argmax(row)) if row.any() else None for row in bad]


class Batch(NamedTuple):
    """Runs sharing one compiled program: a rule, and a static format (block formats) or None
    (formats traced, so every per-tensor format and the baseline's placeholder share it)."""

    rule: str
    static_format: str | None
    members: list[Member]


def batches(config: SweepConfig) -> list[Batch]:
    """The batches of ``config`` in run order: the baseline, then each rule's traced formats
    followed by its block formats one by one; every batch holds all seeds."""
    seeds = config.seed_list

    def members(names: tuple[str, ...]) -> list[Member]:
        return [
            Member(name, grad_format_for(name, config.grad_format), seed)
            for name in names
            for seed in seeds
        ]

    traced = tuple(f for f in config.formats if not isinstance(get_format(f), BlockFormat))
    blocks = tuple(f for f in config.formats if isinstance(get_format(f), BlockFormat))
    out = [Batch(BASELINE, None, [Member(None, None, s) for s in seeds])] if config.baseline else []
    for rule in config.rules:
        if traced:
            out.append(Batch(rule, None, members(traced)))
        out += [Batch(rule, name, members((name,))) for name in blocks]
    return out


def _stack(trees: list[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def _traced(name: str) -> FormatParams:
    return format_params(get_format(name)).as_arrays()


def _member_formats(batch: Batch) -> Any:
    """The per-member format arguments: stacked traced formats, or () for a static batch."""
    if batch.static_format is not None:
        return ()
    # The baseline quantizes nothing; E4M3 only fills the argument.
    return (
        _stack([_traced(m.format or "E4M3") for m in batch.members]),
        _stack([_traced(m.grad_format or "E4M3") for m in batch.members]),
    )


@functools.lru_cache(maxsize=16)
def batch_programs(
    model_config: ModelConfig,
    rule_name: str,
    ulp_steps: float,
    train: TrainConfig,
    chunk_len: int,
    static_format: str | None,
    mesh: Mesh,
) -> dict[str, CompiledProgram]:
    """The programs of one batch (init, a chunk of ``chunk_len`` steps with its evaluation, and
    the shorter last chunk if ``train.steps`` needs one), mapped over its members and compiled
    on first use for each shape of the batch.

    Cached per process: a later sweep with the same settings (a notebook's second run, other
    seeds of the same count, the tests) reuses the compiled programs instead of paying the
    compilation again. Each program takes the pair of traced (forward, gradient) formats as
    ``fmts``, or () when the format is static.
    """
    model = CharTransformer(model_config)
    rule = get_update_rule(rule_name, ulp_steps)
    static = None
    if static_format is not None:
        static = (get_format(static_format), get_format(grad_format_for(static_format, "auto")))

    def formats(fmts: Any) -> tuple[Any, Any]:
        return static if static is not None else fmts

    def init(fmts, seed):
        fmt, grad_fmt = formats(fmts)
        return init_state(model, rule, train, fmt, seed, grad_fmt)

    def chunk_then_eval(chunk):
        def run(state, fmts, tokens, val_inputs, val_targets):
            fmt, grad_fmt = formats(fmts)
            state, metrics = chunk(state, fmt, tokens, grad_fmt)
            loss = evaluate(
                model, rule, state.params, fmt, val_inputs, val_targets,
                quant_state=state.quant_state, grad_fmt=grad_fmt,
            )  # fmt: skip
            return state, metrics, loss

        return _map_members(run, mesh, shared=3)

    tail_len = train.steps % chunk_len or chunk_len
    programs = {
        "init": CompiledProgram(_map_members(init, mesh, shared=0)),
        "train_chunk": CompiledProgram(
            chunk_then_eval(make_train_chunk(model, rule, train, chunk_len))
        ),
    }
    if tail_len != chunk_len:
        programs["tail_chunk"] = CompiledProgram(
            chunk_then_eval(make_train_chunk(model, rule, train, tail_len))
        )
    return programs


def _map_members(fn: Callable[..., Any], mesh: Mesh, shared: int) -> Callable[..., Any]:
    """``fn`` over the leading (member) axis of all but its last ``shared`` arguments.

    The members are sharded over the mesh's "batch" axis and each device runs its own one after
    another (``lax.map``), so a member's numbers do not depend on how many share its device.
    """
    batch, replicated = PartitionSpec("batch"), PartitionSpec()

    def local(*args):
        split = len(args) - shared
        return jax.lax.map(lambda xs: fn(*xs, *args[split:]), args[:split])

    def mapped(*args):
        specs = (batch,) * (len(args) - shared) + (replicated,) * shared
        # check_vma off: the storage rules branch (lax.cond) on replicated and per-member values.
        sharded = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=batch, check_vma=False)
        return sharded(*args)

    return mapped


def _compile_time(programs: dict[str, CompiledProgram]) -> float:
    return sum(p.compile_time_s for p in programs.values())


def _compilations(programs: dict[str, CompiledProgram]) -> int:
    return sum(p.compilations for p in programs.values())


def batch_mesh() -> Mesh:
    """A one-axis ("batch") mesh over every device JAX sees (all hosts' after
    ``jax.distributed.initialize()``)."""
    return Mesh(np.array(jax.devices()), ("batch",))


def _padded(members: list[Member], devices: int) -> list[Member]:
    """``members`` with the last repeated up to a multiple of ``devices`` (results dropped)."""
    return members + [members[-1]] * (-len(members) % devices)


class Prepared(NamedTuple):
    """A batch ready to train: its compiled programs, its members' inputs and initial state."""

    programs: dict[str, CompiledProgram]
    fmts: Any
    state: Any
    size: int  # members, padded to a multiple of the devices
    extra_bytes: float
    compile_time_s: float
    compilations: int


def _prepare(
    batch: Batch, config: SweepConfig, model_config: ModelConfig, data: Any, mesh: Mesh
) -> Prepared:
    """Compiles ``batch``'s programs (those an earlier sweep compiled are reused) and builds
    its initial state; safe to run in a background thread while another batch trains."""
    chunk_len = min(config.eval_every, config.steps)
    programs = batch_programs(
        model_config, batch.rule, config.ulp_steps, config.train, chunk_len,
        batch.static_format, mesh,
    )  # fmt: skip
    compiled_before, compile_before = _compilations(programs), _compile_time(programs)
    members = _padded(batch.members, mesh.size)
    shard = NamedSharding(mesh, PartitionSpec("batch"))
    fmts = jax.device_put(_member_formats(batch._replace(members=members)), shard)
    seeds = jax.device_put(jnp.asarray([m.seed for m in members], jnp.int32), shard)
    state = programs["init"](fmts, seeds)
    for name in ("train_chunk", "tail_chunk"):
        if name in programs:
            programs[name].prepare(state, fmts, *data)
    num_params = sum(leaf[0].size for leaf in jax.tree_util.tree_leaves(state.params))
    return Prepared(
        programs,
        fmts,
        state,
        len(members),
        extra_state_bytes(state, num_params),
        _compile_time(programs) - compile_before,
        _compilations(programs) - compiled_before,
    )


def _run_batch(
    batch: Batch,
    prepared: Prepared,
    rule: UpdateRule,
    config: SweepConfig,
    data: tuple[jax.Array, jax.Array, jax.Array],
    threshold: float,
    progress: Callable[[int, str], Any] | None,
) -> list[RunResult]:
    """Trains every member of ``batch`` together from its prepared state; their results."""
    start = time.perf_counter()
    programs, fmts, state = prepared.programs, prepared.fmts, prepared.state
    chunk_len = min(config.eval_every, config.steps)
    label = batch.rule if batch.static_format is None else f"{batch.static_format}/{batch.rule}"
    chunks: list[dict[str, np.ndarray]] = []
    losses: list[np.ndarray] = []
    ends: list[int] = []
    first_bad: list[int | None] = [None] * prepared.size
    done = 0
    while done < config.steps:
        name = "train_chunk" if config.steps - done >= chunk_len else "tail_chunk"
        state, metrics, loss = programs[name](state, fmts, *data)
        metrics, loss = wait_ready((metrics, loss))
        n = metrics["loss"].shape[1]
        for i, bad in enumerate(_first_bad_steps(metrics, threshold)):
            if first_bad[i] is None and bad is not None:
                first_bad[i] = done + bad
        chunks.append(metrics)
        losses.append(loss)
        done += n
        ends.append(done)
        if progress is not None:
            progress(n * len(batch.members), label)
        if all(bad is not None for bad in first_bad):
            break
    wall = time.perf_counter() - start
    count = len(batch.members)
    results = []
    for i, member in enumerate(batch.members):
        rows = {key: np.concatenate([c[key][i] for c in chunks]) for key in chunks[0]}
        bad = first_bad[i]
        # A member is evaluated after each chunk it finished without diverging.
        kept = [k for k, end in enumerate(ends) if bad is None or end <= bad]
        steps_run = done if bad is None else next(end for end in ends if end > bad)
        results.append(
            _summarise(
                member,
                rule,
                {key: value[:steps_run] for key, value in rows.items()},
                [ends[k] for k in kept],
                [float(losses[k][i]) for k in kept],
                None if bad is None else bad + 1,
                steps_run,
                wall / count,
                prepared.compile_time_s / count,
            )
        )
    return results


def run_sweep(
    config: SweepConfig,
    corpus: CharCorpus,
    progress: Callable[[int, str], Any] | None = None,
    on_run: Callable[[SweepResult], Any] | None = None,
    mesh: Mesh | None = None,
) -> SweepResult:
    """Trains every ``(format, rule, seed)`` run of ``config`` on ``corpus``, batch by batch.

    Args:
      config: the sweep.
      corpus: train / validation tokens (see :mod:`altgrad_jax.experiments.data`).
      progress: called as ``progress(run_steps_done, label)`` after each chunk of a batch.
      on_run: called with the sweep so far after each batch (a rule's runs), e.g. to write the
        results of every finished run, so that an interrupted sweep keeps them.
      mesh: the devices to shard each batch over (default :func:`batch_mesh`: all of them).

    Returns:
      A :class:`SweepResult`; ``compilations`` counts the compiled programs per rule.
    """
    start = time.perf_counter()
    mesh = batch_mesh() if mesh is None else mesh
    model = CharTransformer(config.model_config(corpus.vocab_size))
    context = model.config.context
    if min(len(corpus.train), len(corpus.val)) <= context + 1:
        raise ValueError(
            f"corpus {corpus.name!r} is too short for context {context}: "
            f"{len(corpus.train)} train / {len(corpus.val)} validation characters"
        )
    data = (
        jnp.asarray(corpus.train),
        *(
            jnp.asarray(a)
            for a in validation_batches(
                corpus.val, config.train.batch_size, context, config.train.eval_batches
            )
        ),
    )
    threshold = (
        config.diverge_loss
        if config.diverge_loss is not None
        else 2 * math.log(max(corpus.vocab_size, 2))
    )
    result = SweepResult(config, corpus.name, corpus.vocab_size, 0, [], [], {}, mesh.size, 0, 0)
    todo = batches(config)
    # Each batch is prepared (compiled) in a background thread, the next while this one trains.
    upcoming = InBackground(_prepare, todo[0], config, model.config, data, mesh) if todo else None
    for k, batch in enumerate(todo):
        waited = time.perf_counter()
        prepared = upcoming.result()
        result.compile_wait_s += time.perf_counter() - waited
        if k + 1 < len(todo):
            upcoming = InBackground(_prepare, todo[k + 1], config, model.config, data, mesh)
        rule = get_update_rule(batch.rule, config.ulp_steps)
        runs = _run_batch(batch, prepared, rule, config, data, threshold, progress)
        result.runs += runs
        for fmt in dict.fromkeys(m.format for m in batch.members):
            result.cells.append(
                summarise_cell([r for r in runs if r.format == fmt], prepared.extra_bytes)
            )
        result.num_params = _num_params(model)
        counts = result.compilations
        counts[batch.rule] = counts.get(batch.rule, 0) + prepared.compilations
        result.compile_time_s += prepared.compile_time_s
        result.wall_time_s = time.perf_counter() - start
        if on_run is not None:
            on_run(result)
    return result


def _num_params(model: CharTransformer) -> int:
    dummy = jnp.zeros((1, model.config.context), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)["params"]
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes))
