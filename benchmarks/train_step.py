"""Train-step time and memory: plain Flax vs Flax fp8_ops vs altgrad_jax per-tensor FP8 and blocks.

Two models, each as one jitted SGD train step: an MLP (4 x 1024, batch 256) and a small
pre-LN transformer block. The candidates differ only in the dot_general of their Dense layers:
plain, Flax's fp8_ops, ours per-tensor (E4M3 forward / E5M2 backward, "ours"), ours MXFP8
(MXFP8_E4M3 / MXFP8_E5M2) and ours NVFP4 (every role, each GEMM quantizing its own operands along
its contraction axis). Candidates are interleaved (each repetition runs all of them in turn, so
drift in the machine's speed hits them alike) and the median step time is reported with the
ratios, plus the compiled step's memory from ``compiled.memory_analysis()`` and the bytes it
moves from ``compiled.cost_analysis()`` (independent of machine load). Prints only; asserts nothing.

    python benchmarks/train_step.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

import altgrad_jax as ag
from altgrad_jax.config import QuantConfig
from altgrad_jax.linen import QUANT_STATE, QuantDotGeneral, quant_value_and_grad

try:
    from flax.linen import fp8_ops
except ImportError:  # older or newer Flax without fp8_ops
    fp8_ops = None

FP8_COLLECTION = "_overwrite_with_gradient"
LEARNING_RATE = 1e-3


CONFIGS = {
    "ours": QuantConfig(),
    "mxfp8": QuantConfig(ag.MXFP8_E4M3, ag.MXFP8_E4M3, ag.MXFP8_E5M2),
    "nvfp4": QuantConfig(ag.NVFP4, ag.NVFP4, ag.NVFP4),
}
"""altgrad_jax's candidates: per-tensor FP8 (the default config) and two block formats."""


def dense_factory(candidate: str) -> Callable[..., nn.Dense]:
    """``nn.Dense`` with the candidate's dot_general."""
    if candidate == "plain":
        return nn.Dense
    if candidate == "fp8_ops":
        return functools.partial(nn.Dense, dot_general_cls=fp8_ops.Fp8DotGeneralOp)
    dot_general = functools.partial(QuantDotGeneral, config=CONFIGS[candidate])
    return functools.partial(nn.Dense, dot_general_cls=dot_general)


class MLP(nn.Module):
    dense: Callable[..., nn.Dense]
    width: int
    depth: int

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth - 1):
            x = nn.relu(self.dense(self.width)(x))
        return self.dense(self.width)(x)


class TransformerBlock(nn.Module):
    dense: Callable[..., nn.Dense]
    heads: int
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x):
        batch, length, width = x.shape
        head_dim = width // self.heads
        h = nn.LayerNorm()(x)
        q, k, v = (
            self.dense(width, name=n)(h).reshape(batch, length, self.heads, head_dim)
            for n in ("query", "key", "value")
        )
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
        causal = jnp.tril(jnp.ones((length, length), bool))
        weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
        x = x + self.dense(width, name="attn_out")(attended)
        h = nn.LayerNorm()(x)
        h = nn.gelu(self.dense(self.mlp_ratio * width, name="mlp_in")(h))
        return x + self.dense(width, name="mlp_out")(h)


def make_step(model: nn.Module, candidate: str):
    """A jitted SGD step ``(variables, x, y) -> (variables, loss)`` for the candidate."""

    def mse(out, y):
        return jnp.mean((out - y) ** 2)

    if candidate in CONFIGS:

        def loss_fn(params, state, x, y):
            out, updates = model.apply(
                {"params": params, QUANT_STATE: state}, x, mutable=[QUANT_STATE]
            )
            return mse(out, y), updates[QUANT_STATE]

        def step(variables, x, y):
            loss, grads, state = quant_value_and_grad(loss_fn)(
                variables["params"], variables.get(QUANT_STATE, {}), x, y
            )
            params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, variables["params"], grads)
            if QUANT_STATE not in variables:  # block formats keep no amax histories
                return {"params": params}, loss
            return {"params": params, QUANT_STATE: state}, loss

    else:
        # fp8_ops keeps scales and histories in a collection that is differentiated and then
        # overwritten with its "gradient"; plain Flax has only params.
        def step(variables, x, y):
            loss, grads = jax.value_and_grad(lambda v: mse(model.apply(v, x), y))(variables)
            params = jax.tree.map(
                lambda p, g: p - LEARNING_RATE * g, variables["params"], grads["params"]
            )
            return {**grads, "params": params}, loss

    return jax.jit(step)


def benchmark(name: str, build: Callable[[str], nn.Module], x, y, reps: int) -> None:
    candidates = ["plain", *CONFIGS] + (["fp8_ops"] if fp8_ops is not None else [])
    steps, states, memory, traffic = {}, {}, {}, {}
    for candidate in candidates:
        model = build(candidate)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            variables = model.init(jax.random.key(0), x)
        step = make_step(model, candidate)
        compiled = step.lower(variables, x, y).compile()
        analysis = compiled.memory_analysis()
        if analysis is not None:
            memory[candidate] = (
                analysis.temp_size_in_bytes
                + analysis.argument_size_in_bytes
                + analysis.output_size_in_bytes
                - analysis.alias_size_in_bytes
            )
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        if cost and "bytes accessed" in cost:
            traffic[candidate] = cost["bytes accessed"]
        states[candidate], loss = compiled(variables, x, y)  # warm-up
        loss.block_until_ready()
        steps[candidate] = compiled

    times: dict[str, list[float]] = {c: [] for c in candidates}
    for rep in range(reps):
        order = candidates[rep % len(candidates) :] + candidates[: rep % len(candidates)]
        for candidate in order:
            start = time.perf_counter()
            states[candidate], loss = steps[candidate](states[candidate], x, y)
            loss.block_until_ready()
            times[candidate].append(time.perf_counter() - start)

    median = {c: statistics.median(t) for c, t in times.items()}
    print(f"\n{name}  ({reps} interleaved repetitions, median step time)")
    for candidate in candidates:
        mem = memory.get(candidate)
        mem_text = f"{mem / 2**20:8.1f} MiB" if mem is not None else "    n/a"
        moved = traffic.get(candidate)
        moved_text = f"{moved / 2**20:8.1f} MiB" if moved is not None else "    n/a"
        print(
            f"  {candidate:8s} {median[candidate] * 1e3:9.2f} ms   peak {mem_text}"
            f"   bytes accessed {moved_text}"
        )
    print(f"  ours / plain   = {median['ours'] / median['plain']:.3f}")
    for blocks in ("mxfp8", "nvfp4"):
        print(
            f"  {blocks} / plain  = {median[blocks] / median['plain']:.3f}   "
            f"{blocks} / ours (per-tensor FP8) = {median[blocks] / median['ours']:.3f}"
        )
    if "fp8_ops" in median:
        print(f"  ours / fp8_ops = {median['ours'] / median['fp8_ops']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per candidate")
    args = parser.parse_args()
    reps = args.reps or (3 if args.quick else 15)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; fp8_ops: {fp8_ops is not None}")

    width, batch = (256, 64) if args.quick else (1024, 256)
    keys = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(keys[0], (batch, width))
    y = jax.random.normal(keys[1], (batch, width))
    benchmark(
        f"MLP 4 x {width}, batch {batch}",
        lambda c: MLP(dense_factory(c), width, 4),
        x,
        y,
        reps,
    )

    shape = (2, 64, 128) if args.quick else (8, 128, 256)
    x = jax.random.normal(keys[2], shape)
    y = jax.random.normal(keys[3], shape)
    benchmark(
        f"Transformer block, batch x length x width = {' x '.join(map(str, shape))}, 4 heads",
        lambda c: TransformerBlock(dense_factory(c), heads=4),
        x,
        y,
        reps,
    )


if __name__ == "__main__":
    main()
