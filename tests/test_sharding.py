"""Sharded training gives the single-device numbers: runs sharding_worker.py with 8 CPU devices.

The device count must be set before JAX initializes, so the check runs in a fresh process.
"""

import os
import pathlib
import subprocess
import sys


def test_data_and_model_parallel_match_one_device():
    worker = pathlib.Path(__file__).with_name("sharding_worker.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [sys.executable, str(worker)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().endswith("OK")
