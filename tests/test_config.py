"""QuantConfig / TensorQuant: defaults, name resolution, hashing, and construction-time errors."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import altgrad_jax as ag
from altgrad_jax.config import ROLES, QuantConfig, TensorQuant


def test_defaults_mirror_fp8_practice():
    config = QuantConfig()
    assert config.inputs.format is ag.E4M3
    assert config.weights.format is ag.E4M3
    assert config.output_grads.format is ag.E5M2
    for role in ROLES:
        tq = config.role(role)
        assert (tq.rounding, tq.scaling, tq.history_len, tq.margin) == (
            "nearest",
            "current",
            16,
            1.01,
        )
    assert config.stats is False
    assert not config.needs_rng


def test_names_resolve_and_equal_configs_hash_equal():
    a = QuantConfig(inputs="fp8_e4m3", weights=ag.E4M3, output_grads=TensorQuant("e5m2"))
    b = QuantConfig()
    assert a == b and hash(a) == hash(b)
    assert QuantConfig(inputs="E3M4") != b
    assert QuantConfig(inputs=None).inputs is None


def test_config_is_a_static_jit_argument():
    traces = []

    def f(x, config):
        traces.append(config)
        return x * config.role("inputs").format.max_value

    jitted = jax.jit(f, static_argnums=1)
    jitted(jnp.ones(2), QuantConfig())
    jitted(jnp.ones(2), QuantConfig(inputs="e4m3"))
    assert len(traces) == 1
    assert float(jitted(jnp.ones(()), QuantConfig(inputs="E5M2"))) == 57344.0
    assert len(traces) == 2


def test_uniform_sets_every_role():
    config = QuantConfig.uniform("E3M4", None, rounding="stochastic", history_len=4, stats=True)
    assert config.inputs == config.weights == TensorQuant("E3M4", "stochastic", history_len=4)
    assert config.output_grads is None
    assert config.stats and config.needs_rng


def test_flax_fp8_is_flax_recipe():
    config = QuantConfig.flax_fp8(stats=True)
    flax = TensorQuant("E4M3", scaling="flax", history_len=1024)
    assert config.inputs == config.weights == flax and flax.margin == 1.0  # Flax's 2**0
    assert config.output_grads == dataclasses.replace(flax, format=ag.E5M2) and config.stats
    assert QuantConfig.flax_fp8("E3M4").inputs.format is ag.E3M4
    # The margin default follows the mode; an explicit one is kept.
    assert TensorQuant("E4M3", scaling="flax", margin=2.0).margin == 2.0
    assert TensorQuant("E4M3", scaling="delayed").margin == 1.01
    with pytest.raises(ValueError, match="per-tensor formats"):
        TensorQuant("MXFP8_E4M3", scaling="flax")


def test_unknown_format_lists_the_names():
    with pytest.raises(ValueError, match="E5M2") as err:
        QuantConfig(inputs="E9M9")
    assert "E9M9" in str(err.value)


@pytest.mark.parametrize("history_len", [0, -3, 2.0, True])
def test_bad_history_len(history_len):
    with pytest.raises(ValueError, match="history_len"):
        TensorQuant("E4M3", history_len=history_len)


@pytest.mark.parametrize(
    ("field", "value", "choices"),
    [
        ("rounding", "up", "stochastic"),
        ("scaling", "lazy", "delayed"),
        ("amax_algorithm", "mean", "most_recent"),
    ],
)
def test_unknown_modes_name_the_choices(field, value, choices):
    with pytest.raises(ValueError, match=choices) as err:
        TensorQuant("E4M3", **{field: value})
    assert repr(value) in str(err.value)


def test_bad_margin_role_and_stream():
    with pytest.raises(ValueError, match="margin"):
        TensorQuant("E4M3", margin=0.0)
    with pytest.raises(TypeError, match="output_grads"):
        QuantConfig(output_grads=8)
    with pytest.raises(ValueError, match="rng_stream"):
        QuantConfig(rng_stream="")
    with pytest.raises(ValueError, match="inputs"):
        QuantConfig().role("activations")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        QuantConfig().stats = True
