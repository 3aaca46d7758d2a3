"""Synthetic data generators: layouts, baselines, and Mackey-Glass against a plain Euler loop."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrnn import data


def test_adding_problem_layout_and_baseline(key):
  xs, ys = data.adding_problem(key, 4000, 50)
  assert xs.shape == (4000, 50, 2) and ys.shape == (4000, 1)
  marker = np.asarray(xs[..., 1])
  assert np.all(marker.sum(axis=1) == 2)
  assert np.all(marker[:, :25].sum(axis=1) == 1) and np.all(marker[:, 25:].sum(axis=1) == 1)
  np.testing.assert_allclose(ys[:, 0], np.sum(np.asarray(xs[..., 0]) * marker, axis=1), rtol=1e-6)
  assert float(jnp.mean((ys - 1) ** 2)) == pytest.approx(1 / 6, abs=0.01)  # the trivial baseline


def test_copy_memory_layout(key):
  inputs, targets = data.copy_memory(key, 3, 7, num_symbols=8, copy_length=10)
  assert inputs.shape == targets.shape == (3, 27)
  symbols = np.asarray(inputs[:, :10])
  assert symbols.min() >= 1 and symbols.max() <= 8
  assert np.all(inputs[:, 10:16] == 0) and np.all(inputs[:, 16] == 9)
  assert np.all(inputs[:, 17:] == 0)
  assert np.all(targets[:, :17] == 0)
  np.testing.assert_array_equal(targets[:, 17:], symbols)


def test_copy_memory_baseline_formula():
  # Blanks are free, then 10 uniform guesses over 8 symbols: 10 log 8 / (T + 20) per step.
  assert 10 * math.log(8) / (100 + 20) == pytest.approx(0.1733, abs=1e-4)


def test_mackey_glass_matches_a_fine_euler_loop(key):
  with jax.enable_x64(True):
    series = np.asarray(data.mackey_glass(key, 1, 40, washout=0, dtype=jnp.float64))[0]
    x0 = float(jax.random.uniform(key, (1,), jnp.float64, 0.5, 1.5)[0])
  dt, delay, steps = 0.002, 8500, 20000         # tau = 17 = 8500 * dt, 40 time units
  x = np.empty(delay + steps + 1)
  x[:delay + 1] = x0
  for i in range(delay, delay + steps):
    lag = x[i - delay]
    x[i + 1] = x[i] + dt * (0.2 * lag / (1 + lag ** 10) - 0.1 * x[i])
  reference = x[delay + 500::500][:40]          # one sample per time unit
  np.testing.assert_allclose(series, reference, atol=5e-4)


def test_mackey_glass_is_chaotic_but_bounded(key):
  series = np.asarray(data.mackey_glass(key, 2, 500))
  assert series.shape == (2, 500)
  assert 0.2 < series.min() and series.max() < 1.5 and series.std() > 0.15


def test_mackey_glass_rejects_tau_off_the_grid(key):
  with pytest.raises(ValueError, match="tau"):
    data.mackey_glass(key, 1, 10, tau=17.05)
