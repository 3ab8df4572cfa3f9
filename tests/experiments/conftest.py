"""One small compiled sweep shared by the experiments tests (compiling the step is their cost).

The sweep has the settings of ``golden/synthetic_sweep.json``, so its baseline and E5M2 runs are
checked against that file bit for bit, and it trains a block format. The sweep caches its
compiled programs per process (:func:`altgrad_jax.experiments.sweep.batch_programs`): a test
that runs a sweep with :func:`sweep_config`'s settings (the baseline alone, other seeds, an
interrupt) compiles nothing new for a batch of the same shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from altgrad_jax.__main__ import main
from altgrad_jax.experiments import data
from altgrad_jax.experiments.sweep import SweepConfig

# The settings of the golden file (tests/experiments/golden/synthetic_sweep.json).
GOLDEN_TEXT_LENGTH = 4000
GOLDEN_SETTINGS = [
    *("--steps", "24", "--eval-every", "8", "--lr", "0.003", "--schedule", "constant"),
    *("--batch-size", "4", "--eval-batches", "2"),
    *("--context", "16", "--d-model", "16", "--heads", "2", "--layers", "1"),
]
SHARED_FORMATS = "E4M3,E5M2,MXFP8_E4M3"


@pytest.fixture(scope="session")
def golden_corpus() -> data.CharCorpus:
    """The corpus of the golden file and the shared sweep: 4000 synthetic characters."""
    return data.make_corpus(data.synthetic_text(GOLDEN_TEXT_LENGTH), "synthetic")


@pytest.fixture(scope="session")
def golden_text(tmp_path_factory) -> Path:
    """A text file holding the golden corpus's characters."""
    path = tmp_path_factory.mktemp("text") / "golden.txt"
    path.write_text(data.synthetic_text(GOLDEN_TEXT_LENGTH), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def sweep_args(golden_text) -> list[str]:
    """The CLI flags of the shared sweep's settings and text, without formats, rules or seeds."""
    return ["--text", str(golden_text), *GOLDEN_SETTINGS]


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory, sweep_args) -> Path:
    """A CLI sweep: the baseline, E4M3, E5M2 and MXFP8_E4M3 under nearest storage, 2 seeds."""
    out = tmp_path_factory.mktemp("sweep")
    argv = ["sweep", *sweep_args, "--seeds", "2", "--formats", SHARED_FORMATS]
    assert main([*argv, "--rules", "nearest", "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def sweep_results(sweep_dir) -> dict:
    """The shared sweep's ``results.json``."""
    return json.loads((sweep_dir / "results.json").read_text())


@pytest.fixture(scope="session")
def sweep_config(sweep_results) -> SweepConfig:
    """The shared sweep's config (run a variant with ``dataclasses.replace``: same programs)."""
    return SweepConfig.from_flat(sweep_results["meta"]["config"])
