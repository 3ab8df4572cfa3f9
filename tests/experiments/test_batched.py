"""Batched runs: a member's numbers do not depend on its batch, nor on the number of devices."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from altgrad_jax.experiments import data
from altgrad_jax.experiments.sweep import ModelSize, SweepConfig, run_sweep
from altgrad_jax.experiments.train import TrainConfig

# Timings differ from run to run; every other field must agree exactly.
TIMINGS = ("wall_time_s", "compile_time_s")


def _config(**changes) -> SweepConfig:
    """A baseline-only sweep: the cheapest program that still runs the whole batching path."""
    settings = {"formats": (), "rules": (), "eval_every": 2, "seeds": 3, **changes}
    return SweepConfig(
        **settings, train=TrainConfig(steps=5, batch_size=4), model=ModelSize(8, 8, 2, 1)
    )


def _numbers(result) -> list[dict]:
    return [
        {k: v for k, v in dataclasses.asdict(run).items() if k not in TIMINGS}
        for run in result.runs
    ]


def _corpus():
    return data.make_corpus(data.synthetic_text(2000), "synthetic")


@pytest.fixture(scope="module")
def batched() -> list[dict]:
    """Seeds 0, 1, 2 in one batch on this process's one device."""
    return _numbers(run_sweep(_config(), _corpus()))


def test_batched_seeds_equal_the_same_seeds_run_one_at_a_time(batched):
    alone = _numbers(run_sweep(_config(seeds=1, seed=2), _corpus()))
    assert [run["seed"] for run in batched] == [0, 1, 2]
    assert batched[2] == alone[0]
    assert batched[0]["train_loss"] != batched[1]["train_loss"]  # seeds really differ


WORKER = """
import dataclasses, json, sys
import jax
from altgrad_jax.experiments import data
from altgrad_jax.experiments.sweep import ModelSize, SweepConfig, run_sweep
from altgrad_jax.experiments.train import TrainConfig
assert jax.device_count() == 8
config = SweepConfig(formats=(), rules=(), eval_every=2, seeds=3,
    train=TrainConfig(steps=5, batch_size=4), model=ModelSize(8, 8, 2, 1))
result = run_sweep(config, data.make_corpus(data.synthetic_text(2000), "synthetic"))
assert result.devices == 8
runs = [dataclasses.asdict(run) for run in result.runs]
print(json.dumps([{k: v for k, v in run.items() if k not in ("wall_time_s", "compile_time_s")}
                  for run in runs]))
"""


def test_eight_simulated_devices_give_the_numbers_of_one(batched):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-c", WORKER], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    eight = json.loads(proc.stdout.strip().splitlines()[-1])
    assert eight == batched  # 3 members padded to 8, one per device
