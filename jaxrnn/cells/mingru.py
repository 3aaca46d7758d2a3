"""minGRU: a gated recurrence with no recurrent matrix, computable in parallel over time.

Shape legend: `B` batch (optional), `T` time, `D` input, `H` hidden; `G = 2H`.

.. math::
   z_t = \\sigma(U_z x_t + b_z), \\qquad \\tilde h_t = U_h x_t + b_h

   h_t = (1 - z_t) \\odot h_{t-1} + z_t \\odot \\tilde h_t

(Feng, Tung, Ahmed, Bengio & Hajimirsadeghi 2024, "Were RNNs All We Needed?", the minGRU of their
section 3.1). Neither gate reads `h_{t-1}`, so `a_t = U x_t + b` stacked as `[z | h~]`
(`U [2H, D]`, `b [2H]`) is all the input work, there is no `W`, and `h_t = a'_t h_{t-1} + b'_t` is
*affine* in `h_{t-1}` with `a'_t = 1 - z_t`, `b'_t = z_t h~_t`: the associative scan of
`jaxrnn.parallel_scan` computes all `T` states in `O(log T)` depth.

Formulation: the paper's plain minGRU (its Algorithm 1), not its log-space variant. The log-space
variant (`h~ = g(x)` kept positive, states in `log` space, a `logcumsumexp` scan) exists to make a
cumulative-sum scan stable, which divides by prefix products of `1 - z`; the pairwise associative
scan used here only multiplies and adds, so it is stable as is, and `h~` keeps the paper's plain
linear form (no `g`). `1 - z` is computed as `sigmoid(-a_z)`, exact even when `z` rounds to 1.

Two ways to run the same cell, selected by `impl`:

- "sequential": the `jaxrnn.scan` engine (`lax.scan`, `T` dependent steps) and its hand-written
  backward, like every other cell; all of `jaxrnn.rnn` works with it.
- "parallel": `parallel_scan` below, an associative scan forward and a *reverse* associative scan
  backward (the gradient of an affine recurrence is an affine recurrence backwards in time), using
  this cell's `pointwise_bwd` for the per-step derivatives. Same outputs and gradients.

Example:
  >>> params = mingru().init(jax.random.key(0), 8, 32)          # {"U": [64, 8], "b": [64]}
  >>> hs, h_T = forward(params, xs, lengths=lengths)             # xs [B, T, 8] -> [B, T, 32]
  >>> spec = jaxrnn.rnn.rnn("mingru", 8, 32, num_layers=2)
  >>> ys, carry = jaxrnn.rnn.apply(spec, jaxrnn.rnn.init(key, spec), xs, impl="parallel")
"""
from __future__ import annotations

import functools
from typing import Literal, Optional

import jax
import jax.numpy as jnp

from jaxrnn import _checks
from jaxrnn.cells.base import Cell, add_bias, uniform_init
from jaxrnn.parallel_scan import affine_scan

Impl = Literal["parallel", "sequential"]
Backward = Literal["manual", "autodiff"]
IMPLS = ("parallel", "sequential")


def gates(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(z, 1 - z, h~)`, each `[..., H]`, from the input projection `a = [a_z | a_h]` `[..., 2H]`."""
  a_z, h_tilde = jnp.split(a, 2, axis=-1)
  # 1 - z as sigmoid(-a_z): no cancellation when z is within rounding of 1.
  return jax.nn.sigmoid(a_z), jax.nn.sigmoid(-a_z), h_tilde


def affine_coefficients(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The step as an affine map `h_t = decay_t * h_{t-1} + drive_t`: `(1 - z, z h~)`, `[..., H]`."""
  z, keep, h_tilde = gates(a)
  return keep, z * h_tilde


def _pointwise(a, r, carry):
  """The single definition of the minGRU step; `r` is None (no recurrent matrix)."""
  del r
  (h_prev,) = carry
  decay, drive = affine_coefficients(a)
  return (decay * h_prev + drive,), a


def _pointwise_bwd(res, carry_prev, carry, d_carry):
  """Reverse of `_pointwise`; elementwise, so it also runs on whole `[T, B, ...]` sequences."""
  del carry
  (h_prev,), (dh,) = carry_prev, d_carry
  z, keep, h_tilde = gates(res)
  d_az = dh * (h_tilde - h_prev) * z * keep         # dh_t/dz_t = h~_t - h_{t-1}; sigmoid' = z(1-z)
  d_ah = dh * z
  return jnp.concatenate([d_az, d_ah], axis=-1), None, (dh * keep,)


def _masked_coefficients(a, mask):
  """`(decay, drive)` `[T, B, H]` with a masked step turned into the identity map (1, 0)."""
  decay, drive = affine_coefficients(a)
  if mask is not None:
    m = mask[..., None]
    decay, drive = jnp.where(m, decay, 1), jnp.where(m, drive, 0)
  return decay, drive


def _states(a, h0, mask):
  """All states `[T, B, H]` (a masked step repeats the previous state)."""
  decay, drive = _masked_coefficients(a, mask)
  return affine_scan(decay, drive, h0)


@jax.custom_vjp
def _states_manual(a, h0, mask):
  return _states(a, h0, mask)


def _states_fwd(a, h0, mask):
  states = _states(a, h0, mask)
  return states, (a, h0, mask, states)


def _states_bwd(residuals, d_states):
  a, h0, mask, states = residuals
  decay, _ = _masked_coefficients(a, mask)
  # g_t = dL/dh_t in total: its own cotangent plus what h_{t+1} = decay_{t+1} h_t + ... sends back,
  # an affine recurrence in reverse time (decay_{T} := 0: nothing comes after the last step).
  decay_next = jnp.concatenate([decay[1:], jnp.zeros_like(decay[:1])], axis=0)
  g = affine_scan(decay_next, d_states, reverse=True)
  h_prev = jnp.concatenate([h0[None], states[:-1]], axis=0)
  d_a, _, _ = _pointwise_bwd(a, (h_prev,), (states,), (g,))
  if mask is not None:
    d_a = jnp.where(mask[..., None], d_a, 0)
  return d_a, decay[0] * g[0], None


_states_manual.defvjp(_states_fwd, _states_bwd)


def parallel_scan(a: jax.Array, carry0: tuple, mask: Optional[jax.Array] = None, *,
                  backward: Backward = "manual") -> tuple[jax.Array, tuple]:
  """The minGRU recurrence in `O(log T)` depth: a drop-in for `jaxrnn.scan.recurrent_scan`.

  Args:
    a: `[T, B, 2H]` input projections from `jaxrnn.scan.project`.
    carry0: `(h0,)` with `h0 [B, H]`.
    mask: `[T, B]` booleans or None. A masked step is the identity map (`1 - z = 1`, `z h~ = 0`):
      the state is unchanged and the output is 0, exactly as in the sequential engine.
    backward: "manual" (a reverse associative scan with the hand-derived step derivatives, via
      `jax.custom_vjp`) or "autodiff" (JAX differentiates the associative scan).

  Returns:
    `(hs [T, B, H], (h_T,))`: outputs (0 at masked steps) and the state after the last valid step.
  """
  (h0,) = carry0
  states = (_states_manual if backward == "manual" else _states)(a, h0, mask)
  hs = states if mask is None else jnp.where(mask[..., None], states, 0)
  return hs, (states[-1],)


@functools.cache
def mingru() -> Cell:
  """The minGRU cell. Init: PyTorch's `nn.Linear` default, `U`, `b` ~ uniform(+-1/sqrt(D))."""

  def init(key, input_size, hidden_size, dtype=jnp.float32):
    ku, kb = jax.random.split(key)
    bound = 1.0 / input_size ** 0.5  # fan-in of the Linear layers, as in the paper's code
    return {"U": uniform_init(ku, (2 * hidden_size, input_size), bound, dtype),
            "b": uniform_init(kb, (2 * hidden_size,), bound, dtype)}

  return Cell("mingru", 2, 1, init, _pointwise, _pointwise_bwd, recurrent_weights=False,
              parallel_scan=parallel_scan)


def forward(params: dict, xs: jax.Array, h0: Optional[jax.Array] = None, *,
            lengths: Optional[jax.Array] = None, mask: Optional[jax.Array] = None,
            impl: Impl = "parallel", backward: Backward = "manual"
            ) -> tuple[jax.Array, jax.Array]:
  """One minGRU layer over a sequence or a batch, by either implementation.

  Args:
    params: `{"U": [2H, D], "b": [2H]}` from `mingru().init(key, D, H)`.
    xs: `[T, D]` or `[B, T, D]`.
    h0: `[H]` or `[B, H]`; zeros if None.
    lengths: `[B]` (or `[]` unbatched) integers in `[1, T]`: later steps leave the state
      unchanged and output 0. Mutually exclusive with `mask`.
    mask: `[B, T]` (or `[T]`) booleans, True at valid steps (any pattern, not only a prefix).
    impl: "parallel" (associative scan, `O(log T)` depth) or "sequential" (`lax.scan`).
    backward: "manual" (hand-written, default) or "autodiff", for either `impl`.

  Returns:
    `(hs [..., T, H], h_T [..., H])`: outputs and the state after each sequence's last valid step.

  Example:
    >>> params = mingru().init(jax.random.key(0), 3, 16)
    >>> hs, h_T = forward(params, jnp.ones((4, 100, 3)), impl="parallel")   # [4, 100, 16], [4, 16]
  """
  _checks.check_params("params", params, {"U": (None, None), "b": (None,)})
  g, d = _checks.shape_of(params["U"])
  if g % 2:
    raise ValueError(f"params['U'] must have shape [2H, D] (stacked [z | h~]); got {[g, d]}.")
  h = g // 2
  _checks.check_shape("params['b']", params["b"], (g,))
  _checks.check_choice("impl", impl, IMPLS)
  _checks.check_choice("backward", backward, ("manual", "autodiff"))
  batch_shape, t = _checks.check_sequence_input("xs", xs, d)
  if h0 is not None:
    _checks.check_shape("h0", h0, (*batch_shape, h), " ([H] for one sequence, [B, H] for a batch)")
    _checks.check_float("h0", h0)
  if lengths is not None and mask is not None:
    raise ValueError("pass at most one of lengths [B] and mask [B, T]; got both.")
  if lengths is not None:
    _checks.check_shape("lengths", lengths, batch_shape, " (one length per sequence)")
    _checks.check_int("lengths", lengths)
  if mask is not None:
    _checks.check_shape("mask", mask, (*batch_shape, t), " (True at the valid steps)")

  batched = len(batch_shape) == 1
  xs3 = xs if batched else xs[None]
  b = xs3.shape[0]
  if h0 is None:
    h0 = jnp.zeros((b, h), jnp.result_type(xs3, params["U"]))
  elif not batched:
    h0 = h0[None]
  if lengths is not None:
    mask = jnp.arange(t)[None, :] < jnp.reshape(jnp.asarray(lengths), (b, 1))
  elif mask is not None:
    mask = jnp.reshape(jnp.asarray(mask, bool), (b, t))
  mask_tm = None if mask is None else mask.T

  # Imported here: the engine modules import jaxrnn.cells, which exports this cell.
  from jaxrnn.backward import recurrence
  from jaxrnn.scan import project, recurrent_scan
  a = project(params, xs3)                       # U x_t; the scans add b (parallel_scan: here)
  if impl == "parallel":
    hs, (h_T,) = parallel_scan(add_bias(a, params["b"]), (h0,), mask_tm, backward=backward)
  elif backward == "manual":
    hs, (h_T,) = recurrence(mingru(), params, a, (h0,), mask_tm, 1)
  else:
    hs, (h_T,), _ = recurrent_scan(mingru(), params, a, (h0,), mask_tm)
  hs = jnp.swapaxes(hs, 0, 1)
  return (hs, h_T) if batched else (hs[0], h_T[0])
