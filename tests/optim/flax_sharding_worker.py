"""Runs in its own process with 8 simulated CPU devices (see test_flax_sharding.py).

The optax wrappers inside nnx.Optimizer and a Linen TrainState on sharded models, against one
device: data parallel (batch split over 8 devices), model parallel with the optimizer state's
specs from Flax's recipes (nnx.get_partition_spec / nn.get_partition_spec of
jax.eval_shape(TrainState.create)), and under an explicit-sharding mesh. Stored weights and
stall counts equal one device bit for bit; float sums to float32 rounding; per-layer state is
replicated and per-entry state follows its parameter. Prints OK on success.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from altgrad_jax.formats import get_format, grid
from altgrad_jax.nnx import QuantLinear, quant_value_and_grad
from altgrad_jax.optim import (
    GridOptimizer,
    GridTrainState,
    landed_stats,
    low_precision_storage,
    monitor_stall,
    stall_stats,
)

FMT = "e5m2"
STEPS = 3
GRID = grid(get_format(FMT))


def make_tx():
    return optax.chain(
        monitor_stall(optax.adam(0.05), FMT, every=3),
        low_precision_storage(FMT, "compensated"),
    )


def fixed_grads(params):
    return jax.tree.map(
        lambda p: jnp.cos(jnp.arange(p.size, dtype=jnp.float32)).reshape(p.shape), params
    )


def check_same(got, expected, name):
    """Weights and counts bit for bit; float sums to float32 rounding."""
    got_params, got_stats = got
    want_params, want_stats = expected
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name),
        got_params,
        want_params,
    )
    for a, b in zip(jax.tree.leaves(got_stats), jax.tree.leaves(want_stats), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


def check_on_grid(params, opt_state):
    (state,) = [node for _, node in otu.tree_get_all_with_path(opt_state, "LowPrecisionState")]
    scales = jax.tree.leaves(nnx.as_pure(state.scale))
    for w, s in zip(jax.tree.leaves(nnx.as_pure(params)), scales, strict=True):
        assert np.isin(np.asarray(w, np.float64) / float(s), GRID).all()


PER_LAYER = {"leaf_last", "leaf_total", "last", "total", "steps", "scale", "grid", "landed"}
PER_ENTRY = {"residual", "mu", "nu"}


def _names(path):
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def check_state_specs(spec_tree, param_specs):
    """Per-layer entries replicated; per-entry ones (Adam's moments, residual) as the param.

    Walks the paths, so it reads Linen's NamedTuple states and nnx.state's dicts alike.
    """
    is_spec = lambda n: isinstance(n, P)  # noqa: E731
    by_param = {
        tuple(n for n in _names(path) if n != "value"): spec
        for path, spec in jax.tree_util.tree_flatten_with_path(param_specs, is_leaf=is_spec)[0]
    }
    seen = set()
    for path, spec in jax.tree_util.tree_flatten_with_path(spec_tree, is_leaf=is_spec)[0]:
        names = _names(path)
        field = next((n for n in names if n in PER_LAYER | PER_ENTRY), None)
        if field in PER_LAYER:
            assert spec in (P(), None), (names, spec)
        elif field in PER_ENTRY:
            key = tuple(n for n in names[names.index(field) + 1 :] if n != "value")
            assert spec == by_param[key], (names, spec, by_param[key])
        seen.add(field)
    # (A static format's grid entry has no arrays, so "grid" has no spec to check.)
    assert {"leaf_total", "scale", "residual", "mu"} <= seen, seen


# ------------------------------------------------------------------------------ nnx
SPECS = {"hidden": ((None, "model"), ("model",)), "out": (("model", None), (None,))}


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, shard: bool = True):
        def layer(n_in, n_out, names):
            kernel, bias = nnx.initializers.lecun_normal(), nnx.initializers.zeros_init()
            if shard:
                kernel = nnx.with_partitioning(kernel, names[0])
                bias = nnx.with_partitioning(bias, names[1])
            return QuantLinear(n_in, n_out, kernel_init=kernel, bias_init=bias, rngs=rngs)

        self.hidden = layer(8, 16, SPECS["hidden"])
        self.out = layer(16, 4, SPECS["out"])

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


@nnx.jit
def nnx_step(model, optimizer, grads):
    optimizer.update(model, grads)


@nnx.jit
def nnx_batch_step(model, optimizer, x, y):
    _, grads, _ = quant_value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)


def statistics(opt_state):
    """Exact counts and float sums (without the Kahan compensations, which depend on order)."""
    stall, landed = stall_stats(opt_state).total, landed_stats(opt_state)
    runs = (landed.run_landed, landed.run_requested, landed.run_projected)
    return stall.counts, stall.sums.total, *(run.total for run in runs)


def nnx_results(model, optimizer):
    return nnx.as_pure(nnx.state(model, nnx.Param)), statistics(optimizer)


def nnx_fixed_run(model, optimizer):
    grads = fixed_grads(nnx.state(model, nnx.Param))  # Param variables, as nnx.grad returns
    for _ in range(STEPS):
        nnx_step(model, optimizer, grads)
        check_on_grid(nnx.state(model, nnx.Param), optimizer.opt_state)
    return nnx_results(model, optimizer)


def nnx_recipe(mesh):
    """Flax's NNX recipe: build inside jit, constrain the state to nnx.get_partition_spec."""

    @nnx.jit
    def create():
        model = MLP(nnx.Rngs(0))
        optimizer = GridOptimizer(model, make_tx(), wrt=nnx.Param)
        state = nnx.state((model, optimizer))
        nnx.update(
            (model, optimizer),
            jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)),
        )
        return model, optimizer

    with jax.set_mesh(mesh):
        model, optimizer = create()
        specs = nnx.get_partition_spec(nnx.state(optimizer))
        check_state_specs(specs, nnx.get_partition_spec(nnx.state(model, nnx.Param)))
        assert len(model.hidden.kernel[...].sharding.device_set) == 8
        return nnx_fixed_run(model, optimizer)


def nnx_explicit(mesh):
    """Eagerly sharded variables under an explicit mesh (sharding in types)."""
    with jax.set_mesh(mesh):
        model = MLP(nnx.Rngs(0))
        optimizer = GridOptimizer(model, make_tx(), wrt=nnx.Param)
        assert jax.typeof(model.hidden.kernel[...]).sharding.spec == P(None, "model")
        check_state_specs(
            nnx.get_partition_spec(nnx.state(optimizer)),
            nnx.get_partition_spec(nnx.state(model, nnx.Param)),
        )
        (storage,) = [
            node for _, node in otu.tree_get_all_with_path(optimizer.opt_state, "LowPrecisionState")
        ]
        residual = storage.residual["hidden"]["kernel"][...]
        assert jax.typeof(residual).sharding.spec == P(None, "model")
        return nnx_fixed_run(model, optimizer)


def nnx_batches():
    keys = jax.random.split(jax.random.key(3), 2 * STEPS)
    return [
        (jax.random.normal(keys[i], (32, 8)), jax.random.normal(keys[STEPS + i], (32, 4)))
        for i in range(STEPS)
    ]


def nnx_data_parallel(put_batch):
    model = MLP(nnx.Rngs(0), shard=False)
    optimizer = GridOptimizer(model, make_tx(), wrt=nnx.Param)
    for x, y in nnx_batches():
        nnx_batch_step(model, optimizer, put_batch(x), put_batch(y))
        check_on_grid(nnx.state(model, nnx.Param), optimizer.opt_state)
    return nnx_results(model, optimizer)


# ---------------------------------------------------------------------------- linen
class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        def dense(n, names, name):
            return nn.Dense(
                n,
                kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), names[0]),
                bias_init=nn.with_partitioning(nn.initializers.zeros_init(), names[1]),
                name=name,
            )

        x = nn.relu(dense(16, SPECS["hidden"], "hidden")(x))
        return dense(4, SPECS["out"], "out")(x)


def linen_init(key):
    model = LinenMLP()
    params = model.init(key, jnp.ones((2, 8)))["params"]
    return GridTrainState.create(apply_fn=model.apply, params=params, tx=make_tx())


@jax.jit
def linen_step(state, grads):
    return state.apply_gradients(grads=grads)


def linen_run(state):
    grads = fixed_grads(state.params)  # boxed like the params, as jax.grad of boxed params
    for _ in range(STEPS):
        state = linen_step(state, grads)
        check_on_grid(nn.unbox(state.params), state.opt_state)
    return nn.unbox(state.params), statistics(state)


def linen_recipe(mesh):
    """Flax's Linen recipe (lm1b): specs of jax.eval_shape(init) by nn.get_partition_spec."""
    specs = nn.get_partition_spec(jax.eval_shape(linen_init, jax.random.key(0)))
    check_state_specs(specs.opt_state, specs.params)
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda n: isinstance(n, P)
    )
    state = jax.jit(linen_init, out_shardings=shardings)(jax.random.key(0))
    assert len(nn.unbox(state.params)["hidden"]["kernel"].sharding.device_set) == 8
    return linen_run(state)


def main():
    assert jax.device_count() == 8, jax.devices()
    auto = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    explicit = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    data = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))

    # One device: the same modules, no mesh (the partitioning metadata is then inert).
    single_model = MLP(nnx.Rngs(0), shard=False)
    single = nnx_fixed_run(single_model, GridOptimizer(single_model, make_tx(), wrt=nnx.Param))
    check_same(nnx_recipe(auto), single, "nnx model parallel, recipe")
    if "--all" in sys.argv:  # the slow test: an explicit mesh and data parallelism too
        check_same(nnx_explicit(explicit), single, "nnx model parallel, explicit mesh")
        single_dp = nnx_data_parallel(lambda t: t)
        put = lambda t: jax.device_put(t, NamedSharding(data, P("data")))  # noqa: E731
        check_same(nnx_data_parallel(put), single_dp, "nnx data parallel")

    single_linen = linen_run(jax.jit(linen_init)(jax.random.key(0)))
    check_same(linen_recipe(auto), single_linen, "linen TrainState, recipe")
    print("OK")


if __name__ == "__main__":
    main()
