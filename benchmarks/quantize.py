"""Speed of quantize against a plain copy and XLA's native float8 cast, side by side.

For every 8-bit format, the median time of ``jit(quantize)`` on 2**24 float32 elements next to a
jitted copy (``x * 2``) and the ``float8_e4m3fn`` cast round trip, measured interleaved in one
process (each repetition runs every candidate once, in rotating order) because shared machines
are noisy. Ratios are to the copy; the target is <= 1.1x for nearest, < 2x for stochastic.

    python benchmarks/quantize.py [--log2-size 24] [--repeats 21]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import altgrad_jax as ag


def candidates(key: jax.Array) -> dict[str, Callable[[jax.Array], jax.Array]]:
    fns: dict[str, Callable[[jax.Array], jax.Array]] = {
        "copy (x * 2)": lambda x: x * 2,
        "XLA f8e4m3fn cast": lambda x: x.astype(jnp.float8_e4m3fn).astype(jnp.float32),
    }
    for fmt in ag.EIGHT_BIT_FORMATS:
        fns[f"{fmt.name} nearest"] = lambda x, fmt=fmt: ag.quantize(x, fmt)
    fns["E4M3 nearest, scale"] = lambda x: ag.quantize(x, ag.E4M3, 0.37)
    fns["E4M3 toward_zero"] = lambda x: ag.quantize(x, ag.E4M3, rounding="toward_zero")
    for name in ("E4M3", "E5M2"):
        fns[f"{name} stochastic"] = lambda x, name=name: ag.quantize(
            x, name, rounding="stochastic", key=key
        )
    traced = ag.format_params(ag.E4M3).as_arrays()
    fns["E4M3 traced format"] = lambda x: ag.quantize(x, traced)
    return {name: jax.jit(fn) for name, fn in fns.items()}


def measure(fns, x, repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn(x).block_until_ready()  # compile and warm up
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter()
            fns[name](x).block_until_ready()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2-size", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    x = jax.random.normal(jax.random.key(0), (1 << args.log2_size,), jnp.float32) * 100
    medians = measure(candidates(jax.random.key(1)), x, args.repeats)
    base = medians["copy (x * 2)"]
    print(f"{jax.devices()[0].device_kind}, 2**{args.log2_size} float32, {args.repeats} repeats")
    print(f"{'candidate':24s} {'median ms':>10s} {'vs copy':>8s}")
    for name, seconds in medians.items():
        print(f"{name:24s} {seconds * 1e3:10.2f} {seconds / base:7.2f}x")


if __name__ == "__main__":
    main()
