"""Synthetic and text data, generated or read locally (nothing is downloaded).

Shape legend: `B` batch, `T` time.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def noisy_sines(key: jax.Array, batch: int, length: int, *, noise: float = 0.05,
                num_components: int = 2, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """Mixtures of sines with random frequencies and phases, for next-step prediction.

  Args:
    key: PRNG key.
    batch, length: `B` and `T`.
    noise: standard deviation of Gaussian noise added to the inputs (targets stay clean).
    num_components: sines per sequence.

  Returns:
    `(xs [B, T, 1], ys [B, T, 1])` with `ys[:, t] = clean signal at t + 1`.
  """
  kf, kp, kn = jax.random.split(key, 3)
  freqs = jax.random.uniform(kf, (batch, 1, num_components), dtype, 0.05, 0.25)
  phases = jax.random.uniform(kp, (batch, 1, num_components), dtype, 0, 2 * jnp.pi)
  t = jnp.arange(length + 1, dtype=dtype).reshape(1, -1, 1)
  signal = jnp.mean(jnp.sin(2 * jnp.pi * freqs * t + phases), axis=-1, keepdims=True)
  xs = signal[:, :-1] + noise * jax.random.normal(kn, (batch, length, 1), dtype)
  return xs, signal[:, 1:]
