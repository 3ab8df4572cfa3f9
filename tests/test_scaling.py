"""AmaxHistory, compute_scale and the current / delayed scaling modes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from references import count_compiles

import altgrad_jax as ag


def test_create_and_amax_before_any_update():
    h = ag.AmaxHistory.create()
    assert h.history.shape == (16,) and h.history.dtype == jnp.float32
    assert int(h.count) == 0 and float(h.get_amax()) == 1.0
    assert ag.AmaxHistory.create(4).history_len == 4


def test_update_is_pure_and_records_max_abs():
    h0 = ag.AmaxHistory.create(4)
    h1 = h0.update(jnp.array([1.0, -7.5, 3.0]))
    assert float(h0.get_amax()) == 1.0 and int(h0.count) == 0
    assert float(h1.get_amax()) == 7.5 and int(h1.count) == 1
    np.testing.assert_array_equal(h1.history, [7.5, 0, 0, 0])


def test_window_slides_and_forgets_after_history_len_updates():
    h = ag.AmaxHistory.create(4).update(jnp.array([100.0]))
    amaxes = []
    for v in (1.0, 2.0, 3.0, 0.5):
        h = h.update(jnp.array([v]))
        amaxes.append(float(h.get_amax()))
    assert amaxes == [100.0, 100.0, 100.0, 3.0]
    np.testing.assert_array_equal(h.history, [0.5, 3.0, 2.0, 1.0])
    assert int(h.count) == 4  # saturates: never overflows


def test_most_recent_algorithm():
    h = ag.AmaxHistory.create(4, algorithm="most_recent")
    h = h.update(jnp.array([9.0])).update(jnp.array([2.0]))
    assert float(h.get_amax()) == 2.0


def test_zero_tensor_is_recorded_as_zero():
    h = ag.AmaxHistory.create(2).update(jnp.zeros(3))
    assert float(h.get_amax()) == 0.0


def test_compute_scale_keeps_a_nan_amax_visible():
    assert np.isnan(ag.compute_scale(jnp.float32(jnp.nan), ag.E4M3))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_non_finite_amax_never_enters_the_window(bad):
    h = ag.AmaxHistory.create(3).update(jnp.array([2.0]))
    for skipped in (h.update(jnp.array([1.0, bad])), h.record(jnp.float32(bad))):
        np.testing.assert_array_equal(skipped.history, h.history)
        assert int(skipped.count) == 1
    empty = ag.AmaxHistory.create(3).update(jnp.array([bad]))
    assert int(empty.count) == 0 and float(empty.get_amax()) == 1.0


def test_get_amax_of_an_empty_window_is_configurable():
    assert float(ag.AmaxHistory.create(2).get_amax(empty=7.0)) == 7.0
    assert float(ag.AmaxHistory.create(2).update(jnp.ones(1)).get_amax(empty=7.0)) == 1.0


def test_finite_amax_ignores_inf_and_nan():
    assert float(ag.finite_amax(jnp.array([jnp.inf, 1.0, jnp.nan, -3.0]))) == 3.0
    assert float(ag.finite_amax(jnp.array([jnp.nan, -jnp.inf]))) == 0.0


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mode", ["current", "delayed"])
def test_one_inf_keeps_its_neighbours_and_later_steps_clean(mode, jit):
    x = jnp.array([jnp.inf, 1.0, 2.0, -3.0, jnp.nan], jnp.float32)

    def step(h, x):
        scale, h, finite = ag.scale_and_update(h, x, ag.E4M3, mode, return_finite=True)
        return ag.quantize(x, ag.E4M3, scale), scale, h, finite

    step = jax.jit(step) if jit else step
    # First step, empty window: the finite elements set the scale.
    q, scale, h, finite = step(ag.AmaxHistory.create(4), x)
    assert not bool(finite) and int(h.count) == 0
    assert float(scale) == float(ag.compute_scale(3.0, ag.E4M3))
    assert float(q[0]) == float(448 * scale) and np.isnan(q[4])
    np.testing.assert_array_equal(q[1:4], ag.quantize(x[1:4], ag.E4M3, scale))
    # Later: the bad tensor uses (and leaves) the last finite window; the next one is clean.
    h = ag.AmaxHistory.create(4).update(jnp.array([10.0]))
    q, scale, h2, finite = step(h, x)
    assert not bool(finite) and float(scale) == float(ag.compute_scale(10.0, ag.E4M3))
    np.testing.assert_array_equal(h2.history, h.history)
    np.testing.assert_array_equal(q[1:4], ag.quantize(x[1:4], ag.E4M3, scale))
    assert float(q[0]) == float(448 * scale) and np.isnan(q[4])
    e5m2_scale, _ = ag.scale_and_update(ag.AmaxHistory.create(4), x, ag.E5M2, mode)
    q5 = ag.quantize(x, ag.E5M2, e5m2_scale)  # a format with inf keeps it
    assert float(q5[0]) == np.inf and np.isnan(q5[4]) and np.all(np.isfinite(q5[1:4]))
    clean = jnp.array([1.0, 2.0])
    q, scale, _, finite = step(h2, clean)
    assert bool(finite) and np.all(np.isfinite(q))
    assert float(scale) == float(ag.compute_scale(10.0, ag.E4M3))


def test_delayed_first_step_scales_from_the_tensor():
    x = jnp.array([3.0, 100.0])
    scale, h = ag.scale_and_update(ag.AmaxHistory.create(4), x, ag.E4M3, "delayed")
    assert float(scale) == float(ag.compute_scale(100.0, ag.E4M3))
    q = np.asarray(ag.quantize(x, ag.E4M3, scale))
    assert q[0] == pytest.approx(3.0, rel=2**-3) and q[1] == pytest.approx(100.0, rel=2**-3)
    # The second step is delayed as usual: it uses the first tensor's amax.
    scale2, _ = ag.scale_and_update(h, jnp.array([1000.0]), ag.E4M3, "delayed")
    assert float(scale2) == float(ag.compute_scale(100.0, ag.E4M3))


def test_compute_scale_formula():
    amax = jnp.float32(300.0)
    expected = np.float32(300.0) * (np.float32(1.01) / np.float32(448.0))
    assert float(ag.compute_scale(amax, ag.E4M3)) == expected
    assert float(jax.jit(ag.compute_scale, static_argnums=1)(amax, ag.E4M3)) == expected
    assert float(ag.compute_scale(0.0, ag.E4M3)) == np.float32(1e-10)
    assert float(ag.compute_scale(1e-12, ag.E0M7)) == np.float32(1e-10)
    assert float(ag.compute_scale(5e-11, ag.E0M7)) == np.float32(1e-10)  # amax < scale_min
    assert float(ag.compute_scale(4.0, ag.E4M3, scale_min=1.0)) == 1.0
    params = ag.format_params(ag.E4M3).as_arrays()
    assert float(ag.compute_scale(amax, params)) == float(ag.compute_scale(amax, ag.E4M3))


def test_scaled_amax_lands_inside_the_range():
    x = jnp.array([-1234.5, 3.0])
    for fmt in ag.EIGHT_BIT_FORMATS:
        scale = ag.compute_scale(jnp.max(jnp.abs(x)), fmt)
        assert float(jnp.max(jnp.abs(x)) / scale) < fmt.max_value


def test_current_and_delayed_modes():
    h = ag.AmaxHistory.create(4).update(jnp.array([2.0]))
    x = jnp.array([10.0])
    current, h_current = ag.scale_and_update(h, x, ag.E4M3, "current")
    delayed, h_delayed = ag.scale_and_update(h, x, ag.E4M3, "delayed")
    assert float(current) == float(ag.compute_scale(10.0, ag.E4M3))
    assert float(delayed) == float(ag.compute_scale(2.0, ag.E4M3))
    np.testing.assert_array_equal(h_current.history, h_delayed.history)
    # current scaling never saturates the tensor it scales
    assert float(ag.quantize(x, ag.E4M3, current)[0]) == pytest.approx(10.0, rel=2**-3)


def test_history_in_jit_and_scan_compiles_once():
    step = count_compiles(lambda h, x: ag.scale_and_update(h, x, ag.E5M2))
    step_jit = jax.jit(step)
    h = ag.AmaxHistory.create(3)
    for i in range(5):
        scale, h = step_jit(h, jnp.full((4,), float(i + 1)))
    assert step.traces == 1
    np.testing.assert_array_equal(h.history, [5.0, 4.0, 3.0])
    assert float(scale) == float(ag.compute_scale(5.0, ag.E5M2))

    def body(h, x):
        scale, h = ag.scale_and_update(h, x, ag.E5M2)
        return h, scale

    final, scales = jax.lax.scan(body, ag.AmaxHistory.create(3), jnp.arange(1.0, 6.0)[:, None])
    np.testing.assert_array_equal(final.history, h.history)
    assert scales.shape == (5,)


@pytest.mark.parametrize("history_len", [0, -1, 1.5, True])
def test_bad_history_len(history_len):
    with pytest.raises(ValueError, match="history_len"):
        ag.AmaxHistory.create(history_len)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown amax algorithm 'mean'"):
        ag.AmaxHistory.create(4, algorithm="mean")
    with pytest.raises(ValueError, match="unknown scaling mode 'late'"):
        ag.scale_and_update(ag.AmaxHistory.create(), jnp.ones(2), ag.E4M3, "late")
    with pytest.raises(ValueError, match="scale_min"):
        ag.compute_scale(1.0, ag.E4M3, scale_min=0.0)
    with pytest.raises(ValueError, match="margin"):
        ag.compute_scale(1.0, ag.E4M3, margin=-1.0)
    with pytest.raises(TypeError, match="floating-point"):
        ag.AmaxHistory.create().update(jnp.ones(2, jnp.int32))
