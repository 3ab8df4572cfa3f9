"""Ordinary NNX models (a CNN, a decoder-only transformer) quantized by quantize_model."""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import altgrad_jax as ag
from altgrad_jax import nnx as qnnx
from altgrad_jax.config import QuantConfig, TensorQuant
from altgrad_jax.optim import low_precision_storage, monitor_stall
from altgrad_jax.rules import PathRules

CFG = QuantConfig()
DELAYED = QuantConfig(
    inputs="E4M3", weights="E4M3", output_grads=TensorQuant("E5M2", scaling="delayed")
)


class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(4, 8, kernel_size=(3, 3), rngs=rngs)
        self.linear1 = nnx.Linear(8 * 3 * 3, 16, rngs=rngs)
        self.linear2 = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.avg_pool(nnx.relu(self.conv1(x)), window_shape=(2, 2), strides=(2, 2))
        x = nnx.avg_pool(nnx.relu(self.conv2(x)), window_shape=(2, 2), strides=(2, 2))
        return self.linear2(nnx.relu(self.linear1(x.reshape((x.shape[0], -1)))))


class Decoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, vocab: int = 16, width: int = 8):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, width, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.mlp_in = nnx.Linear(width, 16, rngs=rngs)
        self.mlp_out = nnx.Linear(16, width, rngs=rngs)

    def __call__(self, ids):
        x = self.embed(ids)
        x = x + self.attn(self.norm1(x), mask=nnx.make_causal_mask(ids))
        x = x + self.mlp_out(nnx.gelu(self.mlp_in(self.norm2(x))))
        return self.embed.attend(x)


IMAGES = jax.random.normal(jax.random.key(0), (2, 12, 12, 1))
IDS = jax.random.randint(jax.random.key(1), (2, 6), 0, 16)


def _q(x, fmt="E4M3"):
    return ag.quantize(x, fmt, ag.compute_scale(jnp.max(jnp.abs(x)), fmt))


def test_conv_equals_handwritten():
    x = jax.random.normal(jax.random.key(2), (2, 9, 9, 4)) * 3
    options = {"strides": 2, "kernel_dilation": 1, "feature_group_count": 2, "padding": "VALID"}
    conv = nnx.Conv(4, 6, (3, 3), rngs=nnx.Rngs(0), **options)
    conv.bias.set_value(jnp.linspace(-1, 1, 6))
    quantized = qnnx.quantize_model(conv, PathRules(default=CFG))
    hand = nnx.clone(conv)
    hand.kernel.set_value(_q(conv.kernel[...]))
    np.testing.assert_array_equal(quantized(x), hand(_q(x)))
    own = qnnx.QuantConv(4, 6, (3, 3), config=CFG, rngs=nnx.Rngs(0), **options)
    own.bias.set_value(conv.bias[...])
    np.testing.assert_array_equal(own(x), hand(_q(x)))


def test_embedding_and_attention_equal_handwritten():
    embed = nnx.Embed(16, 8, rngs=nnx.Rngs(0))
    embed.embedding.set_value(embed.embedding[...] * 40)
    quantized = qnnx.quantize_model(embed, PathRules(default=CFG))
    assert isinstance(quantized, qnnx.QuantEmbed) and not isinstance(embed, qnnx.QuantEmbed)
    table = embed.embedding[...]
    np.testing.assert_array_equal(quantized(IDS), _q(table)[IDS])
    query = jax.random.normal(jax.random.key(5), (3, 8))
    np.testing.assert_array_equal(quantized.attend(query), _q(query) @ _q(table).T)

    q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, 2, 4)) * 4 for i in range(3))
    out = qnnx.QuantAttention(CFG)(q, k, v, is_causal=True)
    scores = jnp.einsum("...qhd,...khd->...hqk", _q(q / jnp.sqrt(4.0)), _q(k))
    causal = jnp.tril(jnp.ones((5, 5), bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, jnp.finfo(jnp.float32).min))
    hand = jnp.einsum("...hqk,...khd->...qhd", _q(probs), _q(v))
    np.testing.assert_allclose(out, hand, rtol=1e-6, atol=1e-6)


def test_rule_none_is_bit_identical_and_keeps_params():
    for model, x in ((CNN(nnx.Rngs(0)), IMAGES), (Decoder(nnx.Rngs(0)), IDS)):
        same = qnnx.quantize_model(model, PathRules(default=None), attention=True)
        np.testing.assert_array_equal(same(x), model(x))
        quantized = qnnx.quantize_model(model, PathRules(default=CFG), attention=True)
        plain_params = nnx.state(model, nnx.Param)
        jax.tree.map(np.testing.assert_array_equal, nnx.state(quantized, nnx.Param), plain_params)
        assert not nnx.state(model, qnnx.QuantState)  # the input model is unchanged


def test_linen_and_nnx_state_paths_match():
    quantized = qnnx.quantize_model(Decoder(nnx.Rngs(0)), PathRules(default=CFG), attention=True)
    paths = {
        "/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(quantized, qnnx.QuantState))
    }
    assert "attn/attention_fn/scores/inputs" in paths
    assert "embed/embed_op/weights" in paths
    assert "mlp_in/dot_general/inputs" in paths
    assert "attn/query/dot_general/weights" in paths


def _optimizer():
    return monitor_stall(optax.chain(optax.adam(1e-2), low_precision_storage("BF16")), "BF16")


@pytest.mark.slow
def test_decoder_trains_compiles_once_reports_and_resumes():
    rules = PathRules((("mlp_out", None), ("embed", QuantConfig.uniform("E5M2", "E5M2"))), DELAYED)
    model = qnnx.quantize_model(Decoder(nnx.Rngs(0)), rules, attention=True)
    # optax directly, on pure dicts (plain nnx.Optimizer cannot hold the stall monitor's state:
    # altgrad_jax.optim.GridOptimizer is the NNX wrapper for it; the CNN test uses nnx.Optimizer).
    tx = _optimizer()
    opt_state = tx.init(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    traces = []

    def loss_fn(model, ids):
        logits = model(ids)
        targets = jnp.roll(ids, -1, axis=1)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @nnx.jit
    def step(model, opt_state, ids):
        traces.append(1)
        loss, grads, _ = qnnx.quant_value_and_grad(loss_fn)(model, ids)
        state = nnx.state(model, nnx.Param)
        params = nnx.to_pure_dict(state)
        updates, opt_state = tx.update(nnx.to_pure_dict(grads), opt_state, params)
        nnx.replace_by_pure_dict(state, optax.apply_updates(params, updates))
        nnx.update(model, state)
        return loss, opt_state

    batches = [jax.random.randint(jax.random.key(i), (2, 6), 0, 16) for i in range(4)]
    for i, ids in enumerate(batches[:3]):
        loss, opt_state = step(model, opt_state, ids)
        assert np.isfinite(loss)
        if i == 1:
            graphdef, state = nnx.split(model)
            saved = flax.serialization.to_bytes((nnx.to_pure_dict(state), opt_state))
    assert len(traces) == 1
    history = model.attn.attention_fn.scores.output_grads.get_value()
    assert int(history.count) == 3 and float(history.history[0]) > 0

    pure, restored_opt = flax.serialization.from_bytes((nnx.to_pure_dict(state), opt_state), saved)
    nnx.replace_by_pure_dict(state, pure)
    model2 = nnx.merge(graphdef, state)
    _, opt_state2 = step(model2, restored_opt, batches[2])
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model2), nnx.state(model))
    jax.tree.map(np.testing.assert_array_equal, opt_state2, opt_state)

    with pytest.raises(RuntimeError, match="quant_value_and_grad"):
        nnx.grad(loss_fn)(model, batches[3])

    report = qnnx.quantization_report(model, rules, attention=True)
    assert report["mlp_out"].reason == "rule gave None"
    assert report["mlp_in"].config == DELAYED
    assert report["attn"].config == DELAYED
    assert report["attn/query"].config == DELAYED
    assert report["embed"].config == rules("embed")
    assert dict(report["embed"].shapes)["embedding"] == (16, 8)
    assert {layer.kind for layer in report.layers} == {
        "attention",
        "embed",
        "linear",
        "linear_general",
    }


def test_cnn_report_lists_every_layer():
    model = qnnx.quantize_model(CNN(nnx.Rngs(0)), PathRules((("linear2", None),), CFG))
    report = qnnx.quantization_report(model, PathRules((("linear2", None),), CFG))
    assert [(layer.path, layer.kind, layer.quantized) for layer in report.layers] == [
        ("conv1", "conv", True),
        ("conv2", "conv", True),
        ("linear1", "linear", True),
        ("linear2", "linear", False),
    ]
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads, _ = qnnx.quant_value_and_grad(lambda m: jnp.mean(m(IMAGES) ** 2))(model)
        optimizer.update(model, grads)
        return loss, grads

    before = model.conv1.kernel[...]
    loss, grads = step(model, optimizer)
    assert np.isfinite(loss) and float(jnp.abs(grads["conv1"]["kernel"][...]).sum()) > 0
    assert not np.array_equal(model.conv1.kernel[...], before)


class Odd(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(1, 3, rngs=rngs)
        self.up = nnx.ConvTranspose(3, 2, (3, 3), rngs=rngs)


def test_unsupported_layers_raise_and_unmatched_patterns_warn():
    with pytest.raises(ValueError, match=r"'up'.*ConvTranspose.*cannot quantize"):
        qnnx.quantize_model(Odd(nnx.Rngs(0)), PathRules(default=CFG))
    rules = PathRules((("up", None), ("nothing_here", CFG)), CFG)
    with pytest.warns(qnnx.UnmatchedRuleWarning, match="nothing_here"):
        model = qnnx.quantize_model(Odd(nnx.Rngs(0)), rules)
    report = qnnx.quantization_report(model, rules, warn=False)
    assert report["up"].reason == "rule gave None" and report["proj"].quantized
    assert report.unmatched_patterns == ("nothing_here",)
    plain = qnnx.quantization_report(Odd(nnx.Rngs(0)))
    assert {layer.reason for layer in plain.layers} == {"no rules given"}


@pytest.mark.slow
def test_linen_and_nnx_compute_the_same_numbers_and_states():
    """Conv, embedding (lookup + attend) and attention: one step of each framework agrees."""
    import flax.linen as nn

    from altgrad_jax import linen as ql

    x = jax.random.normal(jax.random.key(2), (2, 7, 7, 3)) * 3
    nnx_conv = qnnx.QuantConv(3, 4, (3, 3), strides=2, config=DELAYED, rngs=nnx.Rngs(0))
    linen_conv = ql.QuantConv(4, (3, 3), strides=2, config=DELAYED)
    nnx_embed = qnnx.QuantEmbed(16, 8, config=DELAYED, rngs=nnx.Rngs(0))
    linen_embed = ql.QuantEmbed(16, 8, config=DELAYED)
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, 2, 4)) for i in range(3))
    cases = [
        (nnx_conv, linen_conv, lambda m: m(x), lambda m: m(x)),
        (nnx_embed, linen_embed, lambda m: m.attend(m(IDS)), lambda m: m.attend(m(IDS))),
        (
            qnnx.QuantAttention(DELAYED),
            ql.QuantAttention(DELAYED),
            lambda m: m(q, k, v, is_causal=True),
            lambda m: m(q, k, v, mask=nn.make_causal_mask(jnp.ones((2, 5)))),
        ),
    ]
    for nnx_model, linen_model, nnx_call, linen_call in cases:
        variables = linen_model.init(jax.random.key(0), method=linen_call)
        params = nnx.to_pure_dict(nnx.state(nnx_model, nnx.Param))
        state = variables[ql.QUANT_STATE]

        def loss_fn(params, state, model=linen_model, call=linen_call):
            y, new = model.apply(
                {"params": params, ql.QUANT_STATE: state}, method=call, mutable=[ql.QUANT_STATE]
            )
            return jnp.sum(jnp.sin(y)), new[ql.QUANT_STATE]

        loss, grads, state = ql.quant_value_and_grad(loss_fn)(params, state)
        nnx_loss, nnx_grads, nnx_state = qnnx.quant_value_and_grad(
            lambda m, call=nnx_call: jnp.sum(jnp.sin(call(m)))
        )(nnx_model)
        np.testing.assert_array_equal(nnx_loss, loss)
        jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx_grads), grads)
        jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx_state), state)


def test_quantized_attention_keeps_flax_decode_cache_and_dropout():
    mha = nnx.MultiHeadAttention(2, 8, dropout_rate=0.5, decode=True, rngs=nnx.Rngs(0))
    model = qnnx.quantize_model(mha, PathRules(default=CFG), attention=True)
    x = jax.random.normal(jax.random.key(0), (2, 4, 8))
    model.init_cache(x.shape)
    for t in range(4):
        y = model(x[:, t : t + 1], deterministic=False, rngs=nnx.Rngs(dropout=t))
        assert np.isfinite(y).all()
    assert int(model.cache_index[...]) == 4
    assert int(model.attention_fn.scores.inputs.get_value().count) == 4
