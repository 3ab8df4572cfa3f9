"""Experiments: the format-comparison sweep, its data, model and reports.

``python -m altgrad_jax sweep`` trains a small character transformer under each chosen format and
update rule and reports which format loses its updates to bit-stall and which rule rescues it.
The same from Python::

    from altgrad_jax.experiments import (
        SweepConfig, make_corpus, run_sweep, stdlib_text, write_outputs,
    )
    result = run_sweep(SweepConfig(formats=("E5M2", "E4M3")), make_corpus(stdlib_text(), "stdlib"))
    write_outputs(result, "runs/sweep")
"""

from altgrad_jax.experiments.data import (
    CharCorpus,
    load_text_file,
    make_corpus,
    stdlib_text,
    synthetic_text,
)
from altgrad_jax.experiments.model import CharTransformer, ModelConfig
from altgrad_jax.experiments.report import RUN_FIELDS, format_table, write_outputs
from altgrad_jax.experiments.sweep import (
    DEFAULT_FORMATS,
    DEFAULT_RULES,
    RULE_NAMES,
    RunResult,
    SweepConfig,
    SweepResult,
    get_update_rule,
    run_sweep,
)
from altgrad_jax.experiments.train import TrainConfig, UpdateRule, init_state, make_train_chunk

__all__ = [
    "DEFAULT_FORMATS",
    "DEFAULT_RULES",
    "RULE_NAMES",
    "RUN_FIELDS",
    "CharCorpus",
    "CharTransformer",
    "ModelConfig",
    "RunResult",
    "SweepConfig",
    "SweepResult",
    "TrainConfig",
    "UpdateRule",
    "format_table",
    "get_update_rule",
    "init_state",
    "load_text_file",
    "make_corpus",
    "make_train_chunk",
    "run_sweep",
    "stdlib_text",
    "synthetic_text",
    "write_outputs",
]
