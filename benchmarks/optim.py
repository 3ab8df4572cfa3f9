"""Cost of stall monitoring and low-precision storage on one jitted Adam step.

Times ``update + apply`` on a ~10M-parameter MLP for plain Adam, Adam wrapped in
``monitor_stall`` (every step, and each weight every 10th or 16th step) and Adam followed by
``low_precision_storage`` in each mode; then the monitor inside a whole train step (forward and
backward on a batch of 256). Candidates are interleaved (ten steps of each per repetition) so
drift in machine load hits all alike; the tables show medians and ratios to the first row.
Prints only, asserts nothing.

    python benchmarks/optim.py            # ~10M parameters
    python benchmarks/optim.py --quick    # ~1M parameters, fewer repetitions
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from altgrad_jax import E5M2
from altgrad_jax.optim import STORAGE_RULES, apply_updates, low_precision_storage, monitor_stall


def make_params(width: int) -> dict[str, jax.Array]:
    """An MLP: an input projection, then four layers width -> 2*width -> width -> ..."""
    keys = jax.random.split(jax.random.key(0), 6)
    shapes = [(width, 2 * width), (2 * width, width)] * 2
    params = {
        f"layer_{i}": {
            "kernel": jax.random.normal(keys[i], shape) * 0.02,
            "bias": jnp.zeros((shape[1],)),
        }
        for i, shape in enumerate(shapes)
    }
    params["embed"] = jax.random.normal(keys[5], (width // 2, width)) * 0.02
    return params


def loss_fn(params: dict[str, jax.Array], inputs: jax.Array) -> jax.Array:
    h = inputs @ params["embed"]
    for i in range(4):
        layer = params[f"layer_{i}"]
        h = jax.nn.relu(h @ layer["kernel"] + layer["bias"])
    return jnp.mean(h**2)


def make_step(opt: optax.GradientTransformation, snap: bool, inputs: jax.Array | None = None):
    """One jitted optimizer step on given gradients, or a whole train step on ``inputs``."""

    @jax.jit
    def step(params, grads, state):
        if inputs is not None:
            grads = jax.grad(loss_fn)(params, inputs)
        updates, state = opt.update(grads, state, params)
        if snap:
            return apply_updates(params, updates, state), state
        return optax.apply_updates(params, updates), state

    return step


def time_steps(
    candidates: dict[str, tuple[optax.GradientTransformation, bool]],
    params: dict[str, jax.Array],
    grads: dict[str, jax.Array],
    reps: int,
    inputs: jax.Array | None = None,
) -> dict[str, float]:
    """Median seconds per step of each candidate, measured interleaved."""
    steps, states = {}, {}
    for name, (opt, snap) in candidates.items():
        steps[name] = make_step(opt, snap, inputs)
        states[name] = opt.init(params)
        jax.block_until_ready(steps[name](params, grads, states[name]))  # compile

    times: dict[str, list[float]] = {name: [] for name in candidates}
    calls = 10  # consecutive steps per timing, threading the state (a sampled monitor's cycle)
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(calls):
                _, states[name] = step(params, grads, states[name])
            jax.block_until_ready(states[name])
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values) for name, values in times.items()}


def print_table(title: str, medians: dict[str, float]) -> None:
    base = next(iter(medians.values()))
    print(f"\n{title:<32}{'median ms':>10}{'ratio':>8}")
    for name, median in medians.items():
        print(f"{name:<32}{median * 1e3:>10.2f}{median / base:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1M parameters, 5 repetitions")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per candidate")
    args = parser.parse_args()
    width = 352 if args.quick else 1088
    reps = args.reps or (5 if args.quick else 15)

    params = make_params(width)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape) * 1e-3, params)
    inputs = jax.random.normal(jax.random.key(2), (256, width // 2))
    n = sum(p.size for p in jax.tree.leaves(params))
    adam = optax.adam(1e-3)
    monitored = {
        "adam": (adam, False),
        "adam + monitor": (monitor_stall(adam, E5M2), False),
        "adam + monitor every 10": (monitor_stall(adam, E5M2, every=10), False),
        "adam + monitor every 16": (monitor_stall(adam, E5M2, every=16), False),
    }
    stored = {
        f"adam + storage {rule}": (optax.chain(adam, low_precision_storage(E5M2, rule)), True)
        for rule in STORAGE_RULES
    }
    print(f"{n / 1e6:.1f}M parameters, {reps} interleaved repetitions, {jax.devices()[0]}")
    print_table("optimizer step", time_steps({**monitored, **stored}, params, grads, reps))
    print_table("train step, batch 256", time_steps(monitored, params, grads, reps, inputs=inputs))


if __name__ == "__main__":
    main()
