"""The LSTM cell, with PyTorch's equations, gate order (i, f, g, o) and two biases.

.. math::
   i_t = \\sigma(a^i_t + r^i_t),\\; f_t = \\sigma(a^f_t + r^f_t),\\;
   g_t = \\tanh(a^g_t + r^g_t),\\; o_t = \\sigma(a^o_t + r^o_t)

   c_t = f_t \\odot c_{t-1} + i_t \\odot g_t, \\qquad h_t = o_t \\odot \\tanh(c_t)

with `a_t = U x_t + b` and `r_t = W h_{t-1} + bh` stacked as `[i | f | g | o]`, so `U [4H, D]`,
`W [4H, H]`, `b [4H]`, `bh [4H]` are PyTorch's `weight_ih`, `weight_hh`, `bias_ih`, `bias_hh`
(Hochreiter & Schmidhuber 1997; Gers et al. 2000 for the forget gate).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrnn.cells.base import Cell, torch_style_init


@functools.cache
def lstm(forget_bias: float = 0.0) -> Cell:
  """The LSTM cell.

  Init: PyTorch's default, uniform(-1/sqrt(H), 1/sqrt(H)) for every weight and bias; then
  `forget_bias` is *added* to the forget block of `b` (Jozefowicz et al. 2015 recommend 1.0; the
  default 0.0 keeps PyTorch's init exactly).
  """

  def init(key, input_size, hidden_size, dtype=jnp.float32):
    params = torch_style_init(key, 4, input_size, hidden_size, dtype)
    if forget_bias:
      # The forget gate is the second block (i, f, g, o).
      params["b"] = params["b"].at[hidden_size:2 * hidden_size].add(forget_bias)
    return params

  def gates(s, hidden):
    """`(i, f, g, o)` from `s = sigmoid(scale * z)`, with `g = tanh(z_g) = 2 sigmoid(2 z_g) - 1`."""
    i, f, s_g, o = (s[..., k * hidden:(k + 1) * hidden] for k in range(4))
    return i, f, 2 * s_g - 1, o

  def pointwise(a, r, carry):
    _, c_prev = carry
    hidden = c_prev.shape[-1]
    # One sigmoid over all four blocks (the g block pre-scaled by 2, since tanh(x) = 2 sigmoid(2x)
    # - 1): one elementwise pass instead of four, and `s` alone is the residual the backward needs.
    scale = jnp.repeat(jnp.array([1, 1, 2, 1], a.dtype), hidden)
    s = jax.nn.sigmoid((a + r) * scale.reshape((1,) * (a.ndim - 1) + (-1,)))
    i, f, g, o = gates(s, hidden)
    c = f * c_prev + i * g
    h = o * jnp.tanh(c)
    return (h, c), s

  def pointwise_bwd(s, carry_prev, carry, d_carry):
    _, c_prev = carry_prev
    _, c = carry
    dh, dc = d_carry
    i, f, g, o = gates(s, c.shape[-1])
    tanh_c = jnp.tanh(c)
    dc = dc + dh * o * (1 - tanh_c * tanh_c)
    # d(pre-activation) = d(gate) * sigmoid'(.) for i, f, o; for g, dg * (1 - g^2) = 4 dg s(1 - s).
    d_gate = jnp.concatenate([dc * g, dc * c_prev, 4 * dc * i, dh * tanh_c], axis=-1)
    return d_gate * s * (1 - s), None, (jnp.zeros_like(dh), dc * f)

  pointwise.native_kernel = "lstm"  # what jaxrnn/kernels/cells_cpu.cc implements
  return Cell("lstm", 4, 2, init, pointwise, pointwise_bwd, kernel="lstm")
