"""Test-session configuration: xdist grouping. Shared helpers live in references.py."""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    """Keeps the sweep's tests on one xdist worker, where their session fixtures compile once,
    and hands out that group and the 8-device workers first, so no long test starts last."""
    for item in items:
        if _is_sweep_test(item):
            item.add_marker(pytest.mark.xdist_group("experiments"))
    items.sort(key=lambda item: not (_is_sweep_test(item) or "sharding" in item.path.name))


def _is_sweep_test(item) -> bool:
    return "experiments" in item.path.parts and item.path.name != "test_notebooks.py"
