"""The package root: what it exports and what it imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

import altgrad_jax as ag
from altgrad_jax import _checks


def test_core_import_leaves_flax_and_optax_unimported():
    code = (
        "import sys, altgrad_jax; "
        "print(sorted(m for m in ('flax', 'flax.linen', 'optax') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_root_exports_the_format_owner_and_path_rules():
    assert ag.as_params("e4m3") == ag.format_params(ag.E4M3)
    params = ag.format_params(ag.E5M2).as_arrays()
    assert ag.as_params(params) is params
    rules = ag.PathRules((("head", None),), default="E4M3")
    assert rules("block/head/kernel") is None
    assert rules("block/fc/kernel") == "E4M3"


def test_leaf_format_skips_non_float_and_resolves_names():
    import jax.numpy as jnp

    rules = ag.PathRules((("head", None),), default="e5m2")
    assert ag.leaf_format(rules, "fc/kernel", jnp.zeros(2)) is ag.E5M2
    assert ag.leaf_format(rules, "head/kernel", jnp.zeros(2)) is None
    assert ag.leaf_format("e4m3", "step", jnp.zeros((), jnp.int32)) is None


@pytest.mark.parametrize(
    ("check", "args", "message"),
    [
        (
            _checks.check_positive_int,
            ("history_len", 0),
            "history_len must be a positive int, got 0",
        ),
        (_checks.check_positive_int, ("history_len", True), "got True"),
        (_checks.check_positive_float, ("margin", float("inf")), "margin must be a positive"),
        (
            _checks.check_choice,
            ("rounding", "up", ("nearest", "toward_zero")),
            "'nearest', 'toward_zero'",
        ),
    ],
)
def test_checkers_name_the_bad_value_and_the_choices(check, args, message):
    with pytest.raises(ValueError, match=message):
        check(*args)


def test_choices_come_from_literal_types():
    assert ag.ROUNDING_MODES == ("nearest", "stochastic", "toward_zero")
    with pytest.raises(TypeError):
        _checks.check_bool("signed", "no")
