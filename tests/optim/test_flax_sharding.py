"""The optax wrappers on sharded Flax models: runs flax_sharding_worker.py with 8 CPU devices.

The device count must be set before JAX initializes, so the check runs in a fresh process
(importing this worktree's package, whatever is installed).
"""

import os
import pathlib
import subprocess
import sys


def test_sharded_nnx_optimizer_and_train_state_match_one_device():
    worker = pathlib.Path(__file__).with_name("flax_sharding_worker.py")
    root = str(worker.parents[2])
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    )
    result = subprocess.run(
        [sys.executable, str(worker)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("OK")
