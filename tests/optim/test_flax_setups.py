"""The optax wrappers in Flax's training containers: nnx.Optimizer, TrainState, partition specs.

Each setup runs 5 jitted steps; the stored weights are on the grid after every step, and the
weights and statistics equal those of the bare optax loop fed the same gradients.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
import pytest
from flax import nnx
from flax.training import train_state
from jax.sharding import PartitionSpec as P

from altgrad_jax.formats import E2M1, E2M3, E3M2, EIGHT_BIT_FORMATS, get_format, grid
from altgrad_jax.linen import QUANT_STATE, QuantDense
from altgrad_jax.linen import quant_value_and_grad as linen_quant_value_and_grad
from altgrad_jax.nnx import QuantLinear, quant_value_and_grad
from altgrad_jax.optim import (
    STORAGE_RULES,
    GridOptimizer,
    GridTrainState,
    LowPrecisionState,
    StallMonitorState,
    apply_updates,
    grid_sgd,
    landed_stats,
    low_precision_storage,
    monitor_stall,
    scale_by_ulp,
    stall_stats,
)
from altgrad_jax.rules import PathRules

FMT = "e5m2"  # wide exponents: plain w + u can miss the grid, the drop-ins must snap
N_STEPS = 5


def _on_grid(w, fmt, scale) -> bool:
    values = np.asarray(w, np.float64) / float(scale)
    return bool(np.isin(values, grid(get_format(fmt))).all())


def _storage_on_grid(params, opt_state, fmt=FMT) -> None:
    """Every stored leaf of ``params`` lies on the grid recorded in the storage state."""
    found = otu.tree_get_all_with_path(opt_state, "LowPrecisionState")
    if not found:
        return
    scales = jax.tree.leaves(nnx.as_pure(found[0][1].scale))
    weights = jax.tree.leaves(nnx.as_pure(params))
    assert len(scales) == len(weights)
    for w, s in zip(weights, scales, strict=True):
        assert _on_grid(w, fmt, s)


def _transforms():
    return {
        "monitor": monitor_stall(optax.adam(0.05), FMT),
        **{
            rule: optax.chain(optax.adam(0.05), low_precision_storage(FMT, rule, seed=1))
            for rule in STORAGE_RULES
        },
        "chained": optax.chain(
            monitor_stall(optax.adam(0.05), FMT), low_precision_storage(FMT, "stochastic")
        ),
    }


def _bare_loop(tx, params, grads_seq):
    """The plain optax loop with the library's apply_updates, on recorded gradients.

    Returns ``[(params, opt_state)]`` after each step and the last state.
    """
    state = tx.init(params)
    step = jax.jit(tx.update)
    history = []
    for grads in grads_seq:
        updates, state = step(grads, state, params)
        has_storage = bool(otu.tree_get_all_with_path(state, "LowPrecisionState"))
        params = (
            apply_updates(params, updates, state)
            if has_storage
            else optax.apply_updates(params, updates)
        )
        history.append((params, state))
    return history, state


def _close(a, b) -> None:
    """Equal: exactly for counts, to float32 rounding for sums and float weights (the same
    optimizer arithmetic compiled into another program may round its last bit differently)."""
    a, b = np.asarray(a), np.asarray(b)
    if np.issubdtype(a.dtype, np.floating):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    else:
        np.testing.assert_array_equal(a, b)


def _assert_same_statistics(opt_state, reference_state):
    """Monitor and storage statistics equal wherever the state is (counts exactly)."""
    for read in (stall_stats, landed_stats):
        try:
            expected = read(reference_state)
        except ValueError:
            continue
        jax.tree.map(_close, read(opt_state), expected)


# ------------------------------------------------------------------------------ nnx
class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = QuantLinear(8, 16, rngs=rngs)
        self.out = QuantLinear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


BATCHES = [
    (jax.random.normal(jax.random.key(i), (6, 8)), jax.random.normal(jax.random.key(9 + i), (6, 4)))
    for i in range(N_STEPS)
]


def _loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def _nnx_step(model, optimizer, x, y):
    _, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return grads


@nnx.jit
def _nnx_quant_step(model, optimizer, x, y):
    _, grads, _ = quant_value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return grads


# Each storage rule once per container: nearest and master here, the others in TrainState
# (test_storage.py checks every rule's arithmetic on its own).
NNX_CASES = [
    *[(GridOptimizer, _nnx_quant_step, name) for name in ["monitor", "nearest", "master"]],
    (GridOptimizer, _nnx_step, "chained"),  # plain nnx.value_and_grad
    (nnx.Optimizer, _nnx_step, "chained"),  # nnx's own optimizer
]


@pytest.mark.parametrize(
    "optimizer_cls, step, name",
    NNX_CASES,
    ids=[f"{c.__name__}-{s.__name__.strip('_')}-{n}" for c, s, n in NNX_CASES],
)
def test_nnx_optimizer_matches_the_bare_loop(optimizer_cls, step, name):
    model = MLP(nnx.Rngs(0))
    tx = _transforms()[name]
    params0 = nnx.as_pure(nnx.state(model, nnx.Param))
    optimizer = optimizer_cls(model, tx, wrt=nnx.Param)
    grads_seq, stored = [], []
    for x, y in BATCHES:
        grads_seq.append(nnx.as_pure(step(model, optimizer, x, y)))
        stored.append(nnx.as_pure(nnx.state(model, nnx.Param)))
    history, reference = _bare_loop(_transforms()[name], params0, grads_seq)
    for got, (expected, expected_state) in zip(stored, history, strict=True):
        if name == "monitor":  # float weights: to the last bit of Adam's arithmetic
            jax.tree.map(_close, got, expected)
        elif optimizer_cls is GridOptimizer:  # on the grid: the same grid values
            jax.tree.map(np.testing.assert_array_equal, got, expected)
            _storage_on_grid(got, expected_state)
        else:  # plain optax.apply_updates: within a float32 rounding of the stored weights
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, expected)
    _assert_same_statistics(optimizer.opt_state, reference)
    _assert_same_statistics(optimizer, reference)  # found through the optimizer itself


def test_nnx_optimizer_keeps_e4m3_storage_on_grid_with_plain_optax_apply():
    """Narrow exponents: the updates are exact, so nnx.Optimizer itself keeps the grid."""
    model = MLP(nnx.Rngs(0))
    tx = optax.chain(optax.adam(0.05), low_precision_storage("e4m3", "stochastic"))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    first = True
    for x, y in BATCHES:
        _nnx_step(model, optimizer, x, y)
        params = nnx.as_pure(nnx.state(model, nnx.Param))
        if first:  # the float32 initialization is projected by the first step; snap it once
            nnx.update(model, _snap(params, optimizer))
            first = False
            continue
        _storage_on_grid(params, optimizer.opt_state, "e4m3")


def _snap(params, optimizer):
    from altgrad_jax.optim import snap_to_grid

    return snap_to_grid(params, nnx.as_pure(optimizer.opt_state))


@pytest.mark.parametrize("tx_name", ["scale_by_ulp", "grid_sgd"])
def test_ulp_transforms_in_nnx_optimizer(tx_name):
    model = MLP(nnx.Rngs(0))
    if tx_name == "scale_by_ulp":
        tx = optax.chain(
            optax.scale_by_adam(),
            optax.scale(-1.0),
            scale_by_ulp("e4m3"),
            low_precision_storage("e4m3"),
        )
    else:
        tx = optax.chain(grid_sgd(20.0, "e4m3"), low_precision_storage("e4m3"))
    params0 = nnx.as_pure(nnx.state(model, nnx.Param))
    optimizer = GridOptimizer(model, tx, wrt=nnx.Param)
    grads_seq = [nnx.as_pure(_nnx_step(model, optimizer, x, y)) for x, y in BATCHES]
    history, reference = _bare_loop(tx, params0, grads_seq)
    got = nnx.as_pure(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, got, history[-1][0])
    _storage_on_grid(got, reference, "e4m3")
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), got, params0))


# ---------------------------------------------------------------------------- linen
class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(QuantDense(16, name="hidden")(x))
        return QuantDense(4, name="out")(x)


LINEN = LinenMLP()


def _linen_loss(params, quant_state, x, y):
    out, updates = LINEN.apply(
        {"params": params, QUANT_STATE: quant_state}, x, mutable=[QUANT_STATE]
    )
    return jnp.mean((out - y) ** 2), updates[QUANT_STATE]


@pytest.mark.parametrize("name", ["monitor", "stochastic", "compensated", "chained"])
def test_train_state_matches_the_bare_loop(name):
    variables = LINEN.init(jax.random.key(0), BATCHES[0][0])
    quant_state = variables[QUANT_STATE]
    state = GridTrainState.create(
        apply_fn=LINEN.apply, params=variables["params"], tx=_transforms()[name]
    )

    @jax.jit
    def step(state, quant_state, x, y):
        _, grads, quant_state = linen_quant_value_and_grad(_linen_loss)(
            state.params, quant_state, x, y
        )
        return state.apply_gradients(grads=grads), quant_state, grads

    grads_seq, stored = [], []
    for x, y in BATCHES:
        state, quant_state, grads = step(state, quant_state, x, y)
        grads_seq.append(grads)
        stored.append(state.params)
    history, reference = _bare_loop(_transforms()[name], variables["params"], grads_seq)
    for got, (expected, expected_state) in zip(stored, history, strict=True):
        jax.tree.map(_close if name == "monitor" else np.testing.assert_array_equal, got, expected)
        _storage_on_grid(got, expected_state)
    _assert_same_statistics(state.opt_state, reference)
    _assert_same_statistics(state, reference)


def test_plain_train_state_misses_the_grid_that_grid_train_state_keeps():
    """E5M2, a weight jumping from -1.25 * 2**-10 to 2**15: the float32 sum rounds off the grid."""
    params = {"w": jnp.array([-1.25 * 2.0**-10, 1.0], jnp.float32)}
    tx = low_precision_storage(FMT, "nearest")
    grads = {"w": jnp.array([32768.0, 0.0], jnp.float32)}
    plain = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    fixed = GridTrainState.create(apply_fn=None, params=params, tx=tx)
    plain_w = plain.apply_gradients(grads=grads).params["w"]
    fixed_w = fixed.apply_gradients(grads=grads).params["w"]
    assert float(plain_w[0]) != 32768.0
    np.testing.assert_array_equal(np.asarray(fixed_w), [32768.0, 1.0])


# ------------------------------------------------------------------ partition specs
class Partitioned(nn.Module):
    @nn.compact
    def __call__(self, x):
        kernel = nn.with_partitioning(nn.initializers.lecun_normal(), ("data", "model"))
        bias = nn.with_partitioning(nn.initializers.zeros_init(), ("model",))
        return nn.Dense(8, kernel_init=kernel, bias_init=bias)(x)


@pytest.mark.parametrize("name", ["monitor", "compensated", "master", "chained"])
def test_flax_partition_spec_recipe_replicates_per_layer_state(name):
    """As in Flax's lm1b example: nn.get_partition_spec of eval_shape(TrainState.create)."""
    model, tx = Partitioned(), _transforms()[name]

    def init(key):
        params = model.init(key, jnp.ones((2, 4)))["params"]
        return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    specs = nn.get_partition_spec(jax.eval_shape(init, jax.random.key(0)))
    for state_type in (StallMonitorState, LowPrecisionState):
        for _, state in otu.tree_get_all_with_path(specs.opt_state, state_type.__name__):
            per_layer = (
                (state.leaf_last, state.leaf_total)
                if state_type is StallMonitorState
                else (state.scale, state.grid)
            )
            for spec in jax.tree.leaves(per_layer, is_leaf=lambda n: isinstance(n, P)):
                assert spec == P(), (name, spec)
            if state_type is LowPrecisionState:
                per_entry = state.residual if name == "compensated" else state.master
                if per_entry is not None:
                    assert per_entry["Dense_0"]["kernel"] == P("data", "model")
                    assert per_entry["Dense_0"]["bias"] == P("model")


# ------------------------------------------------------------------ landed, states
def test_landed_ratio_counts_only_the_updates_movement_from_float32_params():
    """Issue 12 item 8: the first rounding of float32 weights is projection, not landing."""
    n = 2**16  # |u| ~ 1e-3 of spacings ~ 0.1: ~600 weights move per step, a ~4% noise
    params = {"w": jax.random.normal(jax.random.key(0), (n,))}
    tx = optax.chain(optax.adam(1e-3), low_precision_storage(FMT, "stochastic"))
    state = tx.init(params)
    grads = {"w": jax.random.normal(jax.random.key(1), (n,))}
    updates, state = jax.jit(tx.update)(grads, state, params)
    stats = landed_stats(state)
    assert abs(float(stats.ratio) - 1.0) < 0.15  # was ~48 when the projection counted
    assert float(stats.projected) > 20 * float(stats.requested)
    params = apply_updates(params, updates, state)
    for _ in range(3):
        updates, state = jax.jit(tx.update)(grads, state, params)
        params = apply_updates(params, updates, state)
        assert float(landed_stats(state).projected) == 0.0  # on the grid: nothing to project
    assert abs(float(landed_stats(state).run_ratio) - 1.0) < 0.1
    # The settled shortcut (t0 = w, no rounding pass) equals the full computation.
    short = landed_stats(jax.jit(tx.update)(grads, state, params)[1])
    full = landed_stats(
        jax.jit(tx.update)(grads, (state[0], state[1]._replace(settled=False)), params)[1]
    )
    assert float(full.projected) == 0.0
    assert float(full.landed) == float(short.landed) > 0


def test_states_are_found_by_name_with_optax_tree_utils():
    params = {"w": jnp.ones(3)}
    tx = optax.chain(monitor_stall(optax.sgd(0.1), FMT), low_precision_storage(FMT, "master"))
    state = tx.init(params)
    assert isinstance(otu.tree_get(state, "LowPrecisionState"), LowPrecisionState)
    assert isinstance(otu.tree_get(state, "StallMonitorState"), StallMonitorState)


def test_path_rules_with_an_unknown_default_fail_at_construction():
    for make in (low_precision_storage, lambda f: monitor_stall(optax.sgd(0.1), f)):
        with pytest.raises(ValueError, match="known formats"):
            make(PathRules((("bias", None),), default="e9m9"))


# --------------------------------------------------------------- exactness of w + u
@pytest.mark.parametrize("fmt", [*EIGHT_BIT_FORMATS[:5], E2M1, E2M3, E3M2], ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_optax_apply_updates_lands_exactly_for_narrow_exponents(fmt, dtype):
    """Every pair of grid values w -> t: the storage's float32 update makes the plain optax sum
    exactly t, for float32 and bfloat16 weights (so nnx.Optimizer and TrainState keep the grid)."""
    values = grid(fmt).astype(np.float32)
    w = jnp.asarray(np.repeat(values, values.size)).astype(dtype)
    t = jnp.asarray(np.tile(values, values.size))
    params = {"w": w}
    tx = low_precision_storage(fmt, "nearest", scale=1.0)
    updates, _ = tx.update({"w": t - w.astype(jnp.float32)}, tx.init(params), params)
    assert updates["w"].dtype == jnp.float32
    landed = optax.apply_updates(params, updates)["w"]
    assert landed.dtype == dtype
    np.testing.assert_array_equal(np.asarray(landed, np.float32), np.asarray(t))
