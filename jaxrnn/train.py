"""Training steps: `jax.jit`-compiled, for any Optax `GradientTransformation`."""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax


def make_train_step(loss_fn: Callable[..., jax.Array], optimizer: optax.GradientTransformation,
                    *, value_and_grad_fn: Optional[Callable[..., tuple]] = None,
                    skip_nonfinite: bool = True, jit: bool = True) -> Callable:
  """Build `step(params, opt_state, *batch) -> (params, opt_state, metrics)`.

  Args:
    loss_fn: `loss_fn(params, *batch) -> scalar`.
    optimizer: any `optax.GradientTransformation`.
    value_and_grad_fn: `(params, *batch) -> (loss, grads)`; `jax.value_and_grad(loss_fn)` if None.
      Pass a manual BPTT here to train on hand-written gradients.
    skip_nonfinite: if the loss or any gradient is NaN or Inf, return the params and optimiser
      state unchanged (the step is skipped) and report it in `metrics["finite"]`.
    jit: compile with `jax.jit` (nothing static: a second call with same-shaped data reuses it).

  Returns:
    The step. `metrics` has `loss`, `grad_norm` (global L2 norm of the gradients) and `finite`.

  Example:
    >>> step = make_train_step(loss_fn, optax.adam(1e-3))
    >>> opt_state = optax.adam(1e-3).init(params)
    >>> params, opt_state, metrics = step(params, opt_state, xs, targets)
  """
  check_optimizer(optimizer)
  vg = value_and_grad_fn if value_and_grad_fn is not None else jax.value_and_grad(loss_fn)

  def train_step(params: Any, opt_state: Any, *batch):
    value, grads = vg(params, *batch)
    return apply_gradients(optimizer, params, opt_state, value, grads,
                           skip_nonfinite=skip_nonfinite)

  return jax.jit(train_step) if jit else train_step


def check_optimizer(optimizer) -> None:
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError("optimizer must be an optax.GradientTransformation (e.g. optax.adam(1e-3)); "
                    f"got {type(optimizer).__name__}.")


def keep_if(finite: jax.Array, new: Any, old: Any) -> Any:
  """`new` where the scalar `finite` is True, else `old`, leaf by leaf."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def apply_gradients(optimizer: optax.GradientTransformation, params: Any, opt_state: Any,
                    value: jax.Array, grads: Any, *, skip_nonfinite: bool = True):
  """One Optax update with the non-finite guard, shared by every training step.

  Returns:
    `(params, opt_state, metrics)`; if `skip_nonfinite` and the loss or the gradient norm is NaN
    or Inf, the old params and optimiser state come back unchanged. `metrics` has `loss`,
    `grad_norm` and `finite`.
  """
  grad_norm = optax.global_norm(grads)
  updates, new_opt_state = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    new_params, new_opt_state = keep_if(finite, new_params, params), keep_if(
        finite, new_opt_state, opt_state)
  return new_params, new_opt_state, {"loss": value, "grad_norm": grad_norm, "finite": finite}
