"""Bit-stall detection, the running detector, exact counters and the pytree variant."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import altgrad_jax as ag
from altgrad_jax.rules import PathRules


def _seed_numbers(n=100_000):
    kw, kg = jax.random.split(jax.random.key(0))
    return jax.random.normal(kw, (n,)), jax.random.normal(kg, (n,))


def _rate(stall, total):
    return int(stall) / int(total)


def test_seed_finding_most_e5m2_updates_stall():
    w, g = _seed_numbers()
    stall, total = jax.jit(ag.detect_bit_stall, static_argnums=3)(w, g, 0.01, ag.E5M2, 1.0)
    assert int(total) == w.size
    assert 0.8 < _rate(stall, total) < 0.99


def test_larger_steps_stall_less():
    w, g = _seed_numbers()
    rates = [_rate(*ag.detect_bit_stall(w, g, lr, ag.E5M2)) for lr in (0.001, 0.01, 0.1, 1.0)]
    assert rates == sorted(rates, reverse=True) and rates[-1] < 0.3


def test_powers_of_two_stall_more_than_e3m4_and_e5m2():
    w, g = _seed_numbers()
    rate = {f.name: _rate(*ag.detect_bit_stall(w, g, 0.01, f)) for f in (ag.E3M4, ag.E5M2, ag.E7M0)}
    assert rate["E7M0"] > max(rate["E5M2"], rate["E3M4"])


def test_exact_counts_by_hand():
    w = jnp.array([1.0, 1.0, 1.0, 1.0, 1.0])
    g = jnp.array([0.01, 10.0, 0.0, 1e-11, -5.0])  # E4M3 spacing at 1 is 0.125
    stall, total = ag.detect_bit_stall(w, g, 0.1, ag.E4M3)
    assert (int(stall), int(total)) == (1, 3)  # entries 2 and 3 are not counted
    assert stall.dtype == jnp.uint32


def test_scale_is_applied_before_comparing():
    # 0.01 sits in E4M3's subnormals (spacing 2**-9), where a step of 1e-3 is lost; scaled by
    # 2**6 it is a normal number with spacing 2**-4 * 2**-6 and the same step lands.
    w, g = jnp.array([0.01]), jnp.array([1.0])
    assert int(ag.detect_bit_stall(w, g, 1e-3, ag.E4M3, 1.0)[0]) == 1
    assert int(ag.detect_bit_stall(w, g, 1e-3, ag.E4M3, 2.0**-6)[0]) == 0


def test_detector_accumulates_purely():
    w, g = _seed_numbers(1000)
    d0 = ag.BitStallDetector.create()
    assert float(d0.get_stall_rate()) == 0.0
    update = jax.jit(lambda d, w, g: d.update(w, g, 0.01, ag.E5M2))
    d = update(update(d0, w, g), w, g)
    stall, total = ag.detect_bit_stall(w, g, 0.01, ag.E5M2)
    assert int(d.stall_count) == 2 * int(stall) and int(d.total_count) == 2 * int(total)
    assert int(d.steps) == 2 and int(d0.steps) == 0
    assert float(d.get_stall_rate()) == pytest.approx(int(stall) / int(total), rel=1e-6)


def test_exact_count_carries_past_32_bits():
    c = ag.ExactCount(jnp.uint32(0), jnp.uint32(2**32 - 5))
    c = c.add(jnp.uint32(10))
    assert int(c) == 2**32 + 5
    # 1e9 parameters x 10,000 steps fits exactly
    big = ag.ExactCount.zero()
    add = jax.jit(lambda c: c.add(jnp.uint32(1_000_000_000)))
    for _ in range(10):
        big = add(big)
    assert int(big) == 10_000_000_000
    assert float(big.to_float()) == pytest.approx(1e10, rel=1e-7)


def test_detector_counts_survive_long_runs():
    d = ag.BitStallDetector(
        ag.ExactCount(jnp.uint32(2), jnp.uint32(2**32 - 1)),
        ag.ExactCount(jnp.uint32(3), jnp.uint32(2**32 - 1)),
        ag.ExactCount.zero(),
    )
    d = d.update(jnp.ones(4), jnp.full(4, 1e-3), 1e-3, ag.E4M3)
    assert int(d.stall_count) == 3 * 2**32 + 3 and int(d.total_count) == 4 * 2**32 + 3


def _params():
    return {
        "dense": {"kernel": jnp.linspace(-2.0, 2.0, 12).reshape(3, 4), "bias": jnp.ones(4)},
        "head": {"kernel": jnp.full((4,), 0.3)},
        "step": jnp.array(3, jnp.int32),
    }


def _updates():
    return {
        "dense": {"kernel": jnp.full((3, 4), 0.004), "bias": jnp.array([0.0, 0.3, -0.3, 1e-3])},
        "head": {"kernel": jnp.full((4,), -0.2)},
        "step": jnp.array(0, jnp.int32),
    }


def test_tree_variant_matches_detect_bit_stall_per_leaf():
    params, updates = _params(), _updates()
    stats = jax.jit(lambda p, u: ag.tree_bit_stall(p, u, ag.E4M3, scale=1.0))(params, updates)
    assert stats.leaf_stall["step"] is None
    total_stall = total_count = 0
    for name, leaf in (("dense", "kernel"), ("dense", "bias"), ("head", "kernel")):
        w, u = params[name][leaf], updates[name][leaf]
        s, _ = ag.detect_bit_stall(w, -u, 1.0, ag.E4M3, 1.0)  # w - 1 * (-u) == w + u exactly
        assert int(stats.leaf_stall[name][leaf]) == int(s)
        assert int(stats.leaf_total[name][leaf]) == int(jnp.sum(u != 0))
        total_stall += int(s)
        total_count += int(jnp.sum(u != 0))
    assert int(stats.stall_count) == total_stall and int(stats.total_count) == total_count
    assert float(stats.stall_rate) == pytest.approx(total_stall / total_count)


def test_tree_variant_with_grads_rules_and_current_scale():
    params, updates = _params(), _updates()
    grads = jax.tree.map(lambda u: -u, updates)
    rules = PathRules((("head", None),), default="E5M2")
    stats = ag.tree_bit_stall(params, updates, rules, grads=grads)
    assert stats.leaf_stall["head"]["kernel"] is None
    w, u = params["dense"]["kernel"], updates["dense"]["kernel"]
    scale = ag.compute_scale(jnp.max(jnp.abs(w)), ag.E5M2)
    s, t = ag.detect_bit_stall(w, -u, 1.0, ag.E5M2, scale)
    assert int(stats.leaf_stall["dense"]["kernel"]) == int(s)
    assert int(stats.leaf_total["dense"]["kernel"]) == int(t)
