"""Linear (affine) recurrences in `O(log T)` depth with `jax.lax.associative_scan`.

Shape legend: `T` time, `B` batch, `H` hidden; time-major `[T, B, H]` as in `jaxrnn.scan`.

A recurrence whose new state is an *affine, elementwise* function of the old one::

  h_t = a_t * h_{t-1} + b_t                      a_t, b_t [B, H] known for every t up front

is a composition of the maps `f_t(h) = a_t h + b_t`, and composition is associative::

  (f_2 o f_1)(h) = (a_2 a_1) h + (a_2 b_1 + b_2)       i.e. (a_1, b_1) . (a_2, b_2) = that pair

so all prefixes `f_t o ... o f_1` come out of one associative scan: `O(T)` work in `O(log T)`
sequential depth, against the `T` dependent steps of `lax.scan`. minGRU (`jaxrnn.cells.mingru`)
is such a recurrence; the gradient of one is the same kind of recurrence run backwards in time
(`dL/dh_{t-1} = a_t dL/dh_t + ...`), so the backward pass is a reverse `affine_scan` too.

Numerics: the pairs are combined by products and sums only, never divided, so there is no need for
the log-space formulation that cumulative-sum ("Heinsen") scans use to avoid dividing by vanishing
prefix products; a product of decays in `(0, 1)` simply underflows towards 0, its true limit.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxrnn import _checks


def _compose(earlier, later):
  """`later o earlier` for pairs `(a, b)` of `[..., B, H]`: `(a_l a_e, a_l b_e + b_l)`."""
  a_e, b_e = earlier
  a_l, b_l = later
  return a_l * a_e, a_l * b_e + b_l


def affine_scan(a: jax.Array, b: jax.Array, h0: Optional[jax.Array] = None, *,
                reverse: bool = False) -> jax.Array:
  """All states of `h_t = a_t * h_{t-1} + b_t` by an associative scan over time (axis 0).

  `affine_scan :: [T, B, H] -> [T, B, H] -> [B, H] -> [T, B, H]`. A pure-Python reference::

    h = h0
    for t in range(T):                   # reverse=True: for t in reversed(range(T))
      h = a[t] * h + b[t]
      hs[t] = h

  Args:
    a: `[T, B, H]` (any `[T, ...]`) decays, the multiplicative part of each step.
    b: `[T, B, H]`, the additive part; same shape and dtype as `a`.
    h0: `[B, H]`, the state before the first step (before `t = T-1` if `reverse`); zeros if None.
    reverse: run from `t = T-1` down to 0 (what a backward pass needs).

  Returns:
    `hs [T, B, H]`, the state after every step.

  Example:
    >>> a = jnp.full((4, 1, 1), 0.5); b = jnp.ones((4, 1, 1))
    >>> affine_scan(a, b)[:, 0, 0]         # 1, 1.5, 1.75, 1.875
  """
  if _checks.shape_of(a) != _checks.shape_of(b) or len(_checks.shape_of(a)) < 1:
    raise ValueError(f"a and b must have the same shape [T, ...]; got a {list(jnp.shape(a))} and "
                     f"b {list(jnp.shape(b))}.")
  if h0 is not None:
    _checks.check_shape("h0", h0, _checks.shape_of(a)[1:], " (a's shape without the time axis)")
    # Fold h0 into the first map applied: f_first(h0) is a constant, i.e. the map (0, a h0 + b).
    first = 0 if not reverse else -1
    b = b.at[first].add(a[first] * h0)
  _, hs = jax.lax.associative_scan(_compose, (a, b), reverse=reverse, axis=0)
  return hs
