"""PathRules: first regex match wins, default otherwise; key paths join with '/'."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from altgrad_jax.rules import PathRules, path_str


def test_first_match_wins_and_default():
    rules = PathRules((("attention", "E4M3"), ("attention/out", "E5M2"), ("head", None)), "BF16")
    assert rules("block_0/attention/out/kernel") == "E4M3"
    assert rules("head/kernel") is None
    assert rules("mlp/kernel") == "BF16"


def test_key_paths_are_joined():
    tree = {"a": [jnp.ones(1), {"b": jnp.ones(1)}]}
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths == ["a/0", "a/1/b"]
    rules = PathRules((("^a/1/", "hit"),))
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert [rules(p, leaf) for p, leaf in leaves] == [None, "hit"]


def test_rules_are_hashable_and_validated():
    assert hash(PathRules((("x", 1),))) == hash(PathRules([("x", 1)]))
    with pytest.raises(ValueError, match="invalid rule pattern"):
        PathRules((("(", 1),))
    with pytest.raises(TypeError, match="strings"):
        PathRules(((3, 1),))
