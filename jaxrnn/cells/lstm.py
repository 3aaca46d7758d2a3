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

  def pointwise(a, r, carry):
    _, c_prev = carry
    pre_i, pre_f, pre_g, pre_o = jnp.split(a + r, 4, axis=-1)
    i, f, g, o = (jax.nn.sigmoid(pre_i), jax.nn.sigmoid(pre_f), jnp.tanh(pre_g),
                  jax.nn.sigmoid(pre_o))
    c = f * c_prev + i * g
    tanh_c = jnp.tanh(c)
    h = o * tanh_c
    return (h, c), jnp.concatenate([i, f, g, o, tanh_c], axis=-1)

  def pointwise_bwd(res, carry_prev, carry, d_carry):
    del carry
    _, c_prev = carry_prev
    dh, dc = d_carry
    i, f, g, o, tanh_c = jnp.split(res, 5, axis=-1)
    dc = dc + dh * o * (1 - tanh_c * tanh_c)
    d_pre = jnp.concatenate([
        dc * g * i * (1 - i),        # i
        dc * c_prev * f * (1 - f),   # f
        dc * i * (1 - g * g),        # g
        dh * tanh_c * o * (1 - o),   # o
    ], axis=-1)
    return d_pre, None, (jnp.zeros_like(dh), dc * f)

  return Cell("lstm", 4, 2, init, pointwise, pointwise_bwd)
