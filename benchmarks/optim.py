"""Cost of stall monitoring and low-precision storage on one jitted Adam step.

Times ``update + apply`` on a ~10M-parameter pytree for plain Adam, Adam wrapped in
``monitor_stall`` (every step, and every 10th step: the average cost over 10 calls is what a
run pays), and Adam followed by ``low_precision_storage`` in each mode. Candidates are
interleaved (one call of each per repetition) so drift in machine load hits all alike; the
table shows medians and ratios to plain Adam. Prints only, asserts nothing.

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
    """An MLP-like pytree: four width x 2*width kernels, biases and a small embedding."""
    keys = jax.random.split(jax.random.key(0), 6)
    params = {
        f"layer_{i}": {
            "kernel": jax.random.normal(keys[i], (width, 2 * width)) * 0.02,
            "bias": jnp.zeros((2 * width,)),
        }
        for i in range(4)
    }
    params["embed"] = jax.random.normal(keys[5], (width // 2, width)) * 0.02
    return params


def make_step(opt: optax.GradientTransformation, snap: bool):
    @jax.jit
    def step(params, grads, state):
        updates, state = opt.update(grads, state, params)
        if snap:
            return apply_updates(params, updates, state), state
        return optax.apply_updates(params, updates), state

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1M parameters, 5 repetitions")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per candidate")
    args = parser.parse_args()
    width = 352 if args.quick else 1088
    reps = args.reps or (5 if args.quick else 15)

    params = make_params(width)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape) * 1e-3, params)
    n = sum(p.size for p in jax.tree.leaves(params))
    adam = optax.adam(1e-3)
    candidates = {
        "adam": (adam, False),
        "adam + monitor": (monitor_stall(adam, E5M2), False),
        "adam + monitor every 10": (monitor_stall(adam, E5M2, every=10), False),
    }
    for rule in STORAGE_RULES:
        candidates[f"adam + storage {rule}"] = (
            optax.chain(adam, low_precision_storage(E5M2, rule)),
            True,
        )

    steps, states = {}, {}
    for name, (opt, snap) in candidates.items():
        steps[name] = make_step(opt, snap)
        states[name] = opt.init(params)
        jax.block_until_ready(steps[name](params, grads, states[name]))  # compile

    times: dict[str, list[float]] = {name: [] for name in candidates}
    calls = 10  # consecutive steps per timing, threading the state (the sampled monitor's cycle)
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(calls):
                _, states[name] = step(params, grads, states[name])
            jax.block_until_ready(states[name])
            times[name].append((time.perf_counter() - start) / calls)

    print(
        f"{n / 1e6:.1f}M parameters, {reps} interleaved repetitions of {calls} steps, "
        f"{jax.devices()[0]}"
    )
    base = statistics.median(times["adam"])
    print(f"{'candidate':<28}{'median ms':>10}{'x adam':>8}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<28}{median * 1e3:>10.2f}{median / base:>8.2f}")


if __name__ == "__main__":
    main()
