"""Batched runs: a member's numbers do not depend on its batch, nor on the number of devices.

The baseline is the cheapest program that still runs the whole batching path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from altgrad_jax.experiments.sweep import run_sweep

# Timings differ from run to run; every other field must agree exactly.
TIMINGS = ("wall_time_s", "compile_time_s")


def _numbers(runs: list[dict]) -> list[dict]:
    return [{k: v for k, v in run.items() if k not in TIMINGS} for run in runs]


def _shared(sweep_results, fmt: str | None) -> list[dict]:
    """The shared sweep's runs of ``fmt`` (None: the baseline), seed by seed."""
    return _numbers([run for run in sweep_results["runs"] if run["format"] == fmt])


@pytest.mark.parametrize(
    ("formats", "rules"), [((), ()), pytest.param(("E5M2",), ("nearest",), marks=pytest.mark.slow)]
)
def test_a_seed_run_alone_gives_its_numbers_in_the_batch(
    sweep_config, sweep_results, golden_corpus, formats, rules
):
    # Seed 1 was the second member of a batch of two; here it is the only one.
    config = dataclasses.replace(
        sweep_config, formats=formats, rules=rules, baseline=not formats, seeds=1, seed=1
    )
    alone = _numbers([dataclasses.asdict(run) for run in run_sweep(config, golden_corpus).runs])
    batched = _shared(sweep_results, formats[0] if formats else None)
    assert [run["seed"] for run in batched] == [0, 1]
    assert alone == batched[1:]
    assert batched[0]["train_loss"] != batched[1]["train_loss"]  # seeds really differ


WORKER = """
import dataclasses, json
import jax
from jax.sharding import Mesh
from altgrad_jax.experiments import data
from altgrad_jax.experiments.sweep import ModelSize, SweepConfig, run_sweep
from altgrad_jax.experiments.train import TrainConfig
assert jax.device_count() == 8
config = SweepConfig(formats=(), rules=(), eval_every=2, seeds=3,
    train=TrainConfig(steps=5, batch_size=4), model=ModelSize(8, 8, 2, 1))
corpus = data.make_corpus(data.synthetic_text(2000), "synthetic")
eight = run_sweep(config, corpus)
one = run_sweep(config, corpus, mesh=Mesh(jax.devices()[:1], ("batch",)))
assert (eight.devices, one.devices) == (8, 1)
print(json.dumps([[dataclasses.asdict(run) for run in r.runs] for r in (eight, one)]))
"""


def test_eight_simulated_devices_give_the_numbers_of_one():
    # A tiny model: at the shared sweep's size (d_model 16, context 16) XLA:CPU's 8-device
    # program differs from the 1-device one in the last bits of the loss (measured), so the
    # sharding is exact only where the per-device programs compute alike.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-c", WORKER], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    eight, one = (_numbers(runs) for runs in json.loads(proc.stdout.strip().splitlines()[-1]))
    assert eight == one  # 3 members padded to 8, one per device; all 3 on one device
    assert [run["seed"] for run in eight] == [0, 1, 2]
