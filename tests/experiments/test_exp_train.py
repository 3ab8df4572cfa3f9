"""The traced-format train step: same numbers as the static one, one compilation for all formats."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from altgrad_jax import format_params, get_format, quantize
from altgrad_jax.experiments import data
from altgrad_jax.experiments.model import CharTransformer, ModelConfig
from altgrad_jax.experiments.sweep import get_update_rule
from altgrad_jax.experiments.train import TrainConfig, init_state, make_train_chunk

FORMATS = ("E4M3", "E5M2", "E0M7")


@pytest.fixture(scope="module")
def setup():
    corpus = data.make_corpus(data.synthetic_text(2000), "synthetic")
    model = CharTransformer(ModelConfig(corpus.vocab_size, 8, 8, 2, 1))
    rule = get_update_rule("stochastic")
    config = TrainConfig(batch_size=4, schedule="constant")  # every step moves the weights
    traced = jax.jit(chex.assert_max_traces(make_train_chunk(model, rule, config, 3), n=1))
    runs = {}
    for name in FORMATS:
        fmt = format_params(get_format(name)).as_arrays()
        runs[name] = traced(init_state(model, rule, config, fmt, 0), fmt, corpus.train)
    return model, rule, config, corpus, traced, runs


# The module's programs are compiled for these tests only (~80 s on 2 cores): slow. By default
# the shared sweep checks one compilation per rule for every format, and its numbers (golden).
@pytest.mark.slow
def test_traced_step_compiles_once_for_every_format(setup):
    *_, runs = setup  # the chunk is wrapped in assert_max_traces(n=1): a retrace would raise
    losses = [np.asarray(runs[name][1]["loss"]) for name in FORMATS]
    # One program, different numbers: the format really is data.
    assert not np.array_equal(losses[0], losses[1])
    assert not np.array_equal(losses[1], losses[2])


@pytest.mark.slow
@pytest.mark.parametrize("name", FORMATS[:2])
def test_traced_step_equals_static_step(setup, name):
    model, rule, config, corpus, _, runs = setup
    fmt = get_format(name)
    static = jax.jit(make_train_chunk(model, rule, config, 3), static_argnums=1)
    state, metrics = static(init_state(model, rule, config, fmt, 0), fmt, jnp.asarray(corpus.train))
    traced_state, traced_metrics = runs[name]
    for a, b in zip(
        jax.tree_util.tree_leaves((traced_state.params, traced_metrics)),
        jax.tree_util.tree_leaves((state.params, metrics)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_stored_weights_stay_on_the_grid_and_metrics_are_rates(setup):
    *_, runs = setup
    state, metrics = runs["E4M3"]
    assert np.all((metrics["stall_rate"] >= 0) & (metrics["stall_rate"] <= 1))
    assert np.all((metrics["flip_rate"] > 0) & (metrics["flip_rate"] <= 1))
    assert metrics["finite"].all()
    scales = state.storage_state.scale
    for w, s in zip(
        jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(scales), strict=True
    ):
        np.testing.assert_array_equal(quantize(w, "E4M3", s), w)
