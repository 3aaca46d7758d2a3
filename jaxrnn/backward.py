"""Manual backpropagation through time for every cell (the seed's sections 3.3-3.4).

Shape legend: `B` batch, `T` time, `H` hidden, `G = num_blocks * H`; time-major `[T, B, ...]`.

The backward pass is a reverse `lax.scan` that carries `dL/dcarry_t` and, at each step, applies the
cell's hand-derived `pointwise_bwd` and the recurrent Jacobian: `dL/dh_{t-1}` receives
`(dL/dr_t) @ W`, which for the Elman cell is the seed's `dh_t/dh_{t-1} = diag(f'(z_t)) W`. The scan
emits only the per-step deltas; the weight gradients are then single contractions over all
`B x T` positions (`dW = sum_t delta_t h_{t-1}^T` as one einsum), because a matmul per step inside
the scan would pay the sequential per-step cost for work that has no sequential dependence.

`recurrence` wraps forward and manual backward in `jax.custom_vjp`, so `jax.grad` of any layer
built on it takes this path; no `jax.grad`/`jax.vjp` is used for the library's own cells.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn import kernels
from jaxrnn.cells.base import Carry, Cell, add_bias, einsum, matmul, readout, recurrent_projector
from jaxrnn.scan import Saved, project_time_major, recurrent_scan


def _shift_prev(carry0: Carry, carries: Carry) -> Carry:
  """`carry_{t-1}` for every t: `[carry0, carries[0], ..., carries[T-2]]`."""
  return tuple(jnp.concatenate([c0[None], cs[:-1]], axis=0) for c0, cs in zip(carry0, carries))


def _pointwise_bwd(cell: Cell):
  if cell.pointwise_bwd is not None:
    return cell.pointwise_bwd

  def via_vjp(res, carry_prev, carry, d_carry, a, r):  # user cells without a hand-written backward
    del res, carry
    _, pullback = jax.vjp(lambda a_, r_, c_: cell.pointwise(a_, r_, c_)[0], a, r, carry_prev)
    return pullback(tuple(d_carry))
  return via_vjp


def recurrent_scan_bwd(cell: Cell, params: dict, a: jax.Array, carry0: Carry,
                       mask: Optional[jax.Array], saved: Saved, d_hs: jax.Array,
                       d_carry_T: Carry, *, unroll: int = 1, matmul_dtype=None
                       ) -> tuple[dict, jax.Array, Carry]:
  """The reverse of `recurrent_scan`.

  Args:
    cell, params, a, carry0, mask: as given to `recurrent_scan`.
    saved: its `Saved` residuals.
    d_hs: `[T, B, H]`, `dL/dhs` (the cotangent of the outputs).
    d_carry_T: tuple of `[B, H]`, the cotangent of the final carry (zeros if unused).
    unroll, matmul_dtype: as given to `recurrent_scan` (the backward's matmuls, `d_r W` in the
      loop and the weight gradient after it, take their operands in `matmul_dtype` too).

  Returns:
    `(d_rec_params, d_a [T, B, G], d_carry0)`, where `d_rec_params` has the gradients of the
    entries of `params` the scan used: `W`, `bh`, `b` where present.
  """
  W = params.get("W")  # None for a cell with recurrent_weights=False (minGRU)
  W_mm = W if W is None or matmul_dtype is None else W.astype(matmul_dtype)  # cast once
  bwd = _pointwise_bwd(cell)
  needs_a = cell.pointwise_bwd is None
  carries_prev = _shift_prev(carry0, saved.carries)
  r_all = None
  if needs_a:
    r_all = recurrent_projector(params, matmul_dtype)(carries_prev[0])
    if "b" in params:  # the pre-activation input the forward's pointwise saw
      a = add_bias(a, params["b"])

  def body(d_carry, inputs):
    d_h, m_t, res, prev, cur, a_t, r_t = inputs
    if m_t is not None:
      d_h = jnp.where(m_t[:, None], d_h, 0)
    d_total = (d_carry[0] + d_h,) + tuple(d_carry[1:])
    if m_t is not None:  # a masked step copied the carry through unchanged
      d_new = tuple(jnp.where(m_t[:, None], d, 0) for d in d_total)
      d_skip = tuple(jnp.where(m_t[:, None], 0, d) for d in d_total)
    else:
      d_new = d_total
    if needs_a:
      d_a, d_r, d_prev = bwd(res, prev, cur, d_new, a_t, r_t)
    else:
      d_a, d_r, d_prev = bwd(res, prev, cur, d_new)
    d_r = d_a if d_r is None else d_r
    if W is not None:
      d_prev = (d_prev[0] + matmul(d_r, W_mm, matmul_dtype),) + tuple(d_prev[1:])
    if m_t is not None:
      d_prev = tuple(p + s for p, s in zip(d_prev, d_skip))
    return d_prev, (d_a, d_r if d_r is not d_a else None)

  inputs = (d_hs, mask, saved.res, carries_prev, saved.carries, a if needs_a else None, r_all)
  d_carry0, (d_a, d_r) = jax.lax.scan(body, tuple(d_carry_T), inputs, reverse=True,
                                      unroll=unroll)
  d_r = d_a if d_r is None else d_r
  # Weight gradients: single contractions over all B x T positions, outside the scan.
  d_rec = {}
  if "b" in params:
    d_rec["b"] = jnp.sum(d_a, axis=(0, 1))
  if W is not None:
    d_rec["W"] = einsum("tbg,tbh->gh", d_r, carries_prev[0], matmul_dtype)
    if "bh" in params:
      d_rec["bh"] = jnp.sum(d_r, axis=(0, 1))
  return d_rec, d_a, d_carry0


SCAN_PARAMS = ("W", "bh", "b")  # the entries of a cell's params that `recurrent_scan` reads


def recurrence(cell: Cell, params: dict, a: jax.Array, carry0: Carry,
               mask: Optional[jax.Array], unroll: int = 1, matmul_dtype=None
               ) -> tuple[jax.Array, Carry]:
  """`recurrent_scan` whose gradient is the manual backward pass (via `jax.custom_vjp`).

  Args:
    cell: the cell (static).
    params: the cell's params (other entries, e.g. `U` or a readout, are ignored and get zero
      gradient): `W [G, H]` and `bh [G]` where the cell has them, and the input bias `b [G]`,
      added to `a_t` inside the scan.
    a: `[T, B, G]` input projections `U x_t` (without `b`).
    carry0: tuple of `[B, H]`.
    mask: `[T, B]` booleans or None.
    unroll: static `lax.scan` unroll.
    matmul_dtype: static; None or the dtype of every matmul's operands, forward and backward
      (a `np.dtype`, e.g. from `jnp.dtype(jnp.bfloat16)`; products accumulated in float32).

  Returns:
    `(hs [T, B, H], carry_T)`.
  """
  scan_params = {k: params[k] for k in SCAN_PARAMS if k in params}
  return _recurrence(cell, scan_params, a, carry0, mask, unroll, matmul_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5, 6))
def _recurrence(cell, scan_params, a, carry0, mask, unroll, matmul_dtype):
  hs, carry_T, _ = recurrent_scan(cell, scan_params, a, carry0, mask, unroll=unroll,
                                  matmul_dtype=matmul_dtype)
  return hs, carry_T


def _recurrence_fwd(cell, rec_params, a, carry0, mask, unroll, matmul_dtype):
  hs, carry_T, saved = recurrent_scan(cell, rec_params, a, carry0, mask, unroll=unroll,
                                      matmul_dtype=matmul_dtype)
  return (hs, carry_T), (rec_params, a, carry0, mask, saved)


def _recurrence_bwd(cell, unroll, matmul_dtype, residuals, cotangents):
  rec_params, a, carry0, mask, saved = residuals
  d_hs, d_carry_T = cotangents
  d_rec, d_a, d_carry0 = recurrent_scan_bwd(cell, rec_params, a, carry0, mask, saved, d_hs,
                                            d_carry_T, unroll=unroll, matmul_dtype=matmul_dtype)
  return d_rec, d_a, d_carry0, None


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def input_recurrence(cell: Cell, params: dict, xs: jax.Array, carry0: Carry,
                     mask: Optional[jax.Array], unroll: int = 1, matmul_dtype=None
                     ) -> tuple[jax.Array, Carry]:
  """`recurrence` with the input projection: `xs [T, B, D]` (time-major) -> `(hs [T, B, H],
  carry_T)`, differentiable through the manual backward pass, with respect to `xs` too.

  Where `jaxrnn.kernels.applies` (the Elman cell, LSTM or GRU, float32, no mask, `H % 16 == 0` (64
  for the Elman cell), a C++ compiler on the machine) and the trace is lowered for CPU, the forward
  and backward loops are the native ones of `jaxrnn.kernels`, which fuse `U x_t` into the step's
  GEMM; otherwise (and on GPU/TPU, chosen by `lax.platform_dependent` at lowering) this is
  `project_time_major` + `recurrence`.

  Args:
    cell, carry0, mask, unroll, matmul_dtype: as for `recurrence`.
    params: the cell's params, `U [G, D]` included.
    xs: `[T, B, D]`.
  """
  if not kernels.applies(cell, params, xs, carry0, mask, matmul_dtype):
    a = project_time_major(params, xs, matmul_dtype)
    return recurrence(cell, params, a, carry0, mask, unroll, matmul_dtype)
  family, activation = kernels.kernel_name(cell)
  native = {"lstm": _native_lstm, "gru": _native_gru,
            "elman": functools.partial(_native_elman, activation)}[family]
  scan = functools.partial(_scan_path, cell, unroll)
  cell_params = {k: params[k] for k in ("U", "W", "b", "bh") if k in params}
  return jax.lax.platform_dependent(cell_params, xs, tuple(carry0), cpu=native, default=scan)


def _scan_path(cell, unroll, params, xs, carry0):
  a = project_time_major(params, xs)
  return recurrence(cell, params, a, carry0, None, unroll)


# The native loops. Residuals: the forward's states and gates. The backward's transposed
# pre-activation gradients, one `[H, T, B]` array per gate block, feed the weight-gradient GEMMs as
# stored (as `[H, T B] @ [T B, .]`; jaxrnn/kernels/cells_cpu.cc), where XLA would transpose a
# row-major one. They come rolled by one step: column s holds step s + 1's (and the last column
# step 0's), which pairs them with `hs[s] = h_s`, the state their step read, as they are, and with
# the input `x_{s+1}`: the recurrent weights' gradient needs no shifted `[T, B, H]` copy of `hs`
# (26 MB per large step), only the `[T, B, D]` input rolled, and a correction for the wrapped
# column (step 0 read `h_0`, not `h_{T-1}`).

def _rolled_grads(d, x_next, hs, h0):
  """`(d x, d h_prev)` for a rolled gradient piece `d [k H, T B]`: `x_next [T B, D]` is the input
  rolled back a step, `h_prev` the states shifted (`h_{t-1}`), which `hs [T, B, H]` and `h0 [B, H]`
  give without a copy: `d hs + d_0 (h_0 - h_{T-1})`, `d_0` the last `B` columns (step 0's)."""
  T, B = hs.shape[:2]
  return d @ x_next, d @ hs.reshape(-1, hs.shape[-1]) + d[:, (T - 1) * B:] @ (h0 - hs[-1])


def _unroll_inputs_grad(d_xs, shape):
  """`d_xs` from rolled pieces (`[T B, D]`, row block s for step s + 1) -> `[T, B, D]` by step."""
  return jnp.roll(d_xs.reshape(shape), 1, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _native_elman(activation, params, xs, carry0):
  return _native_elman_fwd(activation, params, xs, carry0)[0]


def _native_elman_fwd(activation, params, xs, carry0):
  (h0,) = carry0
  bias = params["b"] + params["bh"] if "bh" in params else params["b"]
  hs = kernels.elman_forward(xs, params["U"], params["W"], bias, h0, activation)
  return (hs, (hs[-1],)), (params, xs, h0, hs)


def _flat(pieces):
  """Gradient pieces `[k H, T, B]` as `[k H, T B]` (free: a reshape of gate-major arrays)."""
  return [d.reshape(d.shape[0], -1) for d in pieces]


def _weight_grads(params, xs, h0, hs, d_pieces, db):
  """The Elman cell's and the LSTM's gradients of `U, W, b, bh` and of `xs` from their loops'
  transposed pre-activation gradients `dL/da_t = dL/dr_t`, as the loop left them: one or more
  gate-major pieces `[k H, T, B]`, rolled (together `[H, T, B]`, or `[4H, T, B]`:
  `jaxrnn.kernels.pieces`), and `db [G]`, their rows summed over all `T B` positions (by the
  loop). Each weight gradient a GEMM over all `T B` positions per piece, on the pieces as stored.
  (The GRU's `dL/da` and `dL/dr` differ in their n block: it has its own.)"""
  d_a = _flat(d_pieces)
  x_next = jnp.roll(xs, -1, axis=0).reshape(-1, xs.shape[-1])      # x_{s+1 mod T}
  dU, dW = zip(*[_rolled_grads(d, x_next, hs, h0) for d in d_a])
  d_params = {"U": jnp.concatenate(dU), "W": jnp.concatenate(dW), "b": db}
  if "bh" in params:
    d_params["bh"] = db
  rows = np.cumsum([0] + [d.shape[0] for d in d_a])
  d_xs = sum(d.T @ params["U"][r:r + d.shape[0]] for r, d in zip(rows, d_a))
  return d_params, _unroll_inputs_grad(d_xs, xs.shape)


def _native_elman_bwd(activation, residuals, cotangents):
  d_hs, d_carry_T = cotangents
  return _elman_grads(activation, residuals, d_hs, d_carry_T)


def _elman_grads(activation, residuals, d_hs, d_carry_T, readout=None):
  params, xs, h0, hs = residuals
  (dh_T,) = d_carry_T
  e, dh0, db = kernels.elman_backward(params["W"], hs, d_hs, dh_T, activation, readout)
  return (*_weight_grads(params, xs, h0, hs, (e,), db), (dh0,))


_native_elman.defvjp(_native_elman_fwd, _native_elman_bwd)


@jax.custom_vjp
def _native_lstm(params, xs, carry0):
  return _native_lstm_fwd(params, xs, carry0)[0]


def _native_lstm_fwd(params, xs, carry0):
  hs, cs, s = kernels.lstm_forward(xs, params["U"], params["W"], params["b"] + params["bh"],
                                   *carry0)
  return (hs, (hs[-1], cs[-1])), (params, xs, carry0, hs, cs, s)


def _native_lstm_bwd(residuals, cotangents):
  d_hs, d_carry_T = cotangents
  return _lstm_grads(residuals, d_hs, d_carry_T)


def _lstm_grads(residuals, d_hs, d_carry_T, readout=None):
  params, xs, (h0, c0), hs, cs, s = residuals
  d_a, dh0, dc0, db = kernels.lstm_backward(params["W"], s, cs, c0, d_hs, *d_carry_T, readout)
  return (*_weight_grads(params, xs, h0, hs, d_a, db), (dh0, dc0))


_native_lstm.defvjp(_native_lstm_fwd, _native_lstm_bwd)


@jax.custom_vjp
def _native_gru(params, xs, carry0):
  return _native_gru_fwd(params, xs, carry0)[0]


def _native_gru_fwd(params, xs, carry0):
  (h0,) = carry0
  hs, res = kernels.gru_forward(xs, params["U"], params["W"], params["b"], params["bh"], h0)
  return (hs, (hs[-1],)), (params, xs, h0, hs, res)


def _native_gru_bwd(residuals, cotangents):
  d_hs, d_carry_T = cotangents
  return _gru_grads(residuals, d_hs, d_carry_T)


def _gru_grads(residuals, d_hs, d_carry_T, readout=None):
  params, xs, h0, hs, res = residuals
  (dh_T,) = d_carry_T
  hidden = hs.shape[-1]
  d_pieces, dh0, sums = kernels.gru_backward(params["W"], res, hs, h0, d_hs, dh_T, readout)
  x, U = jnp.roll(xs, -1, axis=0).reshape(-1, xs.shape[-1]), params["U"]   # x_{s+1 mod T}
  *d_rec, d_n = _flat(d_pieces)   # d_rec: [d_r | d_z | d_n r] whole, or one piece per block
  dU_rec, dW = zip(*[_rolled_grads(d, x, hs, h0) for d in d_rec])
  if len(d_rec) == 1:
    # U and b take [d_r | d_z | d_n]: the GEMM over d_rec's three blocks, then its n r rows
    # dropped (cheaper than a copy of d_rec's first two blocks), and d_n's own.
    (d_rec3,) = d_rec
    dU_rz = dU_rec[0][:2 * hidden]
    U_rz = jnp.concatenate([U[:2 * hidden], jnp.zeros_like(U[:hidden])])
    d_xs = d_rec3.T @ U_rz + d_n.T @ U[2 * hidden:]
  else:
    d_r, d_z, _ = d_rec
    dU_rz = jnp.concatenate(dU_rec[:2])
    d_xs = d_r.T @ U[:hidden] + d_z.T @ U[hidden:2 * hidden] + d_n.T @ U[2 * hidden:]
  d_params = {"U": jnp.concatenate([dU_rz, d_n @ x]), "W": jnp.concatenate(dW),
              "b": jnp.concatenate([sums[:2 * hidden], sums[3 * hidden:]]),
              "bh": sums[:3 * hidden]}
  return d_params, _unroll_inputs_grad(d_xs, xs.shape), (dh0,)


_native_gru.defvjp(_native_gru_fwd, _native_gru_bwd)


# The readout fused into the native backward loops: `z_t = V h_t + c` of the top (and only)
# layer, as `jaxrnn.rnn.loss` applies it. The loop adds `dL/dz_t V` to each step's state gradient
# itself (`kernels.READOUT_MAX_BYTES`), so the step never writes `d_hs [T, B, H]`.

def input_recurrence_readout(cell: Cell, params: dict, V: jax.Array, c: jax.Array,
                             xs: jax.Array, carry0: Carry, unroll: int = 1
                             ) -> tuple[jax.Array, Carry]:
  """`input_recurrence` and the readout (`cells.base.readout`): `xs [T, B, D]` (time-major) ->
  `(z [T, B, O], carry_T)`, `z_t = V h_t + c` (`V [O, H]`, `c [O]`), differentiable with respect
  to every argument; `hs` itself is not returned (nothing downstream may read it).

  Where `kernels.applies` and `kernels.readout_fuses(O, H)` (callers check both), on CPU the
  native backward loop takes `dL/dz` and `V` in place of `d_hs`; elsewhere
  (`lax.platform_dependent`) the `lax.scan` path and the readout."""
  family, activation = kernels.kernel_name(cell)
  native = functools.partial(_native_readout, family, activation)
  cell_params = {k: params[k] for k in ("U", "W", "b", "bh") if k in params}

  def scan(params, V, c, xs, carry0):
    hs, carry_T = _scan_path(cell, unroll, params, xs, carry0)
    return readout(hs, V, c), carry_T

  return jax.lax.platform_dependent(cell_params, V, c, xs, tuple(carry0), cpu=native,
                                    default=scan)


# Each family's forward and gradients as `(activation, ...)` (the LSTM and GRU take none).
_NATIVE_FWD = {"elman": _native_elman_fwd, "lstm": lambda _, *args: _native_lstm_fwd(*args),
               "gru": lambda _, *args: _native_gru_fwd(*args)}
_NATIVE_GRADS = {"elman": _elman_grads, "lstm": lambda _, *args: _lstm_grads(*args),
                 "gru": lambda _, *args: _gru_grads(*args)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _native_readout(family, activation, params, V, c, xs, carry0):
  return _native_readout_fwd(family, activation, params, V, c, xs, carry0)[0]


def _native_readout_fwd(family, activation, params, V, c, xs, carry0):
  (hs, carry_T), residuals = _NATIVE_FWD[family](activation, params, xs, carry0)
  return (readout(hs, V, c), carry_T), (residuals, V, hs)


def _native_readout_bwd(family, activation, residuals, cotangents):
  residuals, V, hs = residuals
  d_z, d_carry_T = cotangents
  # A 2-D GEMM over the T B rows: einsum's "tbo,tbh->oh" contracted (b, t) and transposed both
  # operands first (a 26 MB copy of hs per large step).
  d_V = d_z.reshape(-1, d_z.shape[-1]).T @ hs.reshape(-1, hs.shape[-1])
  d_params, d_xs, d_carry0 = _NATIVE_GRADS[family](activation, residuals, None, d_carry_T,
                                                   (d_z, V))
  return d_params, d_V, jnp.sum(d_z, axis=(0, 1)), d_xs, d_carry0


_native_readout.defvjp(_native_readout_fwd, _native_readout_bwd)
