"""jaxrnn.cells: each cell's equations against NumPy, and its hand-derived backward against vjp."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrnn import cells
from conftest import rel_err
from reference import cell_loop

CELLS = {"tanh": cells.elman("tanh", two_biases=True), "relu": cells.elman("relu", two_biases=True),
         "sigmoid": cells.elman("sigmoid", two_biases=True), "lstm": cells.lstm(), "gru": cells.gru()}


@pytest.mark.parametrize("name", sorted(CELLS))
def test_step_matches_numpy_equations(name, key):
  cell = CELLS[name]
  d, h, t = 3, 5, 6
  params = cell.init(key, d, h)
  assert {k: v.shape for k, v in params.items()} == {
      "U": (cell.num_blocks * h, d), "W": (cell.num_blocks * h, h),
      "b": (cell.num_blocks * h,), "bh": (cell.num_blocks * h,)}
  xs = jax.random.normal(jax.random.key(1), (t, d))
  carry = tuple(0.3 * jax.random.normal(jax.random.key(2 + i), (h,)) for i in range(cell.carry_size))
  hs_ref, (h_ref, c_ref) = cell_loop(name, params, xs, *carry)
  hs = []
  for x in xs:
    carry, out = cells.step(cell, params, carry, x)
    hs.append(out)
  np.testing.assert_allclose(np.stack(hs), hs_ref, rtol=1e-5, atol=1e-6)
  if name == "lstm":
    np.testing.assert_allclose(carry[1], c_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CELLS))
def test_pointwise_bwd_equals_vjp(name):
  """The hand-derived one-step reverse equals jax.vjp of the one-step forward (float64)."""
  cell = CELLS[name]
  with jax.enable_x64(True):
    b, h = 3, 4
    g = cell.num_blocks * h
    ks = jax.random.split(jax.random.key(3), 6)
    a = jax.random.normal(ks[0], (b, g), jnp.float64)
    r = jax.random.normal(ks[1], (b, g), jnp.float64)
    carry = tuple(jax.random.normal(k, (b, h), jnp.float64) for k in ks[2:2 + cell.carry_size])
    d_carry = tuple(jax.random.normal(k, (b, h), jnp.float64) for k in ks[4:4 + cell.carry_size])
    new, res = cell.pointwise(a, r, carry)
    d_a, d_r, d_prev = cell.pointwise_bwd(res, carry, new, d_carry)
    d_r = d_a if d_r is None else d_r
    _, pullback = jax.vjp(lambda a_, r_, c_: cell.pointwise(a_, r_, c_)[0], a, r, carry)
    e_a, e_r, e_prev = pullback(d_carry)
    assert rel_err(d_a, e_a) < 1e-13 and rel_err(d_r, e_r) < 1e-13
    for got, want in zip(d_prev, e_prev):
      assert rel_err(got, want) < 1e-13 or np.abs(np.asarray(want)).max() == 0 == np.abs(np.asarray(got)).max()


def test_lstm_forget_bias(key):
  plain = cells.lstm().init(key, 3, 4)
  biased = cells.lstm(forget_bias=1.0).init(key, 3, 4)
  np.testing.assert_allclose(biased["b"][4:8] - plain["b"][4:8], 1.0, rtol=1e-6)
  np.testing.assert_array_equal(biased["b"][:4], plain["b"][:4])
  np.testing.assert_array_equal(biased["b"][8:], plain["b"][8:])


def test_default_init_is_pytorch_uniform(key):
  params = cells.gru().init(key, 10, 16)
  for leaf in params.values():
    assert float(jnp.abs(leaf).max()) <= 0.25 and float(jnp.abs(leaf).max()) > 0.2


def test_cells_are_cached_so_jit_does_not_retrace():
  assert cells.elman("tanh") is cells.elman("tanh") and cells.lstm() is cells.lstm()


def test_unknown_activation():
  with pytest.raises(ValueError, match="f must be one of 'tanh', 'sigmoid', 'relu'; got 'elu'"):
    cells.elman("elu")
