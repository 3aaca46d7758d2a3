"""Unrolling a cell in time with `jax.lax.scan`: the forward pass every path shares.

Shape legend: `B` batch, `T` time, `D` input, `H` hidden, `G = num_blocks * H`.
Inside this module sequences are *time-major* (`[T, B, ...]`), the layout `lax.scan` slices.

Why the work is split the way it is: the scan body runs `T` times in sequence, so each op left in
it pays a per-step dispatch cost and sees only a `[B, H]` slice. Everything that does not depend on
`h_{t-1}` is therefore done outside it as one large contraction over all `B x T` positions: the
input projection `U x` before the scan (`project`), the readout `V h + c` after it (in the
callers). The scan body holds only `W h_{t-1}` and the cell's elementwise gates, into which the
biases `b` and `bh` fuse at no extra cost.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxrnn.cells.base import Carry, Cell, add_bias, einsum, recurrent_projector


class Saved(NamedTuple):
  """What the manual backward pass needs from the forward pass.

  Attributes:
    carries: the carry after every step, a tuple of `[T, B, H]` (with a mask: after blending).
    res: the cell's residuals for every step, `[T, B, ...]` (e.g. LSTM gates).
  """
  carries: Carry
  res: Any


def project(params: dict, xs: jax.Array) -> jax.Array:
  """The input projection `U x_t` for all steps at once, as one matmul.

  The bias `b` is *not* added here: `recurrent_scan` adds it to `a_t` inside the scan body, where
  it fuses into the gate arithmetic for free (added here it was a separate pass over the whole
  `[T, B, G]` array; see experiments/PERF_NOTES.md).

  Args:
    params: with `U [G, D]`.
    xs: `[B, T, D]` batch-first inputs.

  Returns:
    `[T, B, G]`, time-major, ready for `recurrent_scan`.
  """
  return project_time_major(params, jnp.swapaxes(xs, 0, 1))


def project_time_major(params: dict, xs: jax.Array, matmul_dtype=None) -> jax.Array:
  """`project` for time-major inputs: `xs [T, B, D] -> U x [T, B, G]` (no bias); with
  `matmul_dtype`, the operands in that dtype and the result in theirs.

  On batch-first inputs, `einsum("btd,gd->tbg")` made XLA (CPU) compute a `[G, B T]` product and
  transpose the `[T, B, G]` result twice; transposing `x` (`D` wide) first is cheaper. (An explicit
  `[T B, D] x [D, G]` matmul measured slower than this einsum: XLA picks better layouts for it.)
  """
  return einsum("tbd,gd->tbg", xs, params["U"], matmul_dtype)


def recurrent_scan(cell: Cell, params: dict, a: jax.Array, carry0: Carry,
                   mask: Optional[jax.Array] = None, *, unroll: int = 1, matmul_dtype=None
                   ) -> tuple[jax.Array, Carry, Saved]:
  """Run `cell` over the pre-projected inputs `a`: the sequential core of every layer.

  A pure-Python reference of what it computes::

    carry = carry0
    for t in range(T):
      new, res[t] = cell.pointwise(a[t] + b, W @ carry.h + bh, carry)
      carry = new where mask[t] else carry     # a masked step leaves the state unchanged
      hs[t] = carry.h where mask[t] else 0     # and outputs zeros

  Args:
    cell: the cell.
    params: its params; only `W [G, H]`, the optional `bh [G]` and the optional input bias
      `b [G]` are used here (`b` is added to `a_t` in the body: `a` comes from `project`).
    a: `[T, B, G]` input projections `U x_t` from `project` (without `b`).
    carry0: tuple of `[B, H]`, the initial state.
    mask: `[T, B]` booleans, or None (every step valid).
    unroll: passed to `lax.scan`.
    matmul_dtype: None, or the dtype of the `W h` operands (e.g. `jnp.bfloat16`; products
      accumulated in float32, everything else unchanged).

  Returns:
    `(hs [T, B, H], carry_T, saved)`: outputs, final carry (the state after the last valid step),
    and the `Saved` residuals for the manual backward pass.
  """
  project_h = recurrent_projector(params, matmul_dtype)
  bias = params.get("b")

  def body(carry, inputs):
    a_t, m_t = inputs
    if bias is not None:
      a_t = add_bias(a_t, bias)
    new, res = cell.pointwise(a_t, project_h(carry[0]), carry)
    if m_t is not None:
      new = tuple(jnp.where(m_t[:, None], n, o) for n, o in zip(new, carry))
    return new, (new, res)

  carry_T, (carries, res) = jax.lax.scan(body, tuple(carry0), (a, mask), unroll=unroll)
  hs = carries[0] if mask is None else jnp.where(mask[..., None], carries[0], 0)
  return hs, carry_T, Saved(carries, res)
