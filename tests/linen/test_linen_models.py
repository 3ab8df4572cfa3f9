"""Ordinary Linen models (an MNIST-style CNN, a decoder-only transformer) quantized by rules."""

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import altgrad_jax as ag
from altgrad_jax import linen as ql
from altgrad_jax.config import QuantConfig, TensorQuant
from altgrad_jax.optim import low_precision_storage, monitor_stall
from altgrad_jax.rules import PathRules

CFG = QuantConfig()
DELAYED = QuantConfig(
    inputs="E4M3", weights="E4M3", output_grads=TensorQuant("E5M2", scaling="delayed")
)


class CNN(nn.Module):
    """Flax's MNIST example, smaller."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(features=4, kernel_size=(3, 3))(x))
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.relu(nn.Conv(features=8, kernel_size=(3, 3))(x))
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(features=16)(x))
        return nn.Dense(features=10)(x)


class Decoder(nn.Module):
    """A decoder-only transformer: tied embedding, causal self-attention, MLP."""

    vocab: int = 16
    width: int = 8

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(self.vocab, self.width, name="embed")
        x = embed(ids)
        y = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(
            y, mask=nn.make_causal_mask(ids)
        )
        y = nn.LayerNorm()(x)
        x = x + nn.Dense(self.width, name="mlp_out")(nn.gelu(nn.Dense(16, name="mlp_in")(y)))
        return embed.attend(x)


IMAGES = jax.random.normal(jax.random.key(0), (2, 12, 12, 1))
IDS = jax.random.randint(jax.random.key(1), (2, 6), 0, 16)


def _q(x, fmt="E4M3"):
    """Current scaling with a fresh history: the scale of this tensor's own amax."""
    return ag.quantize(x, fmt, ag.compute_scale(jnp.max(jnp.abs(x)), fmt))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"strides": 2, "padding": "VALID"},
        {"kernel_dilation": 2, "feature_group_count": 2, "padding": "CIRCULAR"},
    ],
    ids=["same", "strided", "dilated-grouped"],
)
def test_conv_equals_handwritten(options):
    x = jax.random.normal(jax.random.key(2), (2, 9, 9, 4)) * 3
    conv = nn.Conv(6, (3, 3), **options)
    params = conv.init(jax.random.key(3), x)["params"]
    params["bias"] = jnp.linspace(-1, 1, 6)
    with ql.quant_rules(PathRules(default=CFG)):
        y, _ = conv.apply({"params": params}, x, mutable=[ql.QUANT_STATE])
    hand = conv.apply({"params": {"kernel": _q(params["kernel"]), "bias": params["bias"]}}, _q(x))
    np.testing.assert_array_equal(y, hand)
    own = ql.QuantConv(6, (3, 3), config=CFG, **options)
    own_y, _ = own.apply({"params": params}, x, mutable=[ql.QUANT_STATE])
    np.testing.assert_array_equal(own_y, hand)


def test_embedding_rows_and_attend_use_the_quantized_table():
    embed = nn.Embed(16, 8)
    params = embed.init(jax.random.key(0), IDS)["params"]
    table = params["embedding"] * 40
    variables = {"params": {"embedding": table}}
    model = ql.quantize_model(embed, PathRules(default=CFG))
    rows, state = model.apply(variables, IDS, mutable=[ql.QUANT_STATE])
    np.testing.assert_array_equal(rows, _q(table)[IDS])
    # The ids are never quantized: a lookup leaves the inputs history untouched.
    assert int(state[ql.QUANT_STATE]["embed_op"]["inputs"].count) == 0
    query = jax.random.normal(jax.random.key(5), (3, 8))
    logits, _ = model.apply({**variables, **state}, query, method="attend", mutable=True)
    np.testing.assert_array_equal(logits, _q(query) @ _q(table).T)


def test_attention_scores_come_from_quantized_q_and_k():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 5, 2, 4)) * 4 for i in range(3))
    mask = nn.make_causal_mask(jnp.ones((2, 5)))
    attn = ql.QuantAttention(CFG)
    out, _ = attn.init_with_output(jax.random.key(0), q, k, v, mask=mask)
    qs = q / jnp.sqrt(4.0)
    scores = jnp.einsum("...qhd,...khd->...hqk", _q(qs), _q(k))
    probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min))
    hand = jnp.einsum("...hqk,...khd->...qhd", _q(probs), _q(v))
    np.testing.assert_allclose(out, hand, rtol=1e-6, atol=1e-6)


def test_rule_none_is_bit_identical_to_plain_flax():
    for model, x in ((CNN(), IMAGES), (Decoder(), IDS)):
        plain = model.init(jax.random.key(0), x)
        quantized = ql.quantize_model(model, PathRules(default=None), attention=True)
        variables = quantized.init(jax.random.key(0), x)
        assert set(variables) == {"params"}
        jax.tree.map(np.testing.assert_array_equal, variables, plain)
        np.testing.assert_array_equal(quantized.apply(variables, x), model.apply(plain, x))
    # Only the MLP quantized: the attention output is still plain Flax, bit for bit.
    rules = PathRules((("mlp", CFG),))
    model = ql.quantize_model(Decoder(), rules)
    variables = model.init(jax.random.key(0), IDS)
    pick = lambda m, _: m.name == "attn"  # noqa: E731
    _, plain = Decoder().apply(variables, IDS, capture_intermediates=pick)
    _, ours = model.apply(variables, IDS, capture_intermediates=pick, mutable=True)
    jax.tree.map(np.testing.assert_array_equal, plain["intermediates"], ours["intermediates"])


def _optimizer():
    return monitor_stall(optax.chain(optax.adam(1e-2), low_precision_storage("BF16")), "BF16")


def _trainer(model):
    traces = []

    def loss_fn(params, quant_state, ids):
        logits, state = model.apply(
            {"params": params, ql.QUANT_STATE: quant_state}, ids, mutable=[ql.QUANT_STATE]
        )
        targets = jnp.roll(ids, -1, axis=1)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return loss, state[ql.QUANT_STATE]

    @jax.jit
    def step(params, quant_state, opt_state, ids):
        traces.append(1)
        loss, grads, quant_state = ql.quant_value_and_grad(loss_fn)(params, quant_state, ids)
        updates, opt_state = _optimizer().update(grads, opt_state, params)
        return optax.apply_updates(params, updates), quant_state, opt_state, loss

    return step, traces


@pytest.mark.slow
def test_decoder_trains_compiles_once_reports_and_resumes_from_a_checkpoint():
    rules = PathRules((("mlp_out", None), ("embed", QuantConfig.uniform("E5M2", "E5M2"))), DELAYED)
    model = ql.quantize_model(Decoder(), rules, attention=True)
    variables = model.init(jax.random.key(0), IDS)
    params, quant_state = variables["params"], variables[ql.QUANT_STATE]
    opt_state = _optimizer().init(params)
    step, traces = _trainer(model)
    batches = [jax.random.randint(jax.random.key(i), (2, 6), 0, 16) for i in range(5)]
    losses = []
    for i, ids in enumerate(batches[:3]):
        params, quant_state, opt_state, loss = step(params, quant_state, opt_state, ids)
        losses.append(loss)
        if i == 1:
            saved = flax.serialization.to_bytes((params, quant_state, opt_state))
    assert len(traces) == 1 and all(np.isfinite(losses))
    history = quant_state["attn"]["attention_fn"]["scores"]["output_grads"]
    assert int(history.count) == 3 and float(history.history[0]) > 0

    restored = flax.serialization.from_bytes((params, quant_state, opt_state), saved)
    resumed = step(*restored, batches[2])
    jax.tree.map(np.testing.assert_array_equal, resumed[:3], (params, quant_state, opt_state))

    report = ql.quantization_report(model, IDS)
    kinds = {(layer.path, layer.kind): layer for layer in report.layers}
    assert kinds[("mlp_out", "dense")].reason == "rule gave None"
    assert kinds[("mlp_in", "dense")].config == DELAYED
    assert kinds[("attn", "attention")].config == DELAYED
    assert kinds[("attn/query", "dense_general")].config == DELAYED
    assert kinds[("embed", "embed")].config == ql.embed.lookup_config(rules("embed"))
    assert kinds[("embed", "embed.attend")].config == rules("embed")
    assert "rule gave None" in str(report) and "attention" in str(report)


def test_cnn_trains_and_reports_every_conv():
    model = ql.quantize_model(CNN(), PathRules((("Dense_1", None),), CFG))
    report = ql.quantization_report(model, IMAGES)
    assert [(layer.path, layer.kind, layer.quantized) for layer in report.layers] == [
        ("Conv_0", "conv", True),
        ("Conv_1", "conv", True),
        ("Dense_0", "dense", True),
        ("Dense_1", "dense", False),
    ]
    assert dict(report["Conv_0"].shapes)["kernel"] == (3, 3, 1, 4)
    variables = model.init(jax.random.key(0), IMAGES)
    assert set(variables[ql.QUANT_STATE]["Conv_0"]) == {"conv_general_dilated"}

    def loss_fn(params, quant_state):
        y, state = model.apply(
            {"params": params, ql.QUANT_STATE: quant_state}, IMAGES, mutable=[ql.QUANT_STATE]
        )
        return jnp.mean(y**2), state[ql.QUANT_STATE]

    loss, grads, _ = jax.jit(ql.quant_value_and_grad(loss_fn))(
        variables["params"], variables[ql.QUANT_STATE]
    )
    assert np.isfinite(loss) and float(jnp.abs(grads["Conv_0"]["kernel"]).sum()) > 0


def test_quantize_model_is_its_own_jit_key_and_the_context_is_not():
    conv = nn.Conv(4, (3, 3))
    variables = conv.init(jax.random.key(0), IMAGES)
    quantized = ql.quantize_model(conv, PathRules(default=CFG))
    assert quantized != conv
    apply = jax.jit(lambda model, v: model.apply(v, IMAGES, mutable=True)[0], static_argnums=0)
    plain_y, quant_y = apply(conv, variables), apply(quantized, variables)
    assert not np.array_equal(plain_y, quant_y)
    np.testing.assert_array_equal(plain_y, conv.apply(variables, IMAGES))


class Odd(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.ConvTranspose(2, (3, 3), name="up")(nn.Dense(3, name="proj")(x))


def test_a_rule_selecting_an_unsupported_layer_raises():
    with pytest.raises(ValueError, match=r"'up'.*ConvTranspose.*cannot quantize"):
        ql.quantize_model(Odd(), PathRules(default=CFG)).init(jax.random.key(0), IMAGES)
    custom = nn.Dense(3, dot_general_cls=lambda: jax.lax.dot_general)
    with pytest.raises(ValueError, match="its own"), ql.quant_rules(PathRules(default=CFG)):
        custom.init(jax.random.key(0), IMAGES)
    # Giving it None runs it in full precision, and the report says so.
    rules = PathRules((("up", None),), CFG)
    report = ql.quantization_report(Odd(), IMAGES, rules=rules)
    assert report["up"].reason == "rule gave None" and report["proj"].quantized


def test_patterns_matching_no_layer_warn_and_are_reported():
    rules = PathRules((("nothing_here", CFG), ("Conv", CFG)))
    with pytest.warns(ql.UnmatchedRuleWarning, match="nothing_here"):
        report = ql.quantization_report(CNN(), IMAGES, rules=rules)
    assert report.unmatched_patterns == ("nothing_here",)
    assert report["Dense_0"].reason == "no rule matched"
    assert "matched no layer" in str(report)


@pytest.mark.slow
def test_quantized_attention_keeps_flax_decode_cache_and_dropout():
    mha = nn.MultiHeadDotProductAttention(num_heads=2, dropout_rate=0.5, decode=True)
    model = ql.quantize_model(mha, PathRules(default=CFG), attention=True)
    x = jax.random.normal(jax.random.key(0), (2, 4, 8))
    variables = model.init(jax.random.key(1), x, deterministic=True)
    cache, quant_state = variables["cache"], variables[ql.QUANT_STATE]
    outputs = []
    for t in range(4):
        y, updates = model.apply(
            {"params": variables["params"], "cache": cache, ql.QUANT_STATE: quant_state},
            x[:, t : t + 1],
            deterministic=False,
            rngs={"dropout": jax.random.key(t)},
            mutable=["cache", ql.QUANT_STATE],
        )
        cache, quant_state = updates["cache"], updates[ql.QUANT_STATE]
        outputs.append(y)
    assert int(cache["cache_index"]) == 4 and all(np.isfinite(y).all() for y in outputs)
    assert int(quant_state["attention_fn"]["scores"]["inputs"].count) == 4


@pytest.mark.slow
def test_conv_with_block_formats_blocks_along_the_input_features():
    block = QuantConfig(inputs="MXFP8_E4M3", weights="MXFP8_E4M3", output_grads="MXFP8_E5M2")
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 40)) * 3
    conv = ql.QuantConv(8, (3, 3), config=block)
    variables = conv.init(jax.random.key(3), x)
    y, _ = conv.apply(variables, x, mutable=True)
    params = variables["params"]
    hand_params = {
        "kernel": ag.quantize(params["kernel"], ag.MXFP8_E4M3, axis=2),
        "bias": params["bias"],
    }
    hand = nn.Conv(8, (3, 3)).apply({"params": hand_params}, ag.quantize(x, ag.MXFP8_E4M3, axis=-1))
    np.testing.assert_array_equal(y, hand)
    grads = jax.grad(lambda p: jnp.sum(conv.apply({"params": p}, x, mutable=True)[0] ** 2))(params)
    assert np.isfinite(grads["kernel"]).all() and float(jnp.abs(grads["kernel"]).sum()) > 0
