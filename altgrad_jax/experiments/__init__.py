"""Experiments: the format-comparison sweep, its data, model and reports.

``python -m altgrad_jax sweep`` trains a small character transformer under each chosen format and
update rule and reports which format loses its updates to bit-stall and which rule rescues it.
The same from Python::

    from altgrad_jax.experiments import (
        SweepConfig, make_corpus, run_sweep, stdlib_text, write_outputs,
    )
    config = SweepConfig(formats=("E5M2", "E4M3"), train=TrainConfig(learning_rate=1e-3))
    result = run_sweep(config, make_corpus(stdlib_text(), "stdlib"))
    write_outputs(result, "runs/sweep")

(``run_sweep(..., on_run=lambda so_far: write_results(so_far, out))`` writes the results files
after every run, as the command line does.)
"""

from altgrad_jax.experiments.data import (
    CharCorpus,
    load_text_file,
    make_corpus,
    stdlib_text,
    synthetic_text,
)
from altgrad_jax.experiments.model import CharTransformer, ModelConfig
from altgrad_jax.experiments.report import (
    RUN_FIELDS,
    check_output_dir,
    format_table,
    write_outputs,
    write_results,
)
from altgrad_jax.experiments.sweep import (
    DEFAULT_FORMATS,
    DEFAULT_RULES,
    RULE_NAMES,
    ModelSize,
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
    "ModelSize",
    "RunResult",
    "SweepConfig",
    "SweepResult",
    "TrainConfig",
    "UpdateRule",
    "check_output_dir",
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
    "write_results",
]
