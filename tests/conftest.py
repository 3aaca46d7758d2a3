"""Test conventions: rank promotion raises, a PRNG key fixture, float64 helpers."""
import jax
import numpy as np
import pytest

# An [H] vs [B, H] slip must fail loudly instead of broadcasting silently.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
  return jax.random.key(0)


def rel_err(a, b) -> float:
  """||a - b|| / ||b|| (with b the reference), in float64 NumPy."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  denom = np.linalg.norm(b)
  return float(np.linalg.norm(a - b) / (denom if denom > 0 else 1.0))
