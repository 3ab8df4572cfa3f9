"""Test-session configuration: xdist grouping. Shared helpers live in references.py."""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    """Keeps the sweep's tests on one xdist worker, where their session fixtures compile once."""
    for item in items:
        if "experiments" in item.path.parts and item.path.name != "test_notebooks.py":
            item.add_marker(pytest.mark.xdist_group("experiments"))
