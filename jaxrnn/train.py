"""Training steps: `jax.jit`-compiled, for any Optax `GradientTransformation`."""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from jaxrnn.kernels import HEAP_LIMIT_BYTES

# XLA options for the library's compiled steps on CPU. XLA:CPU packs all of a step's temporaries
# (states, gates, their gradients) into one buffer, allocated with `malloc` at every execution
# and freed at its end; glibc maps any block of 32 MiB or more freshly from the kernel and unmaps
# it on free, so every step faulted all of it in again, 4 KB at a time (the large LSTM: 230 MB,
# 45k faults and ~80 ms of kernel time per step). Capping each of XLA's temporary buffers just
# under that (`kernels.HEAP_LIMIT_BYTES`; an array larger than that still gets one of its own)
# keeps them in glibc's reach: it reuses them from step to step, and far fewer pages fault
# (experiments/PERF_NOTES.md). Where the temporaries are smaller, nothing changes.
COMPILER_OPTIONS = {"xla_multiheap_size_constraint_per_heap": HEAP_LIMIT_BYTES}


def compiler_options(backend: Optional[str] = None) -> dict:
  """`COMPILER_OPTIONS` where `backend` (default: JAX's default backend) is the CPU, else {}
  (GPU and TPU temporaries come from XLA's own allocator, which needs no help)."""
  backend = jax.default_backend() if backend is None else backend
  return dict(COMPILER_OPTIONS) if backend == "cpu" else {}


def jit_step(fn: Callable, **jit_kwargs) -> Callable:
  """`jax.jit(fn, **jit_kwargs)` with `compiler_options()` added: how the library compiles its
  steps, for a user's own step too (e.g. `jaxrnn.train.jit_step(step, donate_argnums=(0, 1))`)."""
  options = {**compiler_options(), **jit_kwargs.pop("compiler_options", {})}
  return jax.jit(fn, compiler_options=options or None, **jit_kwargs)


def make_train_step(loss_fn: Callable[..., jax.Array], optimizer: optax.GradientTransformation,
                    *, value_and_grad_fn: Optional[Callable[..., tuple]] = None,
                    skip_nonfinite: bool = True, jit: bool = True,
                    donate: bool = False) -> Callable:
  """Build `step(params, opt_state, *batch) -> (params, opt_state, metrics)`.

  Args:
    loss_fn: `loss_fn(params, *batch) -> scalar`.
    optimizer: any `optax.GradientTransformation`.
    value_and_grad_fn: `(params, *batch) -> (loss, grads)`; `jax.value_and_grad(loss_fn)` if None.
      Pass a manual BPTT here to train on hand-written gradients.
    skip_nonfinite: if the loss or any gradient is NaN or Inf, return the params and optimiser
      state unchanged (the step is skipped) and report it in `metrics["finite"]`.
    jit: compile with `jax.jit` (nothing static: a second call with same-shaped data reuses it),
      with `compiler_options()` (on CPU, XLA's temporaries in blocks glibc reuses).
    donate: with `jit`, donate `params` and `opt_state` to the step (`donate_argnums=(0, 1)`):
      their buffers are reused for the new ones, so the arrays passed in must not be used again.

  Returns:
    The step. `metrics` has `loss`, `grad_norm` (global L2 norm of the gradients) and `finite`.

  Example:
    >>> step = make_train_step(loss_fn, optax.adam(1e-3))
    >>> opt_state = optax.adam(1e-3).init(params)
    >>> params, opt_state, metrics = step(params, opt_state, xs, targets)
  """
  check_optimizer(optimizer)
  if donate and not jit:
    raise ValueError("donate=True needs jit=True (donation is an option of the compiled step); "
                     "got jit=False.")
  vg = value_and_grad_fn if value_and_grad_fn is not None else jax.value_and_grad(loss_fn)

  def train_step(params: Any, opt_state: Any, *batch):
    value, grads = vg(params, *batch)
    return apply_gradients(optimizer, params, opt_state, value, grads,
                           skip_nonfinite=skip_nonfinite)

  if not jit:
    return train_step
  return jit_step(train_step, donate_argnums=(0, 1) if donate else ())


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
