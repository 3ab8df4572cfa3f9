"""The sweep's numbers are those of the model before it was quantized by the library's layers.

``golden/synthetic_sweep.json`` was written by the sweep when ``experiments/model.py`` still had a
quantized dense layer, VJPs and statistics of its own (before they moved into
:mod:`altgrad_jax.quant_dot` and the model became plain Flax quantized by rules). Every number of
every run must stay the same, bit for bit (JSON floats round-trip float32 exactly).

The file predates seeds, schedules and separate gradient formats: its config is run with the
settings of that time (one seed, a constant learning rate, gradients in the forward format),
now through the batched, device-sharded programs, which must not change a bit.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from altgrad_jax.experiments import data
from altgrad_jax.experiments.sweep import SweepConfig, run_sweep

GOLDEN = Path(__file__).parent / "golden" / "synthetic_sweep.json"


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


# The defaults of the settings added since the golden file was written, as they were then.
THEN = {"seeds": 1, "schedule": "constant", "grad_format": "same"}


def _config(golden, **changes) -> SweepConfig:
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in golden["config"].items()}
    return SweepConfig.from_flat({**kept, **THEN, **changes})


def _check(golden, config, runs: int) -> None:
    corpus = data.make_corpus(data.synthetic_text(4000), "synthetic")
    result = run_sweep(config, corpus)
    expected = {(r["format"], r["rule"]): r for r in golden["runs"]}
    assert len(result.runs) == runs
    for run in result.runs:
        want = expected[(run.format, run.rule)]
        got = dataclasses.asdict(run)
        for name, value in want.items():
            assert got[name] == value, (run.label, name)


def test_batched_formats_reproduce_the_sequential_numbers_bit_for_bit(golden):
    # The golden runs were trained one at a time; here E4M3 and E5M2 share one batch.
    config = _config(golden, formats=("E4M3", "E5M2"), rules=("stochastic",), baseline=False)
    _check(golden, config, 2)


@pytest.mark.slow
def test_sweep_reproduces_the_pre_refactor_numbers_bit_for_bit(golden):
    # Every run of the golden file: the baseline and three formats under four rules.
    _check(golden, _config(golden), 13)
