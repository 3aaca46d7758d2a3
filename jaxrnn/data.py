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


def mackey_glass(key: jax.Array, batch: int, length: int, *, tau: float = 17.0, beta: float = 0.2,
                 gamma: float = 0.1, n: float = 10.0, dt: float = 0.1, subsample: int = 10,
                 washout: int = 500, dtype=jnp.float32) -> jax.Array:
  """The Mackey-Glass chaotic series, integrated with RK4 on the delay equation.

  .. math::  \\frac{dx}{dt} = \\beta \\frac{x(t - \\tau)}{1 + x(t - \\tau)^n} - \\gamma x(t)

  (Mackey & Glass 1977; `tau = 17` is the standard mildly chaotic benchmark.) Each series starts
  from a constant history drawn uniformly in [0.5, 1.5], so different keys give different
  trajectories on the same attractor. RK4 needs the delayed term at half steps, which falls between
  grid points; it is linearly interpolated from the stored history (the usual scheme). `tau` must be
  a multiple of `dt`.

  Args:
    key: PRNG key (only the initial histories are random).
    batch, length: `B` series of `T` samples each.
    tau, beta, gamma, n: the equation's parameters.
    dt: integration step.
    subsample: keep every `subsample`-th integration step (default: one sample per time unit).
    washout: samples discarded at the start, so the transient from the constant history is gone.

  Returns:
    `[B, T]` samples `x(t_0 + k * dt * subsample)` (values roughly in [0.2, 1.4]).

  Example:
    >>> series = mackey_glass(jax.random.key(0), 4, 1000)      # [4, 1000]
  """
  delay = int(round(tau / dt))
  if delay < 1 or abs(delay * dt - tau) > 1e-6 * max(1.0, tau):
    raise ValueError(f"tau must be a positive multiple of dt={dt}; got tau={tau}.")
  if subsample < 1 or length < 1 or washout < 0 or batch < 1:
    raise ValueError("batch, length and subsample must be >= 1 and washout >= 0; got "
                     f"batch={batch}, length={length}, subsample={subsample}, washout={washout}.")
  x0 = jax.random.uniform(key, (batch,), dtype, 0.5, 1.5)
  # Ring buffer of the last `delay + 1` values: buf[i % (delay + 1)] = x(t_i).
  hist = jnp.broadcast_to(x0[:, None], (batch, delay + 1))

  def rhs(x, x_tau):
    return beta * x_tau / (1 + x_tau ** n) - gamma * x

  def step(carry, _):
    buf, i = carry
    x = buf[:, i % (delay + 1)]
    lag0 = buf[:, (i + 1) % (delay + 1)]           # x(t_i - tau), the oldest stored value
    lag1 = buf[:, (i + 2) % (delay + 1)]           # x(t_i - tau + dt)
    lag_half = 0.5 * (lag0 + lag1)
    k1 = rhs(x, lag0)
    k2 = rhs(x + 0.5 * dt * k1, lag_half)
    k3 = rhs(x + 0.5 * dt * k2, lag_half)
    k4 = rhs(x + dt * k3, lag1)
    x_new = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    buf = buf.at[:, (i + 1) % (delay + 1)].set(x_new)  # overwrites x(t_i - tau), no longer needed
    return (buf, i + 1), x_new

  total = (washout + length) * subsample
  _, xs = jax.lax.scan(step, (hist, jnp.asarray(0, jnp.int32)), None, length=total)
  return xs[subsample - 1::subsample].T[:, washout:]


def adding_problem(key: jax.Array, batch: int, length: int, *, dtype=jnp.float32
                   ) -> tuple[jax.Array, jax.Array]:
  """The adding problem (Hochreiter & Schmidhuber 1997; as in Le, Jaitly & Hinton 2015).

  Channel 0 holds values uniform in [0, 1]; channel 1 is a marker, 1 at two positions (one in the
  first half of the sequence, one in the second) and 0 elsewhere. The target is the sum of the two
  marked values. Predicting the mean 1 always gives MSE `Var(u1 + u2) = 1/6 ~ 0.167`.

  Args:
    key: PRNG key.
    batch, length: `B` and `T` (`T >= 2`).

  Returns:
    `(xs [B, T, 2], ys [B, 1])`.
  """
  if length < 2:
    raise ValueError(f"length must be >= 2 (two markers); got {length}.")
  kv, k1, k2 = jax.random.split(key, 3)
  half = length // 2
  values = jax.random.uniform(kv, (batch, length), dtype)
  first = jax.random.randint(k1, (batch,), 0, half)
  second = jax.random.randint(k2, (batch,), half, length)
  steps = jnp.arange(length)[None, :]
  marker = ((steps == first[:, None]) | (steps == second[:, None])).astype(dtype)
  xs = jnp.stack([values, marker], axis=-1)
  ys = jnp.sum(values * marker, axis=1, keepdims=True)
  return xs, ys


def copy_memory(key: jax.Array, batch: int, delay: int, *, num_symbols: int = 8,
                copy_length: int = 10) -> tuple[jax.Array, jax.Array]:
  """The copy-memory task of Arjovsky, Shah & Bengio (2016), as integer class sequences.

  With `S = copy_length`, a sequence has `T + 2S` steps (`T = delay`). Symbols are 1..num_symbols,
  0 is the blank and `num_symbols + 1` the delimiter. The input is `S` random symbols, `T - 1`
  blanks, the delimiter, then `S` blanks; the target is `T + S` blanks, then the `S` symbols. A
  model that outputs blanks and then guesses uniformly scores a cross-entropy of
  `S log(num_symbols) / (T + 2S)` per step, the baseline to beat.

  Args:
    key: PRNG key.
    batch: `B`.
    delay: `T >= 1`, the number of steps between the end of the symbols and the delimiter + 1.
    num_symbols: size of the alphabet to copy.
    copy_length: `S`.

  Returns:
    `(inputs [B, T + 2S], targets [B, T + 2S])`, int32 classes: inputs in `[0, num_symbols + 1]`
    (one-hot them with `num_symbols + 2` classes), targets in `[0, num_symbols]`.
  """
  if delay < 1 or num_symbols < 1 or copy_length < 1:
    raise ValueError("delay, num_symbols and copy_length must be >= 1; got "
                     f"{delay}, {num_symbols}, {copy_length}.")
  symbols = jax.random.randint(key, (batch, copy_length), 1, num_symbols + 1, jnp.int32)
  blanks = lambda k: jnp.zeros((batch, k), jnp.int32)
  delimiter = jnp.full((batch, 1), num_symbols + 1, jnp.int32)
  inputs = jnp.concatenate([symbols, blanks(delay - 1), delimiter, blanks(copy_length)], axis=1)
  targets = jnp.concatenate([blanks(delay + copy_length), symbols], axis=1)
  return inputs, targets
