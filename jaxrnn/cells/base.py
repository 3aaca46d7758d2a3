"""The one interface every recurrent cell implements.

Shape legend: `B` batch, `D` input, `H` hidden, `G = num_blocks * H` stacked gate pre-activations.

Every cell here is a *gated affine* recurrence: all the work on `x_t` and `h_{t-1}` is two affine
maps with stacked gate blocks, and what remains is elementwise::

  a_t = U x_t + b                  [G]   input projection: no time dependence, hoisted out of scan
  r_t = W h_{t-1} (+ bh)           [G]   recurrent projection: the only matmul inside the scan
  carry_t, res_t = pointwise(a_t, r_t, carry_{t-1})

`U [G, D]`, `W [G, H]`, `b [G]` carry the seed's names; `bh [G]` is PyTorch's second bias
(optional for Elman, where the seed has a single `b`).

`pointwise` is the *single definition* of a cell's recurrence. The forward scan, the manual backward
pass (which re-uses the forward scan's residuals) and step-by-step sampling all call it. The carry
is always a tuple whose first element is `h_t [B, H]`; LSTM adds `c_t [B, H]`.

`pointwise_bwd` is the hand-derived reverse of `pointwise` for one step::

  pointwise_bwd(res_t, carry_prev, carry_t, d_carry_t) -> (d_a_t, d_r_t, d_carry_prev_direct)

`d_r_t` may be None when it equals `d_a_t` (Elman, LSTM). `d_carry_prev_direct` is the part of the
cotangent of `carry_{t-1}` that does not flow through `W` (the backward engine adds `d_r_t @ W`).
A cell that leaves `pointwise_bwd` as None still works everywhere; its backward uses `jax.vjp` of
`pointwise`.

Two optional generalisations, both off by default so the classic cells are unchanged:

- `recurrent_weights=False`: the cell has no `W` (nor `bh`); its only dependence on `h_{t-1}` is
  elementwise, inside `pointwise` (minGRU). Its params are just `U [G, D]`, `b [G]`, the engine
  passes `r_t = None` to `pointwise`, ignores `d_r_t`, and adds no `d_r_t @ W` term.
- `parallel_scan`: the whole recurrence computed in `O(log T)` depth (an associative scan), a
  drop-in for the sequential engine with the same masking rules; `rnn.apply(impl="parallel")`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

Carry = tuple  # (h [B, H], ...) : every carry starts with the hidden state h.


class Cell(NamedTuple):
  """A recurrent cell as a bundle of pure functions (compare `optax.GradientTransformation`).

  Attributes:
    name: a short name, used in messages and by the PyTorch converters.
    num_blocks: gate blocks stacked in `U`, `W`, `b`: `G = num_blocks * H`.
    carry_size: number of `[B, H]` arrays in the carry (1 for Elman and GRU, 2 for LSTM).
    init: `init(key, input_size, hidden_size, dtype) -> params` with `U [G, D]`, `W [G, H]`,
      `b [G]` and optionally `bh [G]`.
    pointwise: `pointwise(a_t [B, G], r_t [B, G], carry) -> (carry, res_t)`.
    pointwise_bwd: the hand-derived reverse of `pointwise` (see the module docstring), or None.
    recurrent_weights: False for a cell without `W`/`bh` (e.g. minGRU): `pointwise` then receives
      `r_t = None` and `init` returns only `U` and `b`.
    parallel_scan: `parallel_scan(a [T, B, G], carry0, mask [T, B] or None, *, backward) ->
      (hs [T, B, H], carry_T)`, the recurrence in `O(log T)` depth with the same results (and
      masking rules) as `jaxrnn.scan.recurrent_scan`; None if the cell has no parallel form.
    kernel: the name of a native loop in `jaxrnn.kernels` that computes exactly this cell's
      `recurrent_scan` and manual backward ("lstm" or "gru"); None for every other cell. Used
      only while `pointwise` is the library's own (marked `pointwise.native_kernel`): a cell
      built with `_replace(pointwise=...)` takes the scan.
  """
  name: str
  num_blocks: int
  carry_size: int
  init: Callable[..., dict]
  pointwise: Callable[[jax.Array, Optional[jax.Array], Carry], tuple[Carry, Any]]
  pointwise_bwd: Optional[Callable[..., tuple]] = None
  recurrent_weights: bool = True
  parallel_scan: Optional[Callable[..., tuple]] = None
  kernel: Optional[str] = None


def uniform_init(key, shape, bound, dtype):
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def torch_style_init(key, num_blocks: int, input_size: int, hidden_size: int, dtype,
                     two_biases: bool = True) -> dict:
  """PyTorch's default: every weight and bias ~ uniform(-1/sqrt(H), 1/sqrt(H))."""
  g = num_blocks * hidden_size
  bound = 1.0 / hidden_size ** 0.5
  ku, kw, kb, kbh = jax.random.split(key, 4)
  params = {
      "U": uniform_init(ku, (g, input_size), bound, dtype),
      "W": uniform_init(kw, (g, hidden_size), bound, dtype),
      "b": uniform_init(kb, (g,), bound, dtype),
  }
  if two_biases:
    params["bh"] = uniform_init(kbh, (g,), bound, dtype)
  return params


def zeros_carry(cell: Cell, batch_shape: tuple[int, ...], hidden_size: int, dtype) -> Carry:
  """The seed's `h_0 = 0` (and `c_0 = 0` for LSTM): a tuple of `[*batch_shape, H]` zeros."""
  return tuple(jnp.zeros((*batch_shape, hidden_size), dtype) for _ in range(cell.carry_size))


def step(cell: Cell, params: dict, carry: Carry, x: jax.Array) -> tuple[Carry, jax.Array]:
  """One step of `cell` on a raw input, in `lax.scan` convention.

  Args:
    cell: the cell.
    params: its params (`U`, `W`, `b`, optional `bh`).
    carry: tuple of `[B, H]` (or `[H]`).
    x: `[B, D]` (or `[D]`).

  Returns:
    `(carry_t, h_t)`; `h_t` has the shape of `carry[0]`.
  """
  a = add_bias(x @ params["U"].T, params["b"])
  carry, _ = cell.pointwise(a, recurrent_projector(params)(carry[0]), carry)
  return carry, carry[0]


def matmul(x: jax.Array, w: jax.Array, matmul_dtype=None) -> jax.Array:
  """`x @ w`; with `matmul_dtype` (e.g. bfloat16) the operands are cast to it and the products
  accumulated and returned in `x`'s dtype (`preferred_element_type`)."""
  if matmul_dtype is None:
    return x @ w
  return jnp.matmul(x.astype(matmul_dtype), w.astype(matmul_dtype),
                    preferred_element_type=x.dtype)


def einsum(spec: str, x: jax.Array, y: jax.Array, matmul_dtype=None) -> jax.Array:
  """`jnp.einsum(spec, x, y)`; with `matmul_dtype` the operands are cast to it and the products
  accumulated and returned in their common dtype (as `matmul`)."""
  if matmul_dtype is None:
    return jnp.einsum(spec, x, y)
  return jnp.einsum(spec, x.astype(matmul_dtype), y.astype(matmul_dtype),
                    preferred_element_type=jnp.result_type(x, y))


def recurrent_projector(params: dict, matmul_dtype=None):
  """`h -> r = W h + bh` (`[..., H] -> [..., G]`; `bh` optional; `r` is None for a cell without
  `W`), with `W` transposed (and cast to `matmul_dtype`, if given) once, outside any loop that
  calls it.

  Inside a `lax.scan` body, `h @ W.T` made XLA (CPU) copy-transpose `W` on every step; handing the
  body a pre-transposed `W^T [H, G]` removes that copy (see experiments/PERF_NOTES.md).
  """
  if "W" not in params:  # recurrent_weights=False (minGRU): r_t is None
    return lambda h: None
  w_t = params["W"].T
  if matmul_dtype is not None:
    w_t = w_t.astype(matmul_dtype)
  bias = params.get("bh")
  if bias is None:
    return lambda h: matmul(h, w_t, matmul_dtype)
  return lambda h: add_bias(matmul(h, w_t, matmul_dtype), bias)


def readout(hs: jax.Array, V: jax.Array, c: jax.Array, matmul_dtype=None) -> jax.Array:
  """The seed's readout `z_t = V h_t + c`: `hs [..., H]`, `V [O, H]`, `c [O]` -> `[..., O]`."""
  return add_bias(matmul(hs, V.T, matmul_dtype), c)


def add_bias(x: jax.Array, bias: jax.Array) -> jax.Array:
  """`x [..., G] + bias [G]` with the broadcast written out (rank promotion stays explicit)."""
  return x + jnp.reshape(bias, (1,) * (x.ndim - 1) + bias.shape)
