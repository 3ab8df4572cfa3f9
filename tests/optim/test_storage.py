"""Low-precision storage: weights on the grid after every step, the four update rules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from altgrad_jax import E3M4, E4M3, E5M2, E7M0, EIGHT_BIT_FORMATS, compute_scale, quantize
from altgrad_jax.formats import E2M1, E2M3, E3M2, format_params, get_format, grid
from altgrad_jax.optim import (
    STORAGE_RULES,
    _common,
    apply_updates,
    low_precision_storage,
    pow2_scale,
    scale_by_ulp,
)
from altgrad_jax.optim._common import FUSED_MAX_ENTRIES, leaf_groups
from altgrad_jax.rules import PathRules


def _on_grid(w, fmt, scale) -> bool:
    values = np.asarray(w, np.float64) / float(scale)
    return bool(np.isin(values, grid(fmt)).all())


def _run(opt, params, updates_seq):
    state = opt.init(params)
    step = jax.jit(opt.update)
    history = []
    for u in updates_seq:
        updates, state = step(u, state, params)
        params = apply_updates(params, updates, state)
        history.append(params)
    return params, state, history


@pytest.mark.parametrize("rule", STORAGE_RULES)
@pytest.mark.parametrize("fmt", [E4M3, E5M2, E7M0])
def test_weights_on_grid_after_every_step(rule, fmt):
    keys = jax.random.split(jax.random.key(1), 6)
    params = {"a": jax.random.normal(keys[0], (64,)), "b": 3.0 * jax.random.normal(keys[1], (8, 8))}
    steps = [
        jax.tree.map(lambda p, k=k: 0.3 * jax.random.normal(k, p.shape), params) for k in keys[2:]
    ]
    opt = low_precision_storage(fmt, rule, seed=3)
    state = opt.init(params)
    p = params
    for u in steps:
        updates, state = jax.jit(opt.update)(u, state, p)
        p = apply_updates(p, updates, state)
        for name in ("a", "b"):
            assert _on_grid(p[name], fmt, state.scale[name]), (rule, fmt.name, name)


@pytest.mark.parametrize("fmt", [*EIGHT_BIT_FORMATS[:5], E2M1, E2M3, E3M2])
def test_float32_addition_is_exact_for_narrow_exponents(fmt):
    """For formats with <= 4 exponent bits, w + (t - w) == t for every pair of grid values."""
    values = grid(fmt).astype(np.float32)
    w, t = values[:, None], values[None, :]
    assert np.array_equal((w + (t - w)).astype(np.float32), np.broadcast_to(t, (w.size, t.size)))


def test_optax_apply_updates_stays_on_grid_for_e4m3():
    """From weights on the grid, plain optax.apply_updates keeps them there (narrow exponents)."""
    w = jax.random.normal(jax.random.key(0), (256,)) * 40.0
    params = {"w": quantize(w, E4M3, pow2_scale(jnp.max(jnp.abs(w)), E4M3))}
    steps = [{"w": jax.random.normal(jax.random.key(i), (256,)) * 50.0} for i in range(1, 5)]
    opt = low_precision_storage(E4M3, "stochastic")
    state = opt.init(params)
    p = params
    for u in steps:
        updates, state = opt.update(u, state, p)
        p = optax.apply_updates(p, updates)
        assert _on_grid(p["w"], E4M3, state.scale["w"])


def test_companion_repairs_a_jump_across_many_binades():
    """E5M2: from -0.009765625 to 32768, float32 rounds the sum; apply_updates lands exactly."""
    params = {"w": jnp.array([-0.009765625, 1.0], jnp.float32)}
    u = {"w": jnp.array([32768.0, 0.0], jnp.float32)}
    opt = low_precision_storage(E5M2, "nearest")
    updates, state = opt.update(u, opt.init(params), params)
    plain = optax.apply_updates(params, updates)["w"]
    assert float(plain[0]) == np.float32(32767.998)  # the float32 addition misses the grid
    fixed = apply_updates(params, updates, state)["w"]
    np.testing.assert_array_equal(np.asarray(fixed), [32768.0, 1.0])


def test_apply_updates_without_storage_state_raises():
    with pytest.raises(ValueError, match="no low_precision_storage"):
        apply_updates({"w": jnp.ones(2)}, {"w": jnp.ones(2)}, optax.sgd(0.1).init({"w": 0.0}))


@pytest.mark.parametrize("rule", STORAGE_RULES)
def test_zero_update_leaves_stored_weights_unchanged(rule):
    params = {"w": jax.random.normal(jax.random.key(0), (128,)) * 7.0}
    moves = [{"w": jax.random.normal(jax.random.key(i), (128,)) * 0.4} for i in range(1, 4)]
    zeros = [{"w": jnp.zeros(128)} for _ in range(5)]
    _, _, history = _run(low_precision_storage(E3M4, rule), params, moves + zeros)
    settled = np.asarray(history[len(moves) - 1]["w"])
    for p in history[len(moves) :]:
        np.testing.assert_array_equal(np.asarray(p["w"]), settled)


def test_seed_rescaling_drifts_but_pow2_scale_does_not():
    """Re-applying amax * 1.01 / max every step inflates the largest weight; storage does not."""
    w = jnp.array([1.0, -0.3, 0.05], jnp.float32)
    seed = w
    for _ in range(20):
        seed = quantize(seed, E5M2, compute_scale(jnp.max(jnp.abs(seed)), E5M2))
    assert float(jnp.max(jnp.abs(seed))) > 1.1
    _, _, history = _run(low_precision_storage(E5M2), {"w": w}, [{"w": jnp.zeros(3)}] * 20)
    assert all(float(jnp.max(jnp.abs(p["w"]))) == 1.0 for p in history)


def test_pow2_scale_is_the_smallest_fitting_power_of_two():
    amax = jnp.array([448.0, 449.0, 896.0, 1.0, 0.0, 1e-30], jnp.float32)
    scales = np.asarray(jax.vmap(lambda a: pow2_scale(a, E4M3))(amax))
    # Zero amax falls back to a unit range: 1 / 2**-8 = 256 <= 448 < 512.
    np.testing.assert_array_equal(scales[:5], [1.0, 2.0, 2.0, 2.0**-8, 2.0**-8])
    assert scales[5] == 2.0 ** np.ceil(np.log2(1e-30 / 448.0))


def test_formats_a_power_of_two_apart_share_the_grid_of_zero_tensors():
    """E1M6 is E0M7 scaled by 4: one ULP step from an all-zero tensor is the same in both."""
    zeros = {"bias": jnp.zeros((3,))}
    ones = {"bias": jnp.ones((3,))}
    steps = [scale_by_ulp(f).update(ones, None, zeros)[0]["bias"] for f in ("E1M6", "E0M7")]
    np.testing.assert_array_equal(steps[0], steps[1])
    np.testing.assert_array_equal(steps[0], 2.0**-6)  # the quantum on the unit range


# ---------------------------------------------------------------- constant tiny gradient
N_STEPS = 40
TINY = 0.01  # E5M2 spacing at 1.0 is 0.25: every step is far below half a ULP


def _tiny_run(rule, n_weights=2048):
    params = {"w": jnp.ones((n_weights,), jnp.float32)}
    opt = low_precision_storage(E5M2, rule, seed=7)
    u = {"w": jnp.full((n_weights,), TINY, jnp.float32)}
    return _run(opt, params, [u] * N_STEPS)


def _float32_trajectory():
    w = np.float32(1.0)
    for _ in range(N_STEPS):
        w = np.float32(w + np.float32(TINY))
    return w


def test_nearest_never_moves_under_tiny_updates():
    _, state, history = _tiny_run("nearest")
    assert all(bool(jnp.all(p["w"] == 1.0)) for p in history)
    assert float(state.landed.run_ratio) == 0.0


def test_stochastic_moves_by_n_u_in_expectation():
    final, state, _ = _tiny_run("stochastic")
    moved = np.asarray(final["w"], np.float64) - 1.0
    # Each step adds a rounding error of variance <= spacing**2 / 4, independently per weight.
    std_of_mean = np.sqrt(N_STEPS * 0.25**2 / 4 / moved.size)
    assert abs(moved.mean() - N_STEPS * TINY) < 5 * std_of_mean
    assert len(np.unique(moved)) > 1  # weights really took different paths
    assert abs(float(state.landed.run_ratio) - 1.0) < 0.15


def test_compensated_ends_within_one_ulp_of_float32():
    final, state, _ = _tiny_run("compensated")
    reference = _float32_trajectory()
    assert np.all(np.abs(np.asarray(final["w"]) - reference) <= 0.25)
    assert np.all(np.abs(np.asarray(final["w"] + state.residual["w"]) - reference) < 1e-5)


def test_master_tracks_float32_exactly():
    final, state, _ = _tiny_run("master")
    reference = _float32_trajectory()
    assert np.all(np.asarray(state.master["w"]) == reference)
    np.testing.assert_array_equal(np.asarray(final["w"]), np.asarray(quantize(reference, E5M2)))


# ------------------------------------------------------------------ formats and options
def test_traced_format_compiles_once_and_matches_static():
    params = {"w": jax.random.normal(jax.random.key(0), (64,))}
    grads = {"w": jax.random.normal(jax.random.key(1), (64,))}
    traces = []

    @jax.jit
    def step(params, fmt_params):
        traces.append(1)
        opt = optax.chain(optax.sgd(0.05), low_precision_storage(fmt_params, "compensated"))
        state = opt.init(params)
        updates, state = opt.update(grads, state, params)
        return apply_updates(params, updates, state)

    for fmt in (E3M4, E5M2, E7M0):
        traced = step(params, format_params(fmt).as_arrays())
        opt = optax.chain(optax.sgd(0.05), low_precision_storage(fmt, "compensated"))
        updates, state = opt.update(grads, opt.init(params), params)
        static = apply_updates(params, updates, state)
        np.testing.assert_array_equal(np.asarray(traced["w"]), np.asarray(static["w"]))
    assert len(traces) == 1


def test_path_rules_and_non_float_leaves():
    params = {
        "dense": {"kernel": jnp.full((4,), 1.0), "bias": jnp.full((4,), 1.0)},
        "n": jnp.arange(2),
    }
    rules = PathRules((("bias", None),), default="e5m2")
    opt = low_precision_storage(rules, "nearest")
    u = {
        "dense": {"kernel": jnp.full((4,), 0.01), "bias": jnp.full((4,), 0.01)},
        "n": jnp.zeros(2, jnp.int32),
    }
    updates, state = opt.update(u, opt.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["dense"]["kernel"]), 0.0)  # stalled
    np.testing.assert_array_equal(
        np.asarray(updates["dense"]["bias"]), np.float32(0.01)
    )  # float32, as is
    assert updates["n"].dtype == jnp.int32
    assert state.scale["dense"]["bias"] is None and state.grid["dense"]["bias"] is None
    assert state.grid["n"] is None
    assert state.grid["dense"]["kernel"].format == E5M2  # static: no arrays


def test_fixed_scale_and_bad_arguments():
    params = {"w": jnp.array([3.0, -5.0])}
    opt = low_precision_storage("e4m3", scale=2.0**-8)
    updates, state = opt.update({"w": jnp.zeros(2)}, opt.init(params), params)
    assert float(state.scale["w"]) == 2.0**-8
    np.testing.assert_array_equal(np.asarray(params["w"] + updates["w"]), [1.75, -1.75])
    with pytest.raises(ValueError, match="unknown storage rule"):
        low_precision_storage("e4m3", "round_up")
    with pytest.raises(ValueError, match="known formats"):
        low_precision_storage("e9m9")
    with pytest.raises(ValueError, match="pow2"):
        low_precision_storage("e4m3", scale="amax")
    with pytest.raises(ValueError, match="positive"):
        low_precision_storage("e4m3", scale=-1.0)
    with pytest.raises(ValueError, match="needs params"):
        opt.update({"w": jnp.zeros(2)}, opt.init(params))
    traced_rule = PathRules(default=format_params(E4M3).as_arrays())
    with pytest.raises(ValueError, match="traced FormatParams for 'w'"):
        low_precision_storage(traced_rule).init(params)


def test_rescaling_moves_no_other_stored_weight():
    """The pow2 scale follows the amax out of (and back into) range; others stay put."""
    opt = low_precision_storage(E4M3, "nearest")
    params = {"w": jnp.array([400.0, 3.0, -0.75], jnp.float32)}
    state = opt.init(params)
    for jump, expected_scale in ((-300.0, 0.25), (900.0, 4.0)):
        u = {"w": jnp.array([jump, 0.0, 0.0], jnp.float32)}
        updates, state = opt.update(u, state, params)
        params = apply_updates(params, updates, state)
        assert float(state.scale["w"]) == expected_scale
        np.testing.assert_array_equal(np.asarray(params["w"][1:]), [3.0, -0.75])
        assert _on_grid(params["w"], E4M3, expected_scale)


@pytest.mark.parametrize("rule", STORAGE_RULES)
def test_bfloat16_params_stay_on_grid_with_the_companion(rule):
    params = {"w": (jax.random.normal(jax.random.key(0), (128,)) * 3).astype(jnp.bfloat16)}
    opt = optax.chain(optax.adam(0.1), low_precision_storage(E5M2, rule))
    state, step = opt.init(params), jax.jit(opt.update)
    for i in range(3):
        grads = {"w": jax.random.normal(jax.random.key(i + 1), (128,)).astype(jnp.bfloat16)}
        updates, state = step(grads, state, params)
        params = apply_updates(params, updates, state)
        assert params["w"].dtype == jnp.bfloat16
        assert _on_grid(params["w"], E5M2, state[1].scale["w"])


@pytest.mark.parametrize("rule", STORAGE_RULES)
def test_empty_and_scalar_leaves_are_stored(rule):
    params = {"empty": jnp.zeros((0, 3)), "scalar": jnp.float32(1.5)}
    opt = optax.chain(optax.sgd(0.1), low_precision_storage(E5M2, rule))
    state = opt.init(params)
    updates, state = jax.jit(opt.update)({"empty": params["empty"], "scalar": 1.0}, state, params)
    stored = apply_updates(params, updates, state)
    assert stored["empty"].shape == (0, 3)
    # 1.4 lies between the grid values 1.25 and 1.5 of this scale; only stochastic may go down.
    assert float(stored["scalar"]) in ((1.25, 1.5) if rule == "stochastic" else (1.5,))


def _mixed_leaves():
    """Leaves the storage rounds in groups: small float32 ones of two formats, a bfloat16 one,
    a scalar, and one too large to concatenate (rounded in place)."""
    keys = jax.random.split(jax.random.key(7), 6)
    return {
        "a": jax.random.normal(keys[0], (7, 5)),
        "b": 40.0 * jax.random.normal(keys[1], (33,)),
        "c": jax.random.normal(keys[2], (3, 4, 2)).astype(jnp.bfloat16),
        "d": jnp.float32(0.3),
        "e5": 1e-3 * jax.random.normal(keys[3], (9,)),
        "big": jax.random.normal(keys[4], (FUSED_MAX_ENTRIES + 3,)),
    }


@pytest.mark.parametrize(
    "rule",
    ["compensated", pytest.param("nearest", marks=pytest.mark.slow),
     pytest.param("master", marks=pytest.mark.slow)],
)  # fmt: skip
def test_leaves_rounded_together_store_what_each_leaf_stores_alone(rule, monkeypatch):
    # Small leaves of one format and dtype share a rounding kernel (per-entry scales); every
    # stored weight, residual and master copy is the one of storing that leaf by itself (the
    # reference: the same tree with no leaf small enough to join a group).
    params = _mixed_leaves()
    rules = PathRules((("e5", "e5m2"),), default="e4m3")
    groups = leaf_groups(jax.tree.leaves(params), [E4M3] * 6)  # a, b, big, c, d, e5
    assert [g.leaves for g in groups] == [(0, 1, 4, 5), (2,), (3,)]
    steps = [
        jax.tree.map(lambda p, k=k: (0.05 * k) * jnp.cos(jnp.arange(p.size) * k).reshape(p.shape),
                     params)
        for k in (1.0, 2.0, 3.0)
    ]  # fmt: skip
    together, state, _ = _run(low_precision_storage(rules, rule), params, steps)
    monkeypatch.setattr(_common, "FUSED_MAX_ENTRIES", 0)
    assert all(len(g.leaves) == 1 for g in leaf_groups(jax.tree.leaves(params), [E4M3] * 6))
    alone, alone_state, _ = _run(low_precision_storage(rules, rule), params, steps)
    for name in params:
        assert together[name].dtype == params[name].dtype
        np.testing.assert_array_equal(np.asarray(together[name]), np.asarray(alone[name]))
        assert float(state.scale[name]) == float(alone_state.scale[name])
        for field in ("residual", "master"):
            if getattr(state, field) is not None:
                np.testing.assert_array_equal(
                    np.asarray(getattr(state, field)[name]),
                    np.asarray(getattr(alone_state, field)[name]),
                )


def test_traced_format_rounds_all_small_leaves_as_one_group():
    params = {k: v for k, v in _mixed_leaves().items() if k != "c"}  # traced: float32 only
    grads = jax.tree.map(lambda p: 0.01 * jnp.sin(jnp.arange(p.size)).reshape(p.shape), params)

    @jax.jit
    def step(fmt_params):
        opt = low_precision_storage(fmt_params, "nearest")
        updates, state = opt.update(grads, opt.init(params), params)
        return apply_updates(params, updates, state)

    traced = step(format_params(E3M4).as_arrays())
    opt = low_precision_storage(E3M4, "nearest")
    for name in params:
        leaf = {name: params[name]}
        updates, state = opt.update({name: grads[name]}, opt.init(leaf), leaf)
        alone = apply_updates(leaf, updates, state)
        np.testing.assert_array_equal(np.asarray(traced[name]), np.asarray(alone[name]))


@pytest.mark.parametrize("fmt", ["MXFP8_E4M3", "MXFP4"])
def test_block_leaves_rounded_as_rows_store_what_each_leaf_stores_alone(fmt, monkeypatch):
    # MX leaves join as the rows of their blocks (the axis moved last, zero-padded to whole
    # blocks); NVFP4's tensor scale keeps its leaves apart.
    keys = jax.random.split(jax.random.key(5), 5)
    params = {
        "k": jax.random.normal(keys[0], (45, 7)),  # blocks along axis -2, one of them short
        "v": 3.0 * jax.random.normal(keys[1], (40,)),
        "t": jax.random.normal(keys[2], (3, 33, 2)),
    }
    groups = leaf_groups(jax.tree.leaves(params), [get_format(fmt)] * 3)
    assert [g.leaves for g in groups] == [(0, 1, 2)]
    assert len(leaf_groups(jax.tree.leaves(params), [get_format("NVFP4")] * 3)) == 3
    steps = [jax.tree.map(lambda p, k=k: 0.02 * k * jnp.sign(p), params) for k in (1.0, 2.0)]
    together, _, _ = _run(low_precision_storage(fmt, "nearest"), params, steps)
    monkeypatch.setattr(_common, "FUSED_MAX_ENTRIES", 0)  # each leaf alone
    alone, _, _ = _run(low_precision_storage(fmt, "nearest"), params, steps)
    for name in params:
        np.testing.assert_array_equal(np.asarray(together[name]), np.asarray(alone[name]))
