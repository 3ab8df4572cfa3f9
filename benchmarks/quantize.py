"""Speed of quantize against a plain copy and XLA's native float8 cast, side by side.

For every 8-bit format and the block formats (MXFP8, MXFP4, NVFP4, blocks along the last axis of
a ``[2**24 / 1024, 1024]`` view), the median time of ``jit(quantize)`` on 2**24 float32 elements
next to a jitted copy (``x * 2``), a copy whose output reuses its donated input buffer (the
memory-bandwidth limit: the plain copy spends most of its time allocating its output) and the
``float8_e4m3fn`` cast round trip, measured interleaved in one process (each repetition runs
every candidate once, in rotating order) because shared machines are noisy. Ratios are to the
copy, to the donated copy, and for block formats to the per-tensor E4M3 quantize (targets: MX
<= 1.5x, NVFP4 <= 2x per-tensor).

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
    for fmt in (ag.MXFP8_E4M3, ag.MXFP6_E2M3, ag.MXFP4, ag.NVFP4):
        fns[f"{fmt.name} blocks"] = lambda x, fmt=fmt: ag.quantize(x.reshape(-1, 1024), fmt)
    return {name: jax.jit(fn) for name, fn in fns.items()}


def runners(fns, x) -> dict[str, Callable[[], jax.Array]]:
    """Zero-argument calls; the donated copy feeds its output back as its next input."""
    calls: dict[str, Callable[[], jax.Array]] = {
        name: (lambda fn=fn: fn(x)) for name, fn in fns.items()
    }
    donated = jax.jit(lambda y: y * 2, donate_argnums=0)
    buffer = [x * 1]

    def donated_copy() -> jax.Array:
        buffer[0] = donated(buffer[0])
        return buffer[0]

    calls["copy, donated buffer"] = donated_copy
    return calls


def measure(calls, repeats: int) -> dict[str, float]:
    for call in calls.values():
        call().block_until_ready()  # compile and warm up
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter()
            calls[name]().block_until_ready()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log2-size", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    x = jax.random.normal(jax.random.key(0), (1 << args.log2_size,), jnp.float32) * 100
    medians = measure(runners(candidates(jax.random.key(1)), x), args.repeats)
    base, donated = medians["copy (x * 2)"], medians["copy, donated buffer"]
    tensor = medians["E4M3 nearest"]
    print(f"{jax.devices()[0].device_kind}, 2**{args.log2_size} float32, {args.repeats} repeats")
    print(
        f"{'candidate':24s} {'median ms':>10s} {'vs copy':>8s} {'vs donated':>11s} {'vs E4M3':>8s}"
    )
    for name, seconds in medians.items():
        print(
            f"{name:24s} {seconds * 1e3:10.2f} {seconds / base:7.2f}x {seconds / donated:10.2f}x "
            f"{seconds / tensor:7.2f}x"
        )


if __name__ == "__main__":
    main()
