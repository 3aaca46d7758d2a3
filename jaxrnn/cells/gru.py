"""The GRU cell, with PyTorch's equations and gate order (r, z, n).

.. math::
   r_t = \\sigma(a^r_t + r^r_t), \\qquad z_t = \\sigma(a^z_t + r^z_t)

   n_t = \\tanh(a^n_t + r_t \\odot r^n_t), \\qquad h_t = (1 - z_t) \\odot n_t + z_t \\odot h_{t-1}

with `a_t = U x_t + b` and `r_t = W h_{t-1} + bh` stacked as `[r | z | n]`; note the reset gate
multiplies `W_hn h_{t-1} + b_hn`, which is why the GRU keeps two biases (Cho et al. 2014, in
PyTorch's and cuDNN's variant). `U [3H, D]`, `W [3H, H]`, `b [3H]`, `bh [3H]` are PyTorch's
`weight_ih`, `weight_hh`, `bias_ih`, `bias_hh`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrnn.cells.base import Cell, torch_style_init


@functools.cache
def gru() -> Cell:
  """The GRU cell. Init: PyTorch's default, uniform(-1/sqrt(H), 1/sqrt(H))."""

  def init(key, input_size, hidden_size, dtype=jnp.float32):
    return torch_style_init(key, 3, input_size, hidden_size, dtype)

  def pointwise(a, rec, carry):
    (h_prev,) = carry
    hidden = h_prev.shape[-1]
    # One sigmoid over the full [B, 3H] width (its n block is unused): XLA (CPU) runs a full-width
    # elementwise pass at vector speed, while one fusion doing the sliced r, z and n arithmetic
    # together ran unvectorised: 59 vs 22 us per step at B=32, H=128 (experiments/PERF_NOTES.md).
    # Residuals: s [B, 3H] (r, z in its first two blocks), n [B, H], rec_n = W_hn h + b_hn [B, H].
    s = jax.nn.sigmoid(a + rec)
    r, z = s[..., :hidden], s[..., hidden:2 * hidden]
    rec_n = rec[..., 2 * hidden:]
    n = jnp.tanh(a[..., 2 * hidden:] + r * rec_n)
    h = (1 - z) * n + z * h_prev
    return (h,), (s, n, rec_n)

  def pointwise_bwd(res, carry_prev, carry, d_carry):
    del carry
    (h_prev,), (dh,) = carry_prev, d_carry
    s, n, rec_n = res
    hidden = n.shape[-1]
    r, z = s[..., :hidden], s[..., hidden:2 * hidden]
    d_pre_n = dh * (1 - z) * (1 - n * n)
    d_pre_r = d_pre_n * rec_n * r * (1 - r)
    d_pre_z = dh * (h_prev - n) * z * (1 - z)
    d_a = jnp.concatenate([d_pre_r, d_pre_z, d_pre_n], axis=-1)
    d_rec = jnp.concatenate([d_pre_r, d_pre_z, d_pre_n * r], axis=-1)
    return d_a, d_rec, (dh * z,)

  pointwise.native_kernel = "gru"  # what jaxrnn/kernels/cells_cpu.cc implements
  return Cell("gru", 3, 1, init, pointwise, pointwise_bwd, kernel="gru")
