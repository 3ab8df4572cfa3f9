"""Block formats in a quantized matmul: every GEMM of training blocks along its own axes."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from references import count_compiles

import altgrad_jax as ag
from altgrad_jax import linen as qlinen
from altgrad_jax import nnx as qnnx
from altgrad_jax import quant_dot as qd
from altgrad_jax.config import QuantConfig, TensorQuant
from altgrad_jax.quant_dot import QuantStats

X = jax.random.normal(jax.random.key(0), (48, 64)) * jnp.exp2(
    jax.random.randint(jax.random.key(1), (48, 1), -6, 6)
)
DY = jax.random.normal(jax.random.key(2), (48, 40)) * 3


def _q(x, fmt, axis):
    return ag.quantize(x, fmt, axis=axis)


@pytest.mark.parametrize(
    ("forward", "backward"),
    [(ag.MXFP8_E4M3, ag.MXFP8_E5M2), (ag.MXFP4, ag.MXFP4), (ag.NVFP4, "E5M2")],
    ids=["mxfp8", "mxfp4", "nvfp4-fwd"],
)
def test_dense_quantizes_each_gemm_along_its_own_axes(forward, backward):
    config = QuantConfig(forward, forward, backward)
    layer = qlinen.QuantDense(40, config=config)
    variables = layer.init(jax.random.key(3), X)
    w, b = variables["params"]["kernel"], variables["params"]["bias"]

    def loss(params, x):
        return jnp.sum(layer.apply({"params": params}, x) * DY)

    y = layer.apply(variables, X)
    np.testing.assert_array_equal(y, _q(X, forward, 1) @ _q(w, forward, 0) + b)
    grads, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], X)
    if isinstance(backward, ag.BlockFormat):
        dy_n, dy_t = _q(DY, backward, 1), _q(DY, backward, 0)
    else:
        scale = ag.compute_scale(jnp.max(jnp.abs(DY)), backward)
        dy_n = dy_t = ag.quantize(DY, backward, scale)
    # Weight gradient: x and dY along the tokens; input gradient: dY and W along N.
    np.testing.assert_array_equal(grads["kernel"], _q(X, forward, 0).T @ dy_t)
    np.testing.assert_array_equal(dx, dy_n @ _q(w, forward, 1).T)
    np.testing.assert_array_equal(grads["bias"], DY.sum(0))


def test_2d_weight_tiles_make_one_copy_and_einsum_and_nnx_agree():
    tiles = TensorQuant(ag.FP8_E4M3_128X128.replace(block_size=(16, 16)))
    config = QuantConfig(TensorQuant(ag.FP8_E4M3_1X128.replace(block_size=16)), tiles, None)
    linen = qlinen.QuantEinsum((64, 40), "bk,kn->bn", use_bias=False, config=config)
    params = linen.init(jax.random.key(3), X)["params"]
    w = params["kernel"]
    q_w = ag.quantize(w, tiles.format)  # the same tensor for the forward and dX GEMMs

    def loss(params, x):
        return jnp.sum(linen.apply({"params": params}, x) * DY)

    grads, dx = jax.grad(loss, argnums=(0, 1))(params, X)
    act = config.inputs.format
    np.testing.assert_array_equal(linen.apply({"params": params}, X), _q(X, act, 1) @ q_w)
    np.testing.assert_array_equal(dx, DY @ q_w.T)
    # The weight gradient is the einsum's own transpose on x blocked along the tokens.
    _, wgrad = jax.vjp(lambda k: jnp.einsum("bk,kn->bn", _q(X, act, 0), k), w)
    np.testing.assert_array_equal(grads["kernel"], wgrad(DY)[0])
    model = qnnx.QuantEinsum("bk,kn->bn", (64, 40), config=config, rngs=nnx.Rngs(0))
    model.kernel.set_value(w)
    np.testing.assert_array_equal(model(X), linen.apply({"params": params}, X))


def test_dense_general_merges_several_contraction_axes_into_one_block_axis():
    config = QuantConfig(ag.MXFP8_E4M3, ag.MXFP8_E4M3, None)
    x = X.reshape(48, 2, 32)
    layer = nn.DenseGeneral(40, axis=(-2, -1), dot_general_cls=qlinen.quant_dot_general_cls(config))
    variables = layer.init(jax.random.key(3), x)
    w = variables["params"]["kernel"]
    expected = _q(X, ag.MXFP8_E4M3, 1) @ _q(w.reshape(64, 40), ag.MXFP8_E4M3, 0)
    np.testing.assert_array_equal(layer.apply(variables, x), expected + variables["params"]["bias"])


def test_block_statistics_count_saturated_and_flushed_blocks():
    floor = ag.MXFP4.replace(scale_rule="floor")
    config = QuantConfig(floor, None, floor, stats=True)
    x = jnp.ones((2, 64)).at[0, 0].set(7.0).at[1, 32:].set(1e-30)
    layer = qlinen.QuantDense(4, config=config)
    variables = layer.init(jax.random.key(0), x)
    variables = {k: v for k, v in variables.items() if k != qlinen.QUANT_STATS}
    _, out = layer.apply(variables, x, mutable=[qlinen.QUANT_STATS])
    (stats,) = out[qlinen.QUANT_STATS]["dot_general"]["inputs"]
    # Four blocks of 32 along K; 7 saturates E2M1 (max 6) under floor; no block flushes.
    assert int(stats.count("blocks")) == 4
    assert int(stats.count("saturated_blocks")) == 1
    assert float(stats.saturated_blocks) == 0.25
    assert isinstance(stats, QuantStats)


def test_block_formats_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="current scaling"):
        TensorQuant(ag.MXFP4, scaling="delayed")
    config = QuantConfig(ag.MXFP4, ag.MXFP4, TensorQuant("E5M2", scaling="delayed"))
    layer = qlinen.QuantDense(4, config=config)
    with pytest.raises(ValueError, match="output-gradient scaling 'delayed'"):
        layer.init(jax.random.key(0), jnp.ones((2, 32)))
    with pytest.raises(ValueError, match="ndim"):
        qd.ContractionAxes.of_einsum("...k,kn->...n")


def test_random_hadamard_is_orthogonal_and_leaves_the_unquantized_gemm_unchanged():
    rotation = np.asarray(qd.random_hadamard(16, jax.random.key(0)), np.float64)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(16), atol=1e-7)
    assert sorted(set(np.abs(rotation).ravel().tolist())) == [0.25]
    config = QuantConfig(None, None, None, hadamard=16)
    layer = qlinen.QuantDense(40, config=config)
    variables = layer.init({"params": jax.random.key(3), "quant": jax.random.key(4)}, X)

    def loss(params, rotated):
        cfg = config if rotated else QuantConfig(None, None, None)
        out = qlinen.QuantDense(40, config=cfg).apply(
            {"params": params}, X, rngs={"quant": jax.random.key(5)}
        )
        return jnp.sum(out * DY)

    rotated = jax.grad(loss)(variables["params"], True)
    plain = jax.grad(loss)(variables["params"], False)
    np.testing.assert_allclose(rotated["kernel"], plain["kernel"], rtol=2e-6, atol=1e-4)
    mx = qlinen.QuantDense(4, config=QuantConfig(None, None, ag.MXFP4, hadamard=16))
    rngs = {"params": jax.random.key(0), "quant": jax.random.key(1)}
    x = jnp.ones((10, 32))
    params = mx.init(rngs, x)["params"]
    with pytest.raises(ValueError, match="multiple of 16"):
        jax.grad(lambda p: jnp.sum(mx.apply({"params": p}, x, rngs=rngs)))(params)


def test_traced_element_formats_give_the_static_bits_in_one_compiled_train_step():
    """Integer data: every quantized value is an integer and every GEMM is exact in float32, so
    the two programs may sum in any order and still agree bit for bit."""
    family = (ag.MXFP8_E4M3, ag.MXFP6_E2M3, ag.MXFP4)
    rng = np.random.default_rng(0)
    x, dy = (rng.integers(-16, 17, shape).astype(np.float32) for shape in ((48, 64), (48, 40)))
    params = {"kernel": rng.integers(-16, 17, (64, 40)).astype(np.float32), "bias": dy[0]}

    def step(params, fmt):
        layer = qlinen.QuantDense(40, config=QuantConfig(fmt, fmt, fmt))

        def loss(p, x):
            return jnp.sum(layer.apply({"params": p}, x) * dy)

        return layer.apply({"params": params}, x), jax.grad(loss, argnums=(0, 1))(params, x)

    traced = count_compiles(step)
    run = jax.jit(traced)
    for fmt in family:
        got = run(params, fmt.as_arrays(within=family))
        expected = jax.jit(step, static_argnums=1)(params, fmt)
        jax.tree.map(np.testing.assert_array_equal, got, expected)
    assert traced.traces == 1


def _integers(rng, shape, scale_axes):
    """Integers in [-16, 16] times a power of two per index of ``scale_axes``: every quantized
    value is a multiple of a power of two and every GEMM is exact in float32."""
    spread = rng.integers(-3, 4, [shape[a] if a in scale_axes else 1 for a in range(len(shape))])
    return (rng.integers(-16, 17, shape) * np.exp2(spread)).astype(np.float32)


def test_batched_einsum_blocks_each_batch_element_along_each_gemms_own_axes():
    """Attention's scores ``q k^T`` with batch and heads: q and k along d forward; dS along k
    with k along its length for dq; dS and q along the query length for dk."""
    rng = np.random.default_rng(5)
    q, k = (_integers(rng, (2, n, 3, 64), (0, 2)) for n in (40, 36))
    dy = _integers(rng, (2, 3, 40, 36), (0, 1))
    subscripts = "bqhd,bkhd->bhqk"
    config = QuantConfig(ag.MXFP4, ag.MXFP4, ag.MXFP4)
    axes = qd.ContractionAxes.of_einsum(subscripts, 4, 4)
    assert axes == qd.ContractionAxes((3,), (3,), (2,), (3,), (0, 2), (0, 2), (0, 1))

    def scores(a, b):
        contract = functools.partial(jnp.einsum, subscripts)
        state = qd.QuantDotState.create(config)
        return qd.quantized_contract(contract, a, b, config, state, None, axes)[0]

    y, vjp = jax.jit(lambda a, b: jax.vjp(scores, a, b))(q, k)
    dq, dk = jax.jit(vjp)(dy)
    np.testing.assert_array_equal(y, jnp.einsum(subscripts, _q(q, ag.MXFP4, 3), _q(k, ag.MXFP4, 3)))
    dq_expected = jnp.einsum("bhqk,bkhd->bqhd", _q(dy, ag.MXFP4, 3), _q(k, ag.MXFP4, 1))
    dk_expected = jnp.einsum("bhqk,bqhd->bkhd", _q(dy, ag.MXFP4, 2), _q(q, ag.MXFP4, 1))
    np.testing.assert_array_equal(dq, dq_expected)
    np.testing.assert_array_equal(dk, dk_expected)
    # dot_general batch dimensions, and 2-D tiles that never span two batch elements.
    batched = qd.ContractionAxes.of_dot_general(3, 3, (((2,), (1,)), ((0,), (0,))))
    assert batched == qd.ContractionAxes((2,), (1,), (1,), (2,), (0,), (0,), (0,))
    tiles = TensorQuant(ag.MXFP8_E4M3.replace(block_size=(8, 16)))
    x = q[:, :16, 0, :]
    per_batch = jnp.stack([ag.quantize(x[i], tiles.format) for i in range(2)])
    np.testing.assert_array_equal(qd.quantize_along(x, tiles, (2,), None, (0,)), per_batch)


def test_embedding_lookup_and_attend_block_the_table_along_its_features():
    config = QuantConfig(ag.MXFP4, ag.MXFP4, ag.MXFP8_E5M2)
    ids = jnp.array([[1, 2, 3], [4, 1, 49]])
    linen = qlinen.QuantEmbed(50, 64, config=config)
    params = linen.init(jax.random.key(0), ids)["params"]
    table = params["embedding"]
    rows = _q(table, ag.MXFP4, 1)
    dy = jnp.asarray(_integers(np.random.default_rng(6), (2, 3, 64), (0,)))

    def loss(p):
        return jnp.sum(linen.apply({"params": p}, ids) * dy)

    np.testing.assert_array_equal(linen.apply({"params": params}, ids), rows[ids])
    # The table's gradient adds rows of dY, blocked along the tokens (id 1 is read twice).
    dy_t = _q(dy.reshape(6, 64), ag.MXFP8_E5M2, 0)
    expected = jnp.zeros_like(table).at[ids.reshape(-1)].add(dy_t)
    np.testing.assert_array_equal(jax.jit(jax.grad(loss))(params)["embedding"], expected)
    query = jax.random.normal(jax.random.key(1), (2, 3, 64))
    attend = linen.apply({"params": params}, query, method="attend")
    np.testing.assert_array_equal(attend, _q(query, ag.MXFP4, -1) @ rows.T)
    model = qnnx.QuantEmbed(50, 64, config=config, rngs=nnx.Rngs(0))
    model.embedding.set_value(table)
    np.testing.assert_array_equal(model(ids), rows[ids])
    np.testing.assert_array_equal(model.attend(query), attend)


def test_flax_attention_runs_its_matmuls_in_block_formats():
    config = QuantConfig(ag.MXFP8_E4M3, ag.MXFP8_E4M3, ag.MXFP8_E5M2)
    x = jax.random.normal(jax.random.key(2), (2, 40, 64))
    layers = {
        fn: nn.MultiHeadDotProductAttention(2, qkv_features=64, attention_fn=fn)
        for fn in (qlinen.QuantAttention(config, parent=None), nn.dot_product_attention)
    }
    params = next(iter(layers.values())).init(jax.random.key(3), x)["params"]

    @jax.jit
    def outputs(params):
        return [
            jax.value_and_grad(lambda p, m=m: jnp.sum(m.apply({"params": p}, x) ** 2))(params)
            for m in layers.values()
        ]

    (quantized, grads), (plain, _) = outputs(params)
    assert np.isfinite(float(quantized)) and quantized != plain
    assert abs(float(quantized) / float(plain) - 1) < 0.1
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
