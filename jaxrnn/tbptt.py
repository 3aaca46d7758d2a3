"""Truncated backpropagation through time over long sequences and streams.

Shape legend: `B` batch, `N` total stream length, `k` chunk length, `K` layers x directions.

The pattern of min-char-rnn and Keras `stateful=True`: a long sequence is cut into chunks of `k`
steps; each chunk is one training step whose gradient stops at the chunk's start (the incoming
carry is data, not a function of the params), and the chunk's final carry is handed to the next
chunk. Unlike Keras, nothing fixes the batch size: the carry is an ordinary array that the caller
owns, resets per example with a `[B]` mask, or drops at the end of the data.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrnn import _checks
from jaxrnn import rnn as _rnn
from jaxrnn import train

ChunkLoss = Callable[..., tuple[jax.Array, Any]]  # (params, carry, *chunk) -> (loss, carry)


def rnn_chunk_loss(spec: _rnn.RNN, *, loss: str = "xent", backward: str = "manual") -> ChunkLoss:
  """`loss_fn(params, carry, xs [B, k, D], targets) -> (loss, final_carry)` for an `RNN` spec."""
  _rnn._check_spec(spec)
  if spec.output_size is None:
    raise ValueError("rnn_chunk_loss needs a spec with output_size set (a readout); got "
                     "output_size=None.")
  _checks.check_choice("loss", loss, _rnn.losses.OUTPUT_OF_LOSS)
  _checks.check_choice("backward", backward, ("manual", "autodiff"))

  def loss_fn(params, carry, xs, targets):
    _checks.check_sequence_input("xs", xs, spec.input_size)
    _rnn.losses.check_targets(loss, targets, _checks.shape_of(xs)[:-1], spec.output_size)
    hs, carry_T = _rnn.apply(spec, params, xs, carry, backward=backward)
    value = jnp.sum(_rnn.losses.step_weights(None, targets.shape[:2], hs.dtype)
                    * _rnn.losses.step_losses(_rnn.readout(spec, params, hs), targets, loss))
    return value, carry_T
  return loss_fn


def reset_carry(carry, reset: jax.Array, initial):
  """Rows `b` with `reset[b]` True take `initial`'s row; carries are `[K, B, H]` (or tuples)."""
  leaves, treedef = jax.tree.flatten(carry)
  init_leaves, init_treedef = jax.tree.flatten(initial)
  if init_treedef != treedef:
    raise ValueError(f"initial must have carry's structure {treedef}; got {init_treedef}.")
  for c, i in zip(leaves, init_leaves):
    if len(_checks.shape_of(c)) != 3:
      raise ValueError(f"carry must hold [K, B, H] arrays; got shape {list(_checks.shape_of(c))}.")
    _checks.check_shape("initial", i, _checks.shape_of(c), " (carry's shape)")
  batch = _checks.shape_of(leaves[0])[1:2] if leaves else (None,)
  _checks.check_shape("reset", reset, batch, " (one flag per sequence of the carry [K, B, H])")
  _checks.check_mask_dtype("reset", reset)
  return jax.tree.map(lambda c, i: jnp.where(reset[None, :, None], i, c), carry, initial)


def make_tbptt_step(loss_fn: ChunkLoss, optimizer: optax.GradientTransformation, *,
                    skip_nonfinite: bool = True) -> Callable:
  """A jitted `step(params, opt_state, carry, *chunk) -> (params, opt_state, carry, metrics)`.

  `jax.lax.stop_gradient` on the incoming carry cuts the gradient at the chunk boundary (the carry
  is an argument, so it would be cut anyway; the call makes the intent explicit and also holds
  when the step is traced inside a larger function).
  """
  _check_callable("loss_fn", loss_fn)
  train.check_optimizer(optimizer)

  @train.jit_step
  def step(params, opt_state, carry, *chunk):
    carry = jax.lax.stop_gradient(carry)
    (value, new_carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, carry, *chunk)
    new_params, new_opt_state, metrics = train.apply_gradients(
        optimizer, params, opt_state, value, grads, skip_nonfinite=skip_nonfinite)
    if skip_nonfinite:
      new_carry = train.keep_if(metrics["finite"], new_carry, carry)
    return new_params, new_opt_state, new_carry, metrics
  return step


def tbptt_value_and_grad(loss_fn: ChunkLoss, params, carry0, xs: jax.Array, targets: jax.Array,
                         chunk: int):
  """Sum over chunks of each chunk's loss and gradient, the carry's gradient cut at boundaries.

  Args:
    loss_fn: as for `make_tbptt_step`.
    params: the params.
    carry0: the initial carry.
    xs: `[B, N, ...]`; `targets`: `[B, N, ...]`; `N` must be a multiple of `chunk`.
    chunk: `k`.

  Returns:
    `(total_loss, grads, final_carry)`: what `N / k` consecutive TBPTT steps accumulate (before
    any update), computed with one `lax.scan` over chunks.
  """
  _check_callable("loss_fn", loss_fn)
  _checks.check_positive_int("chunk", chunk)
  _check_streams(xs, targets)
  n = xs.shape[1]
  if n % chunk:
    raise ValueError(f"xs length N = {n} must be a multiple of chunk = {chunk}.")
  split = lambda a: jnp.swapaxes(a.reshape(a.shape[0], n // chunk, chunk, *a.shape[2:]), 0, 1)
  vg = jax.value_and_grad(loss_fn, has_aux=True)

  def body(acc, chunk_data):
    carry, total, grads = acc
    (value, carry), g = vg(params, jax.lax.stop_gradient(carry), *chunk_data)
    return (carry, total + value, jax.tree.map(jnp.add, grads, g)), None

  zero = jax.tree.map(jnp.zeros_like, params)
  init = (carry0, jnp.zeros((), jnp.result_type(xs)), zero)
  (carry, total, grads), _ = jax.lax.scan(body, init, (split(xs), split(targets)))
  return total, grads, carry


def _check_callable(name: str, fn) -> None:
  if not callable(fn):
    raise TypeError(f"{name} must be a function; got {type(fn).__name__}.")


def _check_streams(xs, targets) -> None:
  """`xs [B, N, ...]` and `targets [B, N, ...]` arrays with the same `B` and `N >= 1`."""
  for name, x in (("xs", xs), ("targets", targets)):
    if not hasattr(x, "shape"):
      raise TypeError(f"{name} must be a JAX or NumPy array [B, N, ...]; got {type(x).__name__}.")
  if xs.ndim < 2 or xs.shape[1] < 1:
    raise ValueError(f"xs must have shape [B, N, ...] with N >= 1 steps; got {list(xs.shape)}.")
  if targets.shape[:2] != xs.shape[:2]:
    raise ValueError(f"targets must have shape [B, N, ...] = [{xs.shape[0]}, {xs.shape[1]}, ...] "
                     f"like xs; got {list(targets.shape)}.")


def stream_batches(tokens: np.ndarray, batch: int) -> np.ndarray:
  """Cut a 1-D stream into `batch` contiguous parallel streams `[B, N // B]` (min-char-rnn style)."""
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be a 1-D stream; got shape {list(tokens.shape)}.")
  _checks.check_positive_int("batch", batch)
  n = len(tokens) // batch
  if n < 2:
    raise ValueError(f"tokens has {len(tokens)} elements: too short for batch = {batch}.")
  return tokens[: n * batch].reshape(batch, n)


def chunks(length: int, chunk: int) -> Iterator[slice]:
  """Slices `[s, s + k)` covering `range(length)`; the last one may be shorter."""
  _checks.check_positive_int("length", length, minimum=0)
  _checks.check_positive_int("chunk", chunk)
  for start in range(0, length, chunk):
    yield slice(start, min(start + chunk, length))


def run_tbptt(step: Callable, params, opt_state, xs: jax.Array, targets: jax.Array, *,
              chunk: int, carry, reset_at_end: bool = True,
              initial_carry: Optional[Any] = None):
  """Walk `xs [B, N, ...]` in chunks of `k` steps, one `step` per chunk, carrying the state.

  Args:
    step: from `make_tbptt_step`.
    params, opt_state: the training state.
    xs, targets: the whole (batch of) streams.
    chunk: `k`.
    carry: the incoming carry (e.g. `rnn.initial_carry(spec, params, (B,))`).
    reset_at_end: return `initial_carry` (default: `carry` as given) instead of the last state,
      so the next pass over the data starts fresh.

  Returns:
    `(params, opt_state, carry, losses)` with one loss per chunk.
  """
  _check_callable("step", step)
  _checks.check_positive_int("chunk", chunk)
  _check_streams(xs, targets)
  start_carry = carry if initial_carry is None else initial_carry
  chunk_losses = []
  for window in chunks(xs.shape[1], chunk):
    params, opt_state, carry, metrics = step(params, opt_state, carry, xs[:, window],
                                             targets[:, window])
    chunk_losses.append(metrics["loss"])
  if reset_at_end:
    carry = start_carry
  return params, opt_state, carry, jnp.stack(chunk_losses)
