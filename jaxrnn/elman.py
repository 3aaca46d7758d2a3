"""The seed's Elman RNN as pure functions over a params pytree.

Shape legend: `B` batch (optional), `T` time, `D` input, `H` hidden, `O` output.

.. math::
   h_t = f(U x_t + W h_{t-1} + b), \\qquad o_t = g(V h_t + c), \\qquad h_0 = 0

with `U [H, D]`, `W [H, H]`, `b [H]`, `V [O, H]`, `c [O]`; `f` in tanh / sigmoid / relu and `g` in
identity / sigmoid / softmax. The loss is the seed's `L = sum_t L_t`, weighted by an optional mask
and averaged over the batch (see `jaxrnn.losses` for each `L_t`).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxrnn import elman
  >>> params = elman.init(jax.random.key(0), input_size=3, hidden_size=8, output_size=2)
  >>> xs = jnp.ones((4, 10, 3))                      # [B, T, D]
  >>> hs, os = elman.forward(params, xs)             # [4, 10, 8], [4, 10, 2]
  >>> value, grads = elman.manual_value_and_grad(params, xs, jnp.zeros((4, 10, 2)))

The hidden recurrence is defined once, in `jaxrnn.cells.elman`; `step`, `forward`, `loss` and
`manual_value_and_grad` all run it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import optax

from jaxrnn import _checks, losses, train
from jaxrnn.activations import hidden as _hidden, output as _output
from jaxrnn.backward import recurrence, recurrent_scan_bwd
from jaxrnn.cells import base
from jaxrnn.cells.elman import elman as _elman_cell
from jaxrnn.scan import project, recurrent_scan

RecurrentInit = Literal["uniform", "orthogonal", "identity"]
Backward = Literal["manual", "autodiff"]
KEYS = ("U", "W", "b", "V", "c")


def init(key: jax.Array, input_size: int, hidden_size: int, output_size: int, *,
         dtype=jnp.float32, recurrent_init: RecurrentInit = "uniform") -> dict:
  """Initial params `{"U": [H, D], "W": [H, H], "b": [H], "V": [O, H], "c": [O]}`.

  Default: PyTorch's `nn.RNN` + `nn.Linear` init, every leaf ~ uniform(-1/sqrt(H), 1/sqrt(H)), so
  results compare directly with the most common reference implementation; the spectral radius of
  such a `W` is about `1/sqrt(3)`, which starts a tanh network in the stable (neither exploding
  nor saturated) regime. `recurrent_init="orthogonal"` draws `W` orthogonal (radius exactly 1);
  `"identity"` sets `W = I` and `b = 0`, the IRNN of Le, Jaitly & Hinton (2015) for ReLU networks.

  Args:
    key: a PRNG key.
    input_size, hidden_size, output_size: `D`, `H`, `O`.
    dtype: the params' dtype.
    recurrent_init: "uniform", "orthogonal" or "identity".
  """
  _checks.check_key("key", key)
  for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                      ("output_size", output_size)):
    _checks.check_positive_int(name, value)
  _checks.check_choice("recurrent_init", recurrent_init, ("uniform", "orthogonal", "identity"))
  _checks.check_float_dtype("dtype", dtype)
  k_cell, k_w, k_v, k_c = jax.random.split(key, 4)
  params = _elman_cell("tanh").init(k_cell, input_size, hidden_size, dtype)
  if recurrent_init == "orthogonal":
    params["W"] = jax.nn.initializers.orthogonal()(k_w, (hidden_size, hidden_size), dtype)
  elif recurrent_init == "identity":
    params["W"] = jnp.eye(hidden_size, dtype=dtype)
    params["b"] = jnp.zeros((hidden_size,), dtype)
  bound = 1.0 / hidden_size ** 0.5
  params["V"] = base.uniform_init(k_v, (output_size, hidden_size), bound, dtype)
  params["c"] = base.uniform_init(k_c, (output_size,), bound, dtype)
  return params


def sizes(params) -> tuple[int, int, int]:
  """`(D, H, O)` read off validated params."""
  if not isinstance(params, Mapping):
    raise TypeError(f"params must be a dict with keys {list(KEYS)}; got {type(params).__name__}.")
  missing = [k for k in KEYS if k not in params]
  extra = sorted(set(params) - set(KEYS), key=str)
  if missing or extra:
    raise ValueError(f"params must have exactly the keys {list(KEYS)}; missing {missing}, "
                     f"unexpected {extra}.")
  u_shape, v_shape = _checks.shape_of(params["U"]), _checks.shape_of(params["V"])
  if len(u_shape) != 2:
    raise ValueError(f"params['U'] must have shape [H, D]; got {list(u_shape)}.")
  if len(v_shape) != 2:
    raise ValueError(f"params['V'] must have shape [O, H]; got {list(v_shape)}.")
  (h, d), o = u_shape, v_shape[0]
  _checks.check_params("params", params,
                       {"U": (h, d), "W": (h, h), "b": (h,), "V": (o, h), "c": (o,)})
  return d, h, o


def _validate(params, xs, h0, f):
  """Check everything `forward` needs; return `(batch_shape, T, H)`."""
  d, h, _ = sizes(params)
  _hidden(f)
  batch_shape, t = _checks.check_sequence_input("xs", xs, d)
  if h0 is not None:
    _checks.check_shape("h0", h0, (*batch_shape, h),
                        " ([H] for one sequence, [B, H] for a batch)")
    _checks.check_float("h0", h0)
  return batch_shape, t, h


def _as_batch(params, xs, h0):
  """Batch-first `[B, T, D]` inputs and a `(h0,)` carry of `[B, H]` (B = 1 if unbatched)."""
  batched = xs.ndim == 3
  xs3 = xs if batched else xs[None]
  hidden_size = params["W"].shape[0]
  if h0 is None:
    h0 = jnp.zeros((xs3.shape[0], hidden_size), jnp.result_type(xs3, params["W"]))
  elif not batched:
    h0 = h0[None]
  return batched, xs3, (h0,)


def step(params: dict, h: jax.Array, x: jax.Array, *, f: str = "tanh"
         ) -> tuple[jax.Array, jax.Array]:
  """One step `h_t = f(U x_t + W h_{t-1} + b)`, in `lax.scan` convention.

  `functools.partial(step, params)` is a scan body: `lax.scan(partial(step, params), h0, xs)`.

  Args:
    params: the Elman params (only `U`, `W`, `b` are used).
    h: `[H]` or `[B, H]`, `h_{t-1}`.
    x: `[D]` or `[B, D]`, `x_t`.
    f: the hidden activation.

  Returns:
    `(h_t, h_t)`, each shaped like `h`.
  """
  u = _checks.shape_of(params["U"]) if isinstance(params, Mapping) and "U" in params else ()
  hidden, d = u if len(u) == 2 else (None, None)
  _checks.check_params("params", params, {"U": (hidden, d), "W": (hidden, hidden), "b": (hidden,)},
                       optional={"V": (None, hidden), "c": (None,)})
  batch_shape = _checks.shape_of(h)[:-1] if len(_checks.shape_of(h)) == 2 else ()
  _checks.check_shape("h", h, (*batch_shape, hidden), " ([H] for one sequence, [B, H] for a batch)")
  _checks.check_float("h", h)
  _checks.check_shape("x", x, (*batch_shape, d), " ([D] with h [H], [B, D] with h [B, H])")
  _checks.check_float("x", x)
  _hidden(f)
  (h,), out = base.step(_elman_cell(f), params, (h,), x)
  return h, out


def _hidden_states(params, xs, h0, f, backward, unroll=1):
  """`hs [B, T, H]` (batch-first, B = 1 if unbatched) and whether the input was batched."""
  batched, xs3, carry0 = _as_batch(params, xs, h0)
  cell = _elman_cell(f)
  a = project(params, xs3)
  if backward == "manual":
    hs, _ = recurrence(cell, params, a, carry0, None, unroll)
  else:
    hs, _, _ = recurrent_scan(cell, params, a, carry0, unroll=unroll)
  return batched, jnp.swapaxes(hs, 0, 1)


def _readout(params, hs):
  return base.add_bias(hs @ params["V"].T, params["c"])


def forward(params: dict, xs: jax.Array, h0: Optional[jax.Array] = None, *, f: str = "tanh",
            g: str = "identity", backward: Backward = "manual", unroll: int = 1
            ) -> tuple[jax.Array, jax.Array]:
  """Run the Elman RNN over a sequence or a batch of sequences.

  Args:
    params: `{"U": [H, D], "W": [H, H], "b": [H], "V": [O, H], "c": [O]}`.
    xs: `[T, D]` (one sequence) or `[B, T, D]` (a batch, batch first); floating dtype.
    h0: `[H]` or `[B, H]`, the initial state; zeros (the seed's `h_0 = 0`) if None.
    f: hidden activation, "tanh", "sigmoid" or "relu".
    g: output activation, "identity", "sigmoid" or "softmax".
    backward: how `jax.grad` differentiates it: "manual" (hand-written BPTT through
      `jax.custom_vjp`, the fast default) or "autodiff" (JAX differentiates the scan).
    unroll: `lax.scan` unroll factor. 1 suits the CPU; on a GPU, where each scan iteration is a
      round of kernel launches, 16 made the benchmark's training steps 1.7-3.7x faster on an H100
      at the price of a longer compile (experiments/PERF_NOTES.md, "GPU").

  Returns:
    `(hs, os)`: `[..., T, H]` hidden states and `[..., T, O]` outputs `o_t = g(V h_t + c)`.
  """
  _validate(params, xs, h0, f)
  out_fn = _output(g)
  _checks.check_choice("backward", backward, ("manual", "autodiff"))
  _checks.check_unroll("unroll", unroll)
  batched, hs = _hidden_states(params, xs, h0, f, backward, unroll)
  os = out_fn(_readout(params, hs))
  return (hs, os) if batched else (hs[0], os[0])


def _validate_loss(params, xs, targets, h0, f, loss, mask):
  batch_shape, t, _ = _validate(params, xs, h0, f)
  losses.check_targets(loss, targets, (*batch_shape, t), params["V"].shape[0])
  losses.check_mask(mask, (*batch_shape, t))


def loss(params: dict, xs: jax.Array, targets: jax.Array, h0: Optional[jax.Array] = None, *,
         f: str = "tanh", loss: str = "mse", mask: Optional[jax.Array] = None,
         backward: Backward = "manual", unroll: int = 1) -> jax.Array:
  """The seed's total loss `L = (1/B) sum_b sum_t m_bt L_bt`, a scalar.

  Args:
    params, xs, h0, f, backward, unroll: as in `forward`.
    targets: `[..., T, O]` floats for "mse" and "bce"; `[..., T]` integer classes for "xent".
    loss: "mse" (g = identity, `L_t = 1/2 ||o_t - y_t||^2`), "xent" (g = softmax, cross-entropy
      from the logits) or "bce" (g = sigmoid, binary cross-entropy from the logits).
    mask: `[..., T]` weights `m_t` of the steps that count; all ones if None.

  `jax.value_and_grad(loss)` differentiates it; with `backward="autodiff"` that is plain autodiff
  BPTT through `lax.scan`, with the default "manual" it runs the hand-written backward.
  """
  _validate_loss(params, xs, targets, h0, f, loss, mask)
  _checks.check_choice("backward", backward, ("manual", "autodiff"))
  _checks.check_unroll("unroll", unroll)
  batched, hs = _hidden_states(params, xs, h0, f, backward, unroll)
  z = _readout(params, hs)
  if not batched:
    z = z[0]
  return losses.total_loss(z, targets, loss, mask)


_total_loss = loss  # `make_train_step` takes a `loss=` option that shadows the function.


def manual_value_and_grad(params: dict, xs: jax.Array, targets: jax.Array,
                          h0: Optional[jax.Array] = None, *, f: str = "tanh", loss: str = "mse",
                          mask: Optional[jax.Array] = None, wrt_inputs: bool = False,
                          unroll: int = 1):
  """The hand-written BPTT of the seed (sections 3.3-3.4): `(loss, grads)`.

  No `jax.grad` or `jax.vjp` inside. A forward scan keeps `h_t`; the readout gradient
  `dL/dz_t = m_t (g(z_t) - y_t) / B` gives `dV`, `dc` and `dL/dh_t` from the outputs; a reverse scan
  carries `dL/dh_t`, forms `delta_t = dL/dh_t * f'(z_t)` and passes `delta_t W` back to `h_{t-1}`;
  then `dU = sum_t delta_t x_t^T`, `dW = sum_t delta_t h_{t-1}^T`, `db = sum_t delta_t` as single
  contractions over all steps.

  Args:
    params, xs, targets, h0, f, loss, mask, unroll: as in `loss`.
    wrt_inputs: also return `{"xs": dL/dxs, "h0": dL/dh0}` (shaped like `xs` and the `h0` used),
      what stacking layers needs.

  Returns:
    `(loss, grads)` with `grads` shaped exactly like `params`; with `wrt_inputs`,
    `(loss, grads, input_grads)`.
  """
  _validate_loss(params, xs, targets, h0, f, loss, mask)
  _checks.check_bool("wrt_inputs", wrt_inputs)
  _checks.check_unroll("unroll", unroll)
  batched, xs3, carry0 = _as_batch(params, xs, h0)
  cell = _elman_cell(f)
  a = project(params, xs3)
  hs_tm, carry_T, saved = recurrent_scan(cell, params, a, carry0, unroll=unroll)
  hs = jnp.swapaxes(hs_tm, 0, 1)                                     # [B, T, H]
  z = _readout(params, hs)                                          # [B, T, O]
  y = targets if batched else targets[None]
  m = None if mask is None else (mask if batched else mask[None])
  value = losses.total_loss(z, y, loss, m)
  d_z = losses.step_weights(m, z.shape[:-1], z.dtype)[..., None] * losses.logits_grad(z, y, loss)
  d_hs = jnp.einsum("bto,oh->tbh", d_z, params["V"])
  d_rec, d_a, (d_h0,) = recurrent_scan_bwd(cell, params, a, carry0, None, saved, d_hs,
                                           tuple(jnp.zeros_like(c) for c in carry_T),
                                           unroll=unroll)
  grads = {
      "U": jnp.einsum("tbh,btd->hd", d_a, xs3),
      "W": d_rec["W"],
      "b": d_rec["b"],
      "V": jnp.einsum("bto,bth->oh", d_z, hs),
      "c": jnp.sum(d_z, axis=(0, 1)),
  }
  if not wrt_inputs:
    return value, grads
  d_xs = jnp.einsum("tbh,hd->btd", d_a, params["U"])
  input_grads = {"xs": d_xs if batched else d_xs[0], "h0": d_h0 if batched else d_h0[0]}
  return value, grads, input_grads


def make_train_step(optimizer: optax.GradientTransformation, *, f: str = "tanh",
                    loss: str = "mse", grads: Backward = "manual", unroll: int = 1,
                    skip_nonfinite: bool = True):
  """A jitted step `(params, opt_state, xs, targets, h0=None, mask=None) -> (params, opt_state,
  metrics)` for the Elman RNN; see `jaxrnn.train.make_train_step`.

  Args:
    optimizer: any `optax.GradientTransformation` (SGD, Adam, chains with clipping, schedules).
    f, loss, unroll: as in `loss`.
    grads: "manual" (`manual_value_and_grad`) or "autodiff" (`jax.value_and_grad` of the scan).
  """
  _hidden(f)
  _checks.check_choice("loss", loss, losses.OUTPUT_OF_LOSS)
  _checks.check_choice("grads", grads, ("manual", "autodiff"))

  def objective(params, xs, targets, h0=None, mask=None):
    return _total_loss(params, xs, targets, h0, f=f, loss=loss, mask=mask, backward="autodiff",
                   unroll=unroll)

  def manual(params, xs, targets, h0=None, mask=None):
    return manual_value_and_grad(params, xs, targets, h0, f=f, loss=loss, mask=mask,
                                 unroll=unroll)

  return train.make_train_step(objective, optimizer,
                               value_and_grad_fn=manual if grads == "manual" else None,
                               skip_nonfinite=skip_nonfinite)
