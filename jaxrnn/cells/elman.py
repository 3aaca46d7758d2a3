"""The Elman cell of the seed: `h_t = f(U x_t + W h_{t-1} + b)`.

.. math::  h_t = f(U x_t + b + W h_{t-1} + b_h)

`b_h` (`bh`) is optional and absent from the seed; it exists so that PyTorch's `nn.RNN`, which has
two biases, converts losslessly. Backward: with `delta_t = dL/dz_t = dL/dh_t * f'(z_t)`, where
`f'` is written from `h_t` (tanh: `1 - h_t^2`), both `dL/da_t` and `dL/dr_t` equal `delta_t`, and
the engine adds `delta_t @ W` to `dL/dh_{t-1}`: the seed's `dh_t/dh_{t-1} = diag(f'(z_t)) W`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxrnn.activations import hidden as _hidden_activation
from jaxrnn.cells.base import Cell, torch_style_init


@functools.cache
def elman(f: str = "tanh", *, two_biases: bool = False) -> Cell:
  """The Elman cell with hidden activation `f` ("tanh", "sigmoid" or "relu").

  Init: PyTorch's `nn.RNN` default, uniform(-1/sqrt(H), 1/sqrt(H)) for `U`, `W`, `b` (and `bh` when
  `two_biases`). Cached, so `elman("tanh") is elman("tanh")` and jitted code is not retraced.
  """
  act = _hidden_activation(f)

  def init(key, input_size, hidden_size, dtype=jnp.float32):
    return torch_style_init(key, 1, input_size, hidden_size, dtype, two_biases=two_biases)

  def pointwise(a, r, carry):
    h = act.fn(a + r)
    return (h,), ()

  def pointwise_bwd(res, carry_prev, carry, d_carry):
    del res, carry_prev
    (h,), (dh,) = carry, d_carry
    delta = dh * act.grad_from_output(h)
    return delta, None, (jnp.zeros_like(dh),)

  pointwise.native_kernel = f"elman_{f}"  # what jaxrnn/kernels/cells_cpu.cc implements
  return Cell(f"elman_{f}", 1, 1, init, pointwise, pointwise_bwd, kernel=f"elman_{f}")
