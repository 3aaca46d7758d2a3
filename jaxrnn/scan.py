"""Unrolling a cell in time with `jax.lax.scan`: the forward pass every path shares.

Shape legend: `B` batch, `T` time, `D` input, `H` hidden, `G = num_blocks * H`.
Inside this module sequences are *time-major* (`[T, B, ...]`), the layout `lax.scan` slices.

Why the work is split the way it is: the scan body runs `T` times in sequence, so each op left in
it pays a per-step dispatch cost and sees only a `[B, H]` slice. Everything that does not depend on
`h_{t-1}` is therefore done outside it as one large contraction over all `B x T` positions: the
input projection `a = U x + b` before the scan (`project`), the readout `V h + c` after it (in the
callers). The scan body holds only `W h_{t-1}` and the cell's elementwise gates.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxrnn.cells.base import Carry, Cell, add_bias, recurrent_projector


class Saved(NamedTuple):
  """What the manual backward pass needs from the forward pass.

  Attributes:
    carries: the carry after every step, a tuple of `[T, B, H]` (with a mask: after blending).
    res: the cell's residuals for every step, `[T, B, ...]` (e.g. LSTM gates).
  """
  carries: Carry
  res: Any


def project(params: dict, xs: jax.Array) -> jax.Array:
  """The input projection `a_t = U x_t + b` for all steps at once.

  Args:
    params: with `U [G, D]`, `b [G]`.
    xs: `[B, T, D]` batch-first inputs.

  Returns:
    `[T, B, G]`, time-major, ready for `recurrent_scan`.
  """
  return add_bias(jnp.einsum("btd,gd->tbg", xs, params["U"]), params["b"])


def recurrent_scan(cell: Cell, params: dict, a: jax.Array, carry0: Carry,
                   mask: Optional[jax.Array] = None, *, unroll: int = 1
                   ) -> tuple[jax.Array, Carry, Saved]:
  """Run `cell` over the pre-projected inputs `a`: the sequential core of every layer.

  A pure-Python reference of what it computes::

    carry = carry0
    for t in range(T):
      new, res[t] = cell.pointwise(a[t], W @ carry.h + bh, carry)
      carry = new where mask[t] else carry     # a masked step leaves the state unchanged
      hs[t] = carry.h where mask[t] else 0     # and outputs zeros

  Args:
    cell: the cell.
    params: its params; only `W [G, H]` and the optional `bh [G]` are used here.
    a: `[T, B, G]` input projections from `project`.
    carry0: tuple of `[B, H]`, the initial state.
    mask: `[T, B]` booleans, or None (every step valid).
    unroll: passed to `lax.scan`.

  Returns:
    `(hs [T, B, H], carry_T, saved)`: outputs, final carry (the state after the last valid step),
    and the `Saved` residuals for the manual backward pass.
  """
  project_h = recurrent_projector(params)

  def body(carry, inputs):
    a_t, m_t = inputs
    new, res = cell.pointwise(a_t, project_h(carry[0]), carry)
    if m_t is not None:
      new = tuple(jnp.where(m_t[:, None], n, o) for n, o in zip(new, carry))
    return new, (new, res)

  carry_T, (carries, res) = jax.lax.scan(body, tuple(carry0), (a, mask), unroll=unroll)
  hs = carries[0] if mask is None else jnp.where(mask[..., None], carries[0], 0)
  return hs, carry_T, Saved(carries, res)
