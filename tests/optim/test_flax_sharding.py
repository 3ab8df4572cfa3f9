"""The optax wrappers on sharded Flax models: runs flax_sharding_worker.py with 8 CPU devices.

The device count must be set before JAX initializes, so the check runs in a fresh process
(importing this worktree's package, whatever is installed).
"""

import os
import pathlib
import subprocess
import sys

import pytest


def _run_worker(*args: str) -> None:
    worker = pathlib.Path(__file__).with_name("flax_sharding_worker.py")
    root = str(worker.parents[2])
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    )
    result = subprocess.run(
        [sys.executable, str(worker), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("OK")


def test_sharded_nnx_optimizer_and_train_state_match_one_device():
    """Flax's partitioning recipes (NNX on a 2x4 mesh, Linen TrainState) equal one device."""
    _run_worker()


@pytest.mark.slow
def test_explicit_mesh_and_data_parallel_match_one_device():
    """Also an explicit-axes mesh and data parallelism over 8 devices."""
    _run_worker("--all")
