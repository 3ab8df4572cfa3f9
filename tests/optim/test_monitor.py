"""Stall monitor: statistics equal the core detectors, flip metrics, counters, optax wrappers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references import count_compiles

from altgrad_jax import (
    BF16,
    E3M4,
    E4M3,
    E5M2,
    E7M0,
    compute_scale,
    detect_bit_stall,
    quantize,
    tree_bit_stall,
    ulp,
)
from altgrad_jax.formats import format_params, grid, stack_format_params
from altgrad_jax.optim import (
    HISTOGRAM_EDGES,
    HISTOGRAM_LABELS,
    LowPrecisionState,
    StallMonitorState,
    _common,
    apply_updates,
    low_precision_storage,
    monitor_stall,
    stall_stats,
)
from altgrad_jax.rules import PathRules
from altgrad_jax.stall import ExactCount

KEYS = jax.random.split(jax.random.key(0), 4)
PARAMS = {
    "dense": {
        "kernel": jax.random.normal(KEYS[0], (32, 16)),
        "bias": jax.random.normal(KEYS[1], (16,)),
    },
    "step": jnp.array(3, jnp.int32),
}
GRADS = {
    "dense": {
        "kernel": jax.random.normal(KEYS[2], (32, 16)),
        "bias": jax.random.normal(KEYS[3], (16,)).at[0].set(0.0),
    },
    "step": jnp.array(0, jnp.int32),
}


def _float_part(tree):
    return {"dense": tree["dense"]}


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_stats_equal_core_detectors_and_updates_unchanged(name):
    inner = getattr(optax, name)(0.01)
    wrapped = monitor_stall(getattr(optax, name)(0.01), E5M2)
    plain_updates, plain_state = jax.jit(inner.update)(GRADS, inner.init(PARAMS), PARAMS)
    updates, state = jax.jit(wrapped.update)(GRADS, wrapped.init(PARAMS), PARAMS)
    for a, b in zip(
        jax.tree.leaves((plain_updates, plain_state)),
        jax.tree.leaves((updates, state.inner_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    expected = tree_bit_stall(
        _float_part(PARAMS), _float_part(plain_updates), E5M2, grads=_float_part(GRADS)
    )
    stats = stall_stats(state)
    assert int(stats.last.stalled) == int(expected.stall_count)
    assert int(stats.last.counted) == int(expected.total_count) == 32 * 16 + 15
    for name in ("kernel", "bias"):
        leaf = stats.leaf_last["dense"][name]
        assert int(leaf.stalled) == int(expected.leaf_stall["dense"][name])
    assert stats.leaf_last["step"] is None
    # For SGD the update is -lr * g, which is exactly what detect_bit_stall applies.
    if name == "sgd":
        w, g = PARAMS["dense"]["kernel"], GRADS["dense"]["kernel"]
        stall, total = detect_bit_stall(w, g, 0.01, E5M2, compute_scale(jnp.max(jnp.abs(w)), E5M2))
        assert int(stats.leaf_last["dense"]["kernel"].stalled) == int(stall)
        assert int(stats.leaf_last["dense"]["kernel"].counted) == int(total)


def _direct_stats(w, u, g, fmt, s):
    """Every statistic of one leaf from quantize and ulp, elementwise, in numpy."""
    old, new = quantize(w, fmt, s), quantize(w + u, fmt, s)
    spacing = np.asarray(ulp(quantize(w * (1 / jnp.float32(s)), fmt), fmt)) * np.float32(s)
    w, u, g, old, new = map(np.asarray, (w, u, g, old, new))
    flipped, counted = new != old, np.abs(g) > 1e-10
    level = sum(np.abs(u) >= edge * spacing for edge in HISTOGRAM_EDGES)
    bins = np.where(u != 0, 1 + level, 0)
    counts = [np.sum(counted & ~flipped), np.sum(counted), np.sum(flipped), np.sum(u != 0), u.size]
    histogram = np.bincount(bins, minlength=len(HISTOGRAM_LABELS))
    return counts, histogram, np.sum(np.abs(new - old)), np.sum(np.abs(u))


# Each format with one scale by default (amax and a fixed scale alternate); the other four
# combinations run with -m slow.
_DIRECT_CASES = [
    pytest.param(
        fmt, scale, id=f"{scale}-{fmt.name}", marks=() if (i + j) % 2 else pytest.mark.slow
    )
    for i, fmt in enumerate([E4M3, E5M2, E7M0, BF16])
    for j, scale in enumerate(["amax", 0.37])
]


@pytest.mark.parametrize(("fmt", "scale"), _DIRECT_CASES)
def test_every_statistic_matches_a_direct_computation(fmt, scale):
    """Leaves shorter than a row of the packed counts, exactly rows, and rows plus a tail."""
    sizes = {"short": 7, "rows": 1024, "tail": 2048 + 5}
    keys = dict(zip(sizes, jax.random.split(jax.random.key(0), 3), strict=True))
    w, u, g = {}, {}, {}
    for name, size in sizes.items():
        k = jax.random.split(keys[name], 3)
        w[name] = jax.random.normal(k[0], (size,)) * 3
        every_fifth = jnp.where(jnp.arange(size) % 5 == 0, 0.0, 0.05)
        u[name] = jax.random.normal(k[1], (size,)) * every_fifth
        g[name] = jax.random.normal(k[2], (size,)).at[::7].set(0.0)
    opt = monitor_stall(optax.stateless(lambda updates, params: u), fmt, scale=scale)
    _, state = jax.jit(opt.update)(g, opt.init(w), w)
    for name in sizes:
        leaf = stall_stats(state).leaf_last[name]
        s = compute_scale(jnp.max(jnp.abs(w[name])), fmt) if scale == "amax" else scale
        counts, histogram, landed, requested = _direct_stats(w[name], u[name], g[name], fmt, s)
        fields = ("stalled", "counted", "flipped", "moved", "entries")
        assert [int(getattr(leaf, f)) for f in fields] == [int(c) for c in counts], name
        np.testing.assert_array_equal(np.asarray(leaf.histogram), histogram)
        np.testing.assert_allclose(float(leaf.landed), landed, rtol=1e-5)
        np.testing.assert_allclose(float(leaf.requested), requested, rtol=1e-5)


def _seed_stall_rate(fmt):
    w = jax.random.normal(jax.random.key(1), (20000,))
    g = jax.random.normal(jax.random.key(2), (20000,))
    opt = monitor_stall(optax.sgd(0.01), fmt)
    _, state = jax.jit(opt.update)({"w": g}, opt.init({"w": w}), {"w": w})
    return float(stall_stats(state).last.stall_rate)


def test_seed_scenario_most_updates_stall_and_e7m0_stalls_most():
    e5m2, e3m4, e7m0 = (_seed_stall_rate(f) for f in (E5M2, E3M4, E7M0))
    assert e5m2 > 0.8
    assert e7m0 > e5m2 and e7m0 > e3m4


def test_flip_metrics_on_hand_built_numbers():
    """E5M2 at scale 1: spacing 0.25 on [1, 2), 0.5 on [2, 4), 2**-16 at zero."""
    w = jnp.array([1.0, 1.0, 1.0, 0.0, 2.0], jnp.float32)
    u = jnp.array([0.0, 0.01, 0.2, 2.0**-20, -0.3], jnp.float32)
    g = jnp.array([0.0, 1.0, 1.0, 1e-12, 1.0], jnp.float32)
    opt = monitor_stall(optax.stateless(lambda updates, params: {"w": u}), E5M2, scale=1.0)
    _, state = opt.update({"w": g}, opt.init({"w": w}), {"w": w})
    leaf = stall_stats(state).leaf_last["w"]
    # Counted: entries 1, 2, 4. Entry 1 (0.04 ULP) stalls; 1.2 -> 1.25 and 1.7 -> 1.75 flip.
    assert (int(leaf.counted), int(leaf.stalled), int(leaf.flipped)) == (3, 1, 2)
    assert (int(leaf.moved), int(leaf.entries)) == (4, 5)
    np.testing.assert_array_equal(np.asarray(leaf.histogram), [1, 0, 1, 1, 0, 2, 0, 0])
    assert len(HISTOGRAM_LABELS) == 8
    assert float(leaf.landed) == 0.5
    assert float(leaf.requested) == float(jnp.sum(jnp.abs(u)))
    totals = stall_stats(state).last
    assert float(totals.flip_rate) == np.float32(0.4) and float(totals.update_rate) == np.float32(
        0.8
    )
    assert float(totals.stall_rate) == pytest.approx(1 / 3)
    assert float(totals.landed_ratio) == pytest.approx(0.5 / float(jnp.sum(jnp.abs(u))))


def test_running_totals_are_exact_past_2_to_32():
    opt = monitor_stall(optax.sgd(0.01), E5M2)
    state = opt.init(PARAMS)
    counts = state.total.counts
    near = counts.replace(low=counts.low.at[jnp.array([1, 4])].set(2**32 - 3))  # counted, entries
    state = state._replace(total=state.total._replace(counts=near))
    _, state = jax.jit(opt.update)(GRADS, state, PARAMS)
    assert int(state.total.counted) == 2**32 - 3 + 32 * 16 + 15
    assert int(state.total.entries) == 2**32 - 3 + 32 * 16 + 16
    assert int(state.steps) == 1


def test_works_in_chain_inject_hyperparams_and_multisteps():
    schedule = optax.linear_schedule(0.1, 0.01, 3)
    injected = optax.inject_hyperparams(
        lambda learning_rate: monitor_stall(optax.sgd(learning_rate), E5M2)
    )(learning_rate=schedule)
    opt = optax.chain(optax.clip(10.0), injected)
    state = opt.init(PARAMS)
    step = jax.jit(opt.update)
    w = PARAMS["dense"]["kernel"]
    g = GRADS["dense"]["kernel"]
    for i in range(3):
        _, state = step(GRADS, state, PARAMS)
        stall, _ = detect_bit_stall(
            w, g, schedule(i), E5M2, compute_scale(jnp.max(jnp.abs(w)), E5M2)
        )
        assert int(stall_stats(state).leaf_last["dense"]["kernel"].stalled) == int(stall)
    assert int(stall_stats(state).steps) == 3

    multi = optax.MultiSteps(monitor_stall(optax.sgd(0.1), E5M2), every_k_schedule=2)
    state = multi.init(PARAMS)
    step = jax.jit(multi.update)
    for _ in range(4):
        _, state = step(GRADS, state, PARAMS)
    monitor = stall_stats(state)
    assert int(monitor.steps) == 2
    assert int(monitor.total.counted) == 2 * (32 * 16 + 15)


def test_path_rules_skip_leaves_and_reader_errors():
    rules = PathRules((("bias", None),), default="e5m2")
    opt = monitor_stall(optax.sgd(0.01), rules)
    _, state = opt.update(GRADS, opt.init(PARAMS), PARAMS)
    stats = stall_stats(state)
    assert stats.leaf_last["dense"]["bias"] is None
    assert int(stats.last.entries) == 32 * 16
    with pytest.raises(ValueError, match="no monitor_stall"):
        stall_stats(optax.sgd(0.1).init(PARAMS))
    with pytest.raises(ValueError, match="unknown scale"):
        monitor_stall(optax.sgd(0.1), E5M2, scale="max")
    with pytest.raises(ValueError, match="needs params"):
        opt.update(GRADS, opt.init(PARAMS))


def test_traced_format_compiles_once_and_matches_static():
    traces = []

    @jax.jit
    def step(fmt_params, state):
        traces.append(1)
        opt = monitor_stall(optax.adam(0.01), fmt_params)
        return opt.update(GRADS, state, PARAMS)[1]

    for fmt in (E3M4, E5M2, E7M0):
        static = monitor_stall(optax.adam(0.01), fmt)
        state = static.init(PARAMS)
        traced = step(format_params(fmt).as_arrays(), state)
        _, expected = jax.jit(static.update)(GRADS, state, PARAMS)
        for a, b in zip(jax.tree.leaves(traced), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(traces) == 1


def test_monitoring_storage_sees_the_stored_weights_move():
    """Around a chain ending in nearest storage, a flip is exactly a stored weight that moved."""
    params = {"w": jnp.ones((512,), jnp.float32)}
    grads = {"w": jax.random.normal(jax.random.key(5), (512,))}
    opt = monitor_stall(
        optax.chain(optax.sgd(0.2), low_precision_storage(E5M2, "nearest")), E5M2, scale="pow2"
    )
    updates, state = jax.jit(opt.update)(grads, opt.init(params), params)
    new = apply_updates(params, updates, state)
    stats = stall_stats(state)
    changed = int(jnp.sum(new["w"] != params["w"]))
    assert 0 < changed < 512
    assert int(stats.last.flipped) == changed
    assert int(stats.last.stalled) == 512 - changed
    assert float(stats.last.landed_ratio) == 1.0
    assert isinstance(state, StallMonitorState)


def test_package_docstring_example_runs():
    import altgrad_jax.optim as optim

    code = optim.__doc__.split("::\n", 1)[1].split("\n\n", 1)[0]
    namespace = {name: getattr(optim, name) for name in optim.__all__}
    namespace.update(optax=optax, params=_float_part(PARAMS), grads=_float_part(GRADS))
    exec(compile("\n".join(line[4:] for line in code.splitlines()), "example", "exec"), namespace)
    stats, ratio = namespace["rates"]
    assert 0.0 < float(stats["stall_rate"]) < 1.0 and float(ratio) > 0.0
    storage = namespace["opt_state"][1]
    assert isinstance(storage, LowPrecisionState)
    kernel = namespace["params"]["dense"]["kernel"] / storage.scale["dense"]["kernel"]
    assert bool(jnp.all(jnp.isin(kernel, jnp.asarray(grid(E5M2), jnp.float32))))


def test_full_train_step_compiles_once_and_passes_extra_args():
    traces = []
    opt = optax.chain(
        monitor_stall(optax.polyak_sgd(max_learning_rate=0.1), E5M2),
        low_precision_storage(E5M2, "master"),
    )

    @jax.jit
    def step(params, state):
        traces.append(1)
        loss = sum(jnp.sum(p**2) for p in jax.tree.leaves(params))
        grads = jax.tree.map(lambda p: 2 * p, params)
        updates, state = opt.update(grads, state, params, value=loss)
        return apply_updates(params, updates, state), state

    params, state = _float_part(PARAMS), opt.init(_float_part(PARAMS))
    for _ in range(3):
        params, state = step(params, state)
    assert len(traces) == 1
    assert int(stall_stats(state).steps) == 3


def test_vmap_over_formats_gives_each_format_its_own_stats():
    formats = (E3M4, E5M2, E7M0)

    def stall_rate(fmt_params):
        opt = monitor_stall(optax.sgd(0.01), fmt_params)
        return stall_stats(opt.update(GRADS, opt.init(PARAMS), PARAMS)[1]).last.stall_rate

    batched = jax.jit(jax.vmap(stall_rate))(stack_format_params(formats))
    for fmt, rate in zip(formats, np.asarray(batched), strict=True):
        assert rate == float(stall_rate(fmt))


@pytest.mark.parametrize("every", [3, 5, 40])
def test_every_k_steps_measures_each_entry_once_per_k_steps(every):
    """Blocks of 1/every of each leaf rotate: k steps of one update add up to one dense step."""
    params = {**_float_part(PARAMS), "tiny": jnp.array([0.5, -1.0, 2.0])}
    grads = {**_float_part(GRADS), "tiny": jnp.array([1.0, 1e-12, -3.0])}
    dense = monitor_stall(optax.sgd(0.01), E5M2)
    sampled = monitor_stall(optax.sgd(0.01), E5M2, every=every)
    _, dense_state = jax.jit(dense.update)(grads, dense.init(params), params)
    traced = count_compiles(sampled.update)
    update = jax.jit(traced)
    state = sampled.init(params)
    entries = []
    for _ in range(every):
        _, state = update(grads, state, params)
        leaves = stall_stats(state).leaf_last
        entries.append([int(leaves["dense"]["kernel"].entries), int(leaves["tiny"].entries)])

    def block_sizes(n):
        size = -(-n // every)
        return [max(0, min(size, n - i * size)) for i in range(every)]

    assert [e[0] for e in entries] == block_sizes(512)
    assert [e[1] for e in entries] == block_sizes(3)
    expected, got = stall_stats(dense_state).last, stall_stats(state).total
    for field in ("stalled", "counted", "flipped", "moved", "entries"):
        assert int(getattr(got, field)) == int(getattr(expected, field)), field
    np.testing.assert_array_equal(np.asarray(got.histogram.low), np.asarray(expected.histogram.low))
    np.testing.assert_allclose(float(got.landed), float(expected.landed), rtol=1e-6)
    np.testing.assert_allclose(float(got.requested), float(expected.requested), rtol=1e-6)
    # The next step starts the cycle again at the first block.
    _, state = update(grads, state, params)
    assert int(stall_stats(state).leaf_last["dense"]["kernel"].entries) == block_sizes(512)[0]
    assert traced.traces == 1


def test_every_k_phase_is_exact_past_2_to_32_steps():
    sampled = monitor_stall(optax.sgd(0.01), E5M2, every=3)
    state = sampled.init(PARAMS)
    # 2**32 + 2 = 3 * 1431655766: a multiple of 3, so the first block is measured.
    state = state._replace(steps=ExactCount(jnp.uint32(1), jnp.uint32(2)))
    _, state = jax.jit(sampled.update)(GRADS, state, PARAMS)
    bias = stall_stats(state).leaf_last["dense"]["bias"]
    assert int(bias.entries) == 6 and int(bias.counted) == 5  # GRADS' bias[0] is 0


@pytest.mark.parametrize("every", [0, -2, 2**16, 1.5, True])
def test_every_must_be_a_small_positive_int(every):
    with pytest.raises(ValueError, match="every"):
        monitor_stall(optax.sgd(0.1), E5M2, every=every)


@pytest.mark.parametrize("every", [1, 3])
def test_empty_and_scalar_leaves(every):
    params = {"empty": jnp.zeros((0, 3)), "scalar": jnp.float32(1.5), "vector": jnp.ones(5)}
    grads = jax.tree.map(lambda p: p + 0.3, params)
    opt = monitor_stall(optax.sgd(0.1), E5M2, every=every)
    state = opt.init(params)
    for _ in range(3):
        _, state = jax.jit(opt.update)(grads, state, params)
    stats = stall_stats(state)
    assert int(stats.leaf_total["empty"].entries) == 0
    assert int(stats.total.entries) == int(stats.total.counted) == 6 * 3 // every


@pytest.mark.parametrize(
    ("fmt", "scale"),
    [("E4M3", "pow2"), ("MXFP8_E4M3", "pow2"),
     pytest.param("E4M3", "amax", marks=pytest.mark.slow)],
)  # fmt: skip
def test_leaves_rounded_together_count_what_each_leaf_counts_alone(fmt, scale, monkeypatch):
    # Small leaves are rounded as one vector (per-tensor) or as rows of blocks (MX); each
    # leaf's counts are still its own, exactly those of the same tree with every leaf rounded
    # alone (its float sums too, up to summation order).
    keys = jax.random.split(jax.random.key(3), 8)
    params = {
        "a": jax.random.normal(keys[0], (40, 30)),
        "b": 1e-3 * jax.random.normal(keys[1], (17,)),
        "c": jax.random.normal(keys[2], (5,)).astype(jnp.bfloat16),
        "d": jax.random.normal(keys[3], (3, 3)),
    }
    grads = {k: 0.05 * jax.random.normal(keys[4 + i], p.shape) for i, (k, p) in
             enumerate(params.items())}  # fmt: skip

    def stats():
        opt = monitor_stall(optax.adam(0.01), fmt, scale=scale)
        return jax.jit(opt.update)(grads, opt.init(params), params)[1]

    together = stats()
    monkeypatch.setattr(_common, "FUSED_MAX_ENTRIES", 0)
    alone = stats()
    for name in params:
        got, want = together.leaf_last[name], alone.leaf_last[name]
        np.testing.assert_array_equal(np.asarray(got.counts), np.asarray(want.counts))
        np.testing.assert_allclose(np.asarray(got.sums), np.asarray(want.sums), rtol=1e-6)
    assert int(together.last.stalled) > 0 and int(together.last.flipped) > 0
