"""Per-step losses on the readout `z_t = V h_t + c`, and their hand-derived gradients.

Shape legend: `B` batch (any number of leading axes), `T` time, `H` hidden, `O` output.

All three losses pair an output activation `g` with its canonical loss, so that the gradient with
respect to the logits is always `g(z_t) - y_t`:

  ======  ============  =====================================  ========================
  loss    g             L_t                                    dL_t / dz_t
  ======  ============  =====================================  ========================
  mse     identity      1/2 ||z_t - y_t||^2                    z_t - y_t
  xent    softmax       logsumexp(z_t) - z_t[y_t]              softmax(z_t) - onehot(y_t)
  bce     sigmoid       sum_k softplus(z_tk) - y_tk z_tk       sigmoid(z_t) - y_t
  ======  ============  =====================================  ========================

The total is the seed's `L = sum_t L_t`, weighted by `mask` and averaged over the batch:
`L = (1 / B) sum_b sum_t m_bt L_bt` (`B = 1` for an unbatched sequence).
"""
from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn import _checks

LossName = Literal["mse", "xent", "bce"]
OUTPUT_OF_LOSS = {"mse": "identity", "xent": "softmax", "bce": "sigmoid"}


def check_targets(loss: str, targets, batch_time: tuple[int, ...], output_size: int) -> None:
  """Validate `targets` for `loss`: `[..., T, O]` floats, or `[..., T]` integer classes for xent."""
  _checks.check_choice("loss", loss, OUTPUT_OF_LOSS)
  if loss == "xent":
    dtype = _checks.dtype_of("targets", targets)
    if not jnp.issubdtype(dtype, jnp.integer):
      raise TypeError("targets must hold integer class indices in [0, O) for loss='xent'; got "
                      f"dtype {dtype}. Use targets.astype(jnp.int32).")
    _checks.check_shape("targets", targets, batch_time, " (integer classes for loss='xent')")
    # An index outside [0, O) would make take_along_axis fill in NaN; check it when it is known.
    if _checks.concrete(targets) and math.prod(batch_time):
      classes = np.asarray(targets)
      if classes.min() < 0 or classes.max() >= output_size:
        raise ValueError(f"targets must hold class indices in [0, O={output_size}) for "
                         f"loss='xent'; got min {classes.min()}, max {classes.max()}.")
  else:
    _checks.check_float("targets", targets)
    _checks.check_shape("targets", targets, (*batch_time, output_size), f" for loss={loss!r}")


def check_mask(mask, batch_time: tuple[int, ...]) -> None:
  if mask is not None:
    _checks.check_shape("mask", mask, batch_time, " (one weight per time step)")
    _checks.check_mask_dtype("mask", mask)


def step_losses(z: jax.Array, targets: jax.Array, loss: str) -> jax.Array:
  """Per-step losses `L_t`.

  Args:
    z: [..., T, O] logits `V h_t + c`.
    targets: [..., T, O] floats, or [..., T] integer classes for "xent".
    loss: "mse", "xent" or "bce".

  Returns:
    [..., T] the loss of each step.
  """
  if loss == "mse":
    return 0.5 * jnp.sum(jnp.square(z - targets), axis=-1)
  if loss == "xent":
    picked = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(z, axis=-1) - picked
  if loss == "bce":
    return jnp.sum(jax.nn.softplus(z) - targets * z, axis=-1)
  raise ValueError(f"loss must be one of 'mse', 'xent', 'bce'; got {loss!r}.")


def logits_grad(z: jax.Array, targets: jax.Array, loss: str) -> jax.Array:
  """`dL_t/dz_t = g(z_t) - y_t`, [..., T, O] (hand-derived; see the module table)."""
  if loss == "mse":
    return z - targets
  if loss == "xent":
    return jax.nn.softmax(z, axis=-1) - jax.nn.one_hot(targets, z.shape[-1], dtype=z.dtype)
  if loss == "bce":
    return jax.nn.sigmoid(z) - targets
  raise ValueError(f"loss must be one of 'mse', 'xent', 'bce'; got {loss!r}.")


def step_weights(mask, batch_time: tuple[int, ...], dtype) -> jax.Array:
  """The weight `m_bt / B` of each step's loss in the total, [..., T]."""
  batch = math.prod(batch_time[:-1])
  weights = jnp.ones(batch_time, dtype) if mask is None else jnp.asarray(mask, dtype)
  return weights / batch


def total_loss(z: jax.Array, targets: jax.Array, loss: str, mask=None) -> jax.Array:
  """`L = (1/B) sum_b sum_t m_bt L_bt` for logits `z: [..., T, O]`; a scalar."""
  weights = step_weights(mask, z.shape[:-1], z.dtype)
  return jnp.sum(weights * step_losses(z, targets, loss))
