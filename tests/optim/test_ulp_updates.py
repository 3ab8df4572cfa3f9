"""ULP-aware updates: exact grid steps after the optimizer, the pre-Adam variant, grid SGD."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from altgrad_jax import E3M4, E4M3, E5M2, E7M0, EIGHT_BIT_FORMATS, ulp
from altgrad_jax.formats import E2M1, E2M3, E3M2, format_params, grid
from altgrad_jax.optim import (
    grid_sgd,
    grid_to_rung,
    rung_to_grid,
    scale_by_stiffness,
    scale_by_ulp,
)

SMALL = (*EIGHT_BIT_FORMATS, E2M1, E2M3, E3M2)


def _index(values, fmt):
    return np.searchsorted(grid(fmt), np.asarray(values, np.float64))


@pytest.mark.parametrize("fmt", SMALL, ids=lambda f: f.name)
def test_rungs_are_grid_indices(fmt):
    values = grid(fmt).astype(np.float32)
    half = (len(values) - 1) // 2
    rungs = grid_to_rung(jnp.asarray(values), fmt)
    np.testing.assert_array_equal(np.asarray(rungs), np.arange(-half, half + 1))
    np.testing.assert_array_equal(np.asarray(rung_to_grid(rungs, fmt)), values)


def _steps(fmt, k, params):
    """Updates of chain(sign, scale(k), scale_by_ulp) for a gradient of ones: k steps up."""
    opt = optax.chain(optax.scale_by_sign(), optax.scale(float(k)), scale_by_ulp(fmt, scale=1.0))
    grads = jax.tree.map(jnp.ones_like, params)
    return opt.update(grads, opt.init(params), params)[0]


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E7M0, E3M4], ids=lambda f: f.name)
@pytest.mark.parametrize("k", [1, -1])
def test_one_grid_step_is_exact_everywhere(fmt, k):
    values = grid(fmt)[1:-1].astype(np.float32)  # away from the format's ends
    params = {"w": jnp.asarray(values)}
    new = params["w"] + _steps(fmt, k, params)["w"]
    np.testing.assert_array_equal(_index(new, fmt), _index(values, fmt) + k)


def test_k_grid_steps_within_a_binade():
    """E4M3 has 8 values per binade: from the first one, up to 7 steps stay inside it."""
    values = np.array([1.0, -2.0, 0.25, 64.0], np.float32)
    for k in range(1, 8):
        params = {"w": jnp.asarray(np.abs(values))}
        new = params["w"] + _steps(E4M3, k, params)["w"]
        np.testing.assert_array_equal(_index(new, E4M3), _index(np.abs(values), E4M3) + k)


def test_stiffness_before_adam_is_cancelled_but_ulp_after_is_not():
    """The original pre-Adam stiffness: Adam divides it out, steps stay ~lr in real units."""
    params = {"w": jnp.array([1.25, 1.5, 10.0, 96.0], jnp.float32)}  # not powers of two
    grads = {"w": jnp.array([0.3, -0.2, 0.5, 0.1], jnp.float32)}
    plain = optax.adam(0.01, eps=1e-12)
    original = optax.chain(scale_by_stiffness(E4M3), optax.adam(0.01, eps=1e-12))
    plain_state, original_state = plain.init(params), original.init(params)
    for _ in range(3):
        a, plain_state = plain.update(grads, plain_state, params)
        b, original_state = original.update(grads, original_state, params)
        np.testing.assert_allclose(np.asarray(b["w"]), np.asarray(a["w"]), rtol=1e-5)
    # The same real step is a different number of grid steps: 1/800 of an E4M3 ULP near 96,
    # 1/12 of one near 1.25. After the optimizer, the ULP sets the step instead.
    correct = optax.chain(
        optax.scale_by_adam(eps=1e-12), optax.scale(-1.0), scale_by_ulp(E4M3, scale=1.0)
    )
    c, _ = correct.update(grads, correct.init(params), params)
    spacing = np.asarray(ulp(params["w"], E4M3))
    np.testing.assert_allclose(np.abs(np.asarray(c["w"])) / spacing, 1.0, rtol=1e-5)
    ratio = np.abs(np.asarray(b["w"])) / spacing
    assert ratio.max() / ratio.min() > 50


def test_grid_sgd_moves_integer_rungs_across_binades():
    params = {"w": jnp.asarray(grid(E4M3)[100:140].astype(np.float32))}
    opt = grid_sgd(3.0, E4M3, scale=1.0)
    updates, _ = opt.update({"w": -jnp.ones(40)}, opt.init(params), params)
    new = params["w"] + updates["w"]
    np.testing.assert_array_equal(_index(new, E4M3), _index(params["w"], E4M3) + 3)
    # Clipped at the format's end.
    top = {"w": jnp.array([448.0, -448.0], jnp.float32)}
    updates, _ = opt.update({"w": jnp.array([-1.0, 1.0])}, opt.init(top), top)
    np.testing.assert_array_equal(np.asarray(top["w"] + updates["w"]), [448.0, -448.0])


def test_grid_sgd_fractional_rungs_are_unbiased():
    n, steps, rate = 4096, 20, 0.25
    params = {"w": jnp.ones((n,), jnp.float32)}
    opt = grid_sgd(rate, E5M2, scale=1.0, seed=3)
    state = opt.init(params)
    update = jax.jit(opt.update)
    w = params
    for _ in range(steps):
        updates, state = update({"w": -jnp.ones(n)}, state, w)
        w = optax.apply_updates(w, updates)
    moved = _index(w["w"], E5M2) - _index(params["w"], E5M2)
    # Each step is a Bernoulli(0.25) rung: mean 5 rungs, std of the mean sqrt(20 * 3/16 / n).
    assert abs(moved.mean() - steps * rate) < 5 * np.sqrt(steps * 0.1875 / n)
    assert np.isin(np.asarray(w["w"]), grid(E5M2)).all()


def test_grid_sgd_traced_format_and_zero_gradient():
    params = {"w": jnp.asarray(grid(E3M4)[50:90].astype(np.float32))}
    traces = []

    @jax.jit
    def step(fmt_params, grads):
        traces.append(1)
        opt = grid_sgd(2.0, fmt_params)
        return opt.update(grads, opt.init(params), params)[0]

    grads = {"w": jnp.linspace(-1.0, 1.0, 40)}
    for fmt in (E3M4, E4M3):
        static = grid_sgd(2.0, fmt)
        expected = static.update(grads, static.init(params), params)[0]
        np.testing.assert_array_equal(
            np.asarray(step(format_params(fmt).as_arrays(), grads)["w"]), np.asarray(expected["w"])
        )
    assert len(traces) == 1
    zero = grid_sgd(2.0, E3M4, scale=1.0)
    updates, _ = zero.update({"w": jnp.zeros(40)}, zero.init(params), params)
    np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="signed format with a zero"):
        grid_sgd(1.0, "e8m0").init({"w": jnp.ones(2)})
    with pytest.raises(ValueError, match="needs params"):
        scale_by_ulp(E4M3).update({"w": jnp.ones(2)}, optax.EmptyState())
    with pytest.raises(ValueError, match="known formats"):
        scale_by_stiffness("fp7")
