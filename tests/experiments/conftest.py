"""One tiny compiled sweep shared by the experiments tests (compiling the step is their cost)."""

from __future__ import annotations

import pytest

from altgrad_jax.__main__ import main

TINY = ["--context", "8", "--d-model", "8", "--heads", "2", "--layers", "1", "--batch-size", "4"]


@pytest.fixture(scope="session")
def tiny_args() -> list[str]:
    """The CLI flags of the tiny model every end-to-end test trains."""
    return TINY


@pytest.fixture(scope="session")
def sweep_dir(tmp_path_factory):
    """A CLI sweep: baseline and E4M3, E5M2 under nearest storage, 2 seeds, 7 steps."""
    out = tmp_path_factory.mktemp("sweep")
    argv = ["sweep", "--synthetic", "--steps", "7", "--eval-every", "3", *TINY, "--seeds", "2"]
    argv += ["--formats", "E4M3,E5M2", "--rules", "nearest", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    return out
