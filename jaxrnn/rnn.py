"""Sequence layers for every cell: stacks, bidirectional layers, variable lengths, initial states.

Shape legend: `B` batch (optional), `T` time, `D` input, `H` hidden, `O` output, `L` layers,
`K = L * num_directions` (PyTorch's layout of `h_n`), `G = num_blocks * H`.

A model is a static, hashable `RNN` spec (sizes, cell, options) plus a params pytree::

  {"layers": [{"fwd": cell_params, "bwd": cell_params (bidirectional only)}, ...  # L entries
   "V": [O, dirs * H], "c": [O],            # the seed's readout, if output_size is set
   "carry0": [carry_size, K, H]}            # if learn_initial_state

Carries follow PyTorch's `h_n` layout: `[K, B, H]` for Elman and GRU, a tuple `(h, c)` of those for
LSTM (`[K, H]` without a batch axis). Every feature works for any `Cell`, including user cells.

Example:
  >>> spec = rnn("lstm", input_size=8, hidden_size=32, num_layers=2, bidirectional=True,
  ...            output_size=5)
  >>> params = init(jax.random.key(0), spec)
  >>> ys, carry = apply(spec, params, xs, lengths=lengths)     # xs [B, T, 8] -> ys [B, T, 64]
  >>> value = loss(spec, params, xs, targets, loss="xent", lengths=lengths)
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn import _checks, kernels, losses
from jaxrnn.backward import input_recurrence, input_recurrence_readout
from jaxrnn.cells import base
from jaxrnn.cells.base import Cell
from jaxrnn.cells.elman import elman
from jaxrnn.cells.gru import gru
from jaxrnn.cells.lstm import lstm
from jaxrnn.cells.mingru import mingru
from jaxrnn.scan import project_time_major, recurrent_scan

CELL_NAMES = {"elman": lambda: elman("tanh"), "elman_relu": lambda: elman("relu"),
              "lstm": lstm, "gru": gru, "mingru": mingru}


class RNN(NamedTuple):
  """Static configuration of a recurrent model (hashable: safe to close over or mark static).

  Attributes:
    cell: the `Cell`.
    input_size: `D`.
    hidden_size: `H`.
    num_layers: `L >= 1` stacked layers; layer `l > 0` reads layer `l - 1`'s outputs.
    bidirectional: run each layer forward and backward in time, concatenating outputs `[..., 2H]`.
    output_size: `O` for the seed's readout `V h_t + c` on the top layer, or None for no readout.
    dropout: dropout rate on the outputs of every layer but the last (as PyTorch), applied only
      when a PRNG key is passed.
    learn_initial_state: the initial carry is a trained parameter `carry0` instead of zeros.
  """
  cell: Cell
  input_size: int
  hidden_size: int
  num_layers: int = 1
  bidirectional: bool = False
  output_size: Optional[int] = None
  dropout: float = 0.0
  learn_initial_state: bool = False

  @property
  def num_directions(self) -> int:
    return 2 if self.bidirectional else 1

  @property
  def directions(self) -> tuple[str, ...]:
    return ("fwd", "bwd") if self.bidirectional else ("fwd",)


def rnn(cell: Union[str, Cell], input_size: int, hidden_size: int, *, num_layers: int = 1,
        bidirectional: bool = False, output_size: Optional[int] = None, dropout: float = 0.0,
        learn_initial_state: bool = False) -> RNN:
  """Build a validated `RNN` spec. `cell` is "elman", "elman_relu", "lstm", "gru" or a `Cell`."""
  if isinstance(cell, str):
    cell = CELL_NAMES[_checks.check_choice("cell", cell, CELL_NAMES)]()
  elif not isinstance(cell, Cell):
    raise TypeError(f"cell must be one of {sorted(CELL_NAMES)} or a jaxrnn.Cell; got "
                    f"{type(cell).__name__}.")
  _checks.check_positive_int("input_size", input_size)
  _checks.check_positive_int("hidden_size", hidden_size)
  _checks.check_positive_int("num_layers", num_layers)
  if output_size is not None:
    _checks.check_positive_int("output_size", output_size)
  if (isinstance(dropout, (bool, np.bool_)) or not isinstance(dropout, (int, float, np.number))
      or not 0.0 <= dropout < 1.0):
    raise ValueError(f"dropout must be a rate in [0, 1); got {dropout!r}.")
  _checks.check_bool("bidirectional", bidirectional)
  _checks.check_bool("learn_initial_state", learn_initial_state)
  return RNN(cell, int(input_size), int(hidden_size), int(num_layers), bool(bidirectional),
             output_size, float(dropout), bool(learn_initial_state))


def _check_spec(spec) -> None:
  if not isinstance(spec, RNN):
    raise TypeError(f"spec must be a jaxrnn.rnn.RNN built by jaxrnn.rnn.rnn(...); got "
                    f"{type(spec).__name__}.")


def init(key: jax.Array, spec: RNN, *, dtype=jnp.float32) -> dict:
  """Initial params for `spec` (each cell's own init; readout uniform(+-1/sqrt(fan_in)))."""
  _check_spec(spec)
  _checks.check_key("key", key)
  _checks.check_float_dtype("dtype", dtype)
  keys = jax.random.split(key, spec.num_layers * spec.num_directions + 2)
  layers, k = [], 0
  for layer in range(spec.num_layers):
    d = spec.input_size if layer == 0 else spec.hidden_size * spec.num_directions
    entry = {}
    for direction in spec.directions:
      entry[direction] = spec.cell.init(keys[k], d, spec.hidden_size, dtype)
      k += 1
    layers.append(entry)
  params = {"layers": layers}
  if spec.output_size is not None:
    fan_in = spec.hidden_size * spec.num_directions
    kv, kc = jax.random.split(keys[-1])
    bound = 1.0 / fan_in ** 0.5
    params["V"] = base.uniform_init(kv, (spec.output_size, fan_in), bound, dtype)
    params["c"] = base.uniform_init(kc, (spec.output_size,), bound, dtype)
  if spec.learn_initial_state:
    k_layers = spec.num_layers * spec.num_directions
    params["carry0"] = jnp.zeros((spec.cell.carry_size, k_layers, spec.hidden_size), dtype)
  return params


def check_params(spec: RNN, params) -> None:
  """Raise a ValueError naming the first key or leaf of `params` that does not fit `spec`."""
  if not isinstance(params, Mapping) or "layers" not in params:
    keys = sorted(params, key=str) if isinstance(params, Mapping) else "-"
    raise ValueError("params must be a dict with a 'layers' list (from jaxrnn.rnn.init); got "
                     f"{type(params).__name__} with keys {keys}.")
  expected_top = {"layers"} | ({"V", "c"} if spec.output_size is not None else set()) | (
      {"carry0"} if spec.learn_initial_state else set())
  if set(params) != expected_top:
    raise ValueError(f"params must have keys {sorted(expected_top)} for this spec; missing "
                     f"{sorted(expected_top - set(params))}, unexpected "
                     f"{sorted(set(params) - expected_top, key=str)}.")
  layers = params["layers"]
  if not isinstance(layers, Sequence) or len(layers) != spec.num_layers:
    n = len(layers) if isinstance(layers, Sequence) else type(layers).__name__
    raise ValueError(f"params['layers'] must be a list of num_layers={spec.num_layers} entries; "
                     f"got {n}.")
  h, g = spec.hidden_size, spec.cell.num_blocks * spec.hidden_size
  for i, entry in enumerate(layers):
    d = spec.input_size if i == 0 else h * spec.num_directions
    if not isinstance(entry, Mapping) or set(entry) != set(spec.directions):
      got = sorted(entry, key=str) if isinstance(entry, Mapping) else type(entry).__name__
      raise ValueError(f"params['layers'][{i}] must have keys {list(spec.directions)}; got {got}.")
    rec = {"W": (g, h)} if spec.cell.recurrent_weights else {}  # minGRU has no W
    for direction in spec.directions:
      _checks.check_params(f"params['layers'][{i}][{direction!r}]", entry[direction],
                           {"U": (g, d), **rec, "b": (g,)},
                           optional={"bh": (g,)} if rec else {})
  if spec.output_size is not None:
    _checks.check_shape("params['V']", params["V"], (spec.output_size, h * spec.num_directions))
    _checks.check_shape("params['c']", params["c"], (spec.output_size,))
    _checks.check_float("params['V']", params["V"])
    _checks.check_float("params['c']", params["c"])
  if spec.learn_initial_state:
    _checks.check_shape("params['carry0']", params["carry0"],
                        (spec.cell.carry_size, spec.num_layers * spec.num_directions, h))
    _checks.check_float("params['carry0']", params["carry0"])


def _validate_inputs(spec, xs, carry0, lengths, mask, key):
  """Return `(batch_shape, T)` after checking every input against `spec`."""
  batch_shape, t = _checks.check_sequence_input("xs", xs, spec.input_size)
  if lengths is not None and mask is not None:
    raise ValueError("pass at most one of lengths [B] and mask [B, T]; got both.")
  if lengths is not None:
    _checks.check_shape("lengths", lengths, batch_shape, " (one length per sequence)")
    _checks.check_int("lengths", lengths)
    if _checks.concrete(lengths):
      arr = np.asarray(lengths)
      if arr.size and (arr.min() < 1 or arr.max() > t):
        raise ValueError(f"lengths must lie in [1, T={t}]; got min {arr.min()}, max {arr.max()}.")
  if mask is not None:
    _checks.check_shape("mask", mask, (*batch_shape, t), " (True at the valid steps)")
    _checks.check_mask_dtype("mask", mask)
    if spec.bidirectional and _checks.concrete(mask):
      # The reverse direction reverses the first sum(mask) steps: only a prefix mask is lengths.
      m = np.asarray(mask, bool).reshape(-1, t)
      if not np.array_equal(m, np.arange(t)[None, :] < m.sum(1, keepdims=True)):
        raise ValueError("mask must be a prefix (True for each sequence's first n steps, then "
                         "False) with bidirectional=True; got a mask with gaps. Pass lengths [B] "
                         "instead.")
  if carry0 is not None:
    _check_carry(spec, "carry0", carry0, batch_shape, " ([num_layers * num_directions, B, H])")
  if key is not None:
    _checks.check_key("key", key)
  return batch_shape, t


def _check_carry(spec, name, carry, batch_shape, what):
  """Check a carry in PyTorch's layout: `[K, *batch_shape, H]`, or a tuple (h, c) of those."""
  want = (spec.num_layers * spec.num_directions, *batch_shape, spec.hidden_size)
  if spec.cell.carry_size == 1:
    if isinstance(carry, (tuple, list)):
      raise ValueError(f"{name} for {spec.cell.name} must be one array of shape {list(want)}; "
                       f"got a {type(carry).__name__} of {len(carry)}.")
    _checks.check_shape(name, carry, want, what)
    _checks.check_float(name, carry)
  else:
    if not isinstance(carry, (tuple, list)) or len(carry) != spec.cell.carry_size:
      raise ValueError(f"{name} for {spec.cell.name} must be a tuple of "
                       f"{spec.cell.carry_size} arrays (h0, c0), each {list(want)}; got "
                       f"{type(carry).__name__}.")
    for j, part in enumerate(carry):
      _checks.check_shape(f"{name}[{j}]", part, want, what)
      _checks.check_float(f"{name}[{j}]", part)


def _reverse_index(lengths, t):
  """`[T, B]` time indices that reverse each sequence's first `lengths[b]` steps (an involution)."""
  steps = jnp.arange(t)[:, None]
  return jnp.where(steps < lengths[None, :], lengths[None, :] - 1 - steps, steps)


def _time_gather(x, idx):
  """`x [T, B, ...]` reordered along time by `idx [T, B]`."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=0)


def _run_direction(cell, params, xs, carry0, mask_tm, backward, unroll, impl="sequential",
                   matmul_dtype=None):
  """One direction of one layer, time-major: `xs [T, B, D] -> (hs [T, B, H], carry_T)`."""
  if impl == "sequential" and backward == "manual":  # U x_t included (fused where native)
    return input_recurrence(cell, params, xs, carry0, mask_tm, unroll, matmul_dtype)
  a = project_time_major(params, xs, matmul_dtype)       # U x_t; the scans add b in their body
  if impl == "parallel":
    hs, carry_T = cell.parallel_scan(base.add_bias(a, params["b"]), carry0, mask_tm,
                                     backward=backward)
  else:
    hs, carry_T, _ = recurrent_scan(cell, params, a, carry0, mask_tm, unroll=unroll,
                                    matmul_dtype=matmul_dtype)
  return hs, carry_T


def _run_direction_remat(cell, params, xs, carry0, mask_tm, backward, unroll, impl, chunk,
                         matmul_dtype=None, out=None):
  """`_run_direction` that keeps only the carries at chunk boundaries for the backward pass.

  The sequence is cut into chunks of `chunk` steps (the last one padded with masked steps); a
  `lax.scan` over chunks runs each chunk under `jax.checkpoint`, so the backward pass recomputes a
  chunk's forward (residuals included) just before running that chunk's backward. Peak memory
  for residuals drops from `O(T)` to `O(T / chunk + chunk)`; with `chunk ~ sqrt(T)` that is
  `O(sqrt(T))`, for about one extra forward pass of compute. Time-major, as `_run_direction`.

  `out` (`[k, B, H] -> [k, B, O]`, e.g. the loss's readout), where given, is applied to each
  chunk's states inside the checkpoint, and its outputs are returned instead of `hs`: then no
  `[T, B, H]` array is kept at all, nor its gradient (the chunk's are recomputed).
  """
  t, b = xs.shape[:2]
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    xs = jnp.concatenate([xs, jnp.zeros((pad,) + xs.shape[1:], xs.dtype)], axis=0)
    valid = jnp.ones((t, b), bool) if mask_tm is None else mask_tm
    mask_tm = jnp.concatenate([valid, jnp.zeros((pad, b), bool)], axis=0)
  xs_c = xs.reshape((n, chunk) + xs.shape[1:])                              # [n, k, B, D]
  m_c = None if mask_tm is None else mask_tm.reshape(n, chunk, b)           # [n, k, B]

  @jax.checkpoint
  def body(carry, inputs):
    x, m = inputs
    hs, carry = _run_direction(cell, params, x, carry, m, backward, unroll, impl, matmul_dtype)
    return carry, (hs if out is None else out(hs))

  carry_T, ys = jax.lax.scan(body, tuple(carry0), (xs_c, m_c))             # [n, k, B, H or O]
  return ys.reshape((n * chunk,) + ys.shape[2:])[:t], carry_T


def apply(spec: RNN, params: dict, xs: jax.Array, carry0=None, *, lengths=None, mask=None,
          key: Optional[jax.Array] = None, backward: str = "manual", unroll: int = 1,
          impl: str = "sequential", remat: Optional[int] = None, matmul_dtype=None):
  """Run the stack over `xs`.

  Args:
    spec: the `RNN` spec.
    params: from `init(key, spec)` (or converted from PyTorch).
    xs: `[B, T, D]` or `[T, D]`.
    carry0: the initial carry in PyTorch's layout: `[K, B, H]` (`[K, H]` unbatched), a tuple
      `(h0, c0)` of those for LSTM. Default: learned `carry0` if the spec has one, else zeros.
    lengths: `[B]` (or scalar-free `[]` for one sequence) integers in `[1, T]`: steps past a
      sequence's end do not update its state and output zeros; the reverse direction reverses
      only the valid part. Mutually exclusive with `mask`.
    mask: `[B, T]` (or `[T]`) booleans, True where a step is valid: a masked step leaves the state
      unchanged and outputs zeros. With `bidirectional`, the mask must be a prefix (lengths).
    key: PRNG key enabling dropout between layers; None means no dropout (evaluation).
    backward: "manual" (hand-written BPTT via `custom_vjp`, default) or "autodiff".
    unroll: `lax.scan` unroll factor. 1 suits the CPU; on a GPU, where each scan iteration is a
      round of kernel launches, 16 made the benchmark's training steps 1.7-3.7x faster on an H100
      at the price of a longer compile (experiments/PERF_NOTES.md, "GPU").
    remat: trade compute for memory on long sequences: keep only every `remat`-th carry for the
      backward pass and recompute the forward chunk by chunk (`remat ~ sqrt(T)` is a good choice).
      None stores everything (fastest).
    impl: "sequential" (`lax.scan`, every cell) or "parallel" (the cell's `parallel_scan`, an
      associative scan of `O(log T)` depth; cells that have one: "mingru"). Same results.
    matmul_dtype: None (default: every matmul in the params' dtype), or a dtype such as
      `jnp.bfloat16` for the operands of the forward matmuls (`U x`, `W h`, `V h`) and of the
      manual backward's own (`d_r W` in the reverse loop, the weight gradient `dW` after it);
      products are accumulated in float32, and states, gates, loss and gradients stay float32.
      The matmuls JAX derives by autodiff (the gradients through `U x` and `V h`, and all of the
      backward with `backward="autodiff"`) run in float32 on the rounded operands. Gradients
      stay within ~1e-2 of float32 (tests/test_rnn.py); the training step ran 1.08-1.21x faster
      on a CPU with AVX512-BF16 (experiments/PERF_NOTES.md).

  Returns:
    `(hs, carry_T)`: top-layer outputs `[..., T, dirs * H]` and the final carry in `carry0`'s
    layout (for each sequence, the state after its last valid step).
  """
  batched, xs, carry0, mask = _prepare(spec, params, xs, carry0, lengths, mask, key, backward,
                                       unroll, impl, remat)
  matmul_dtype = _checks.matmul_dtype("matmul_dtype", matmul_dtype)
  hs, carry_T = _apply_time_major(spec, params, jnp.swapaxes(xs, 0, 1), carry0, mask, key,
                                  backward, unroll, impl, remat, matmul_dtype)
  hs = jnp.swapaxes(hs, 0, 1)
  if not batched:
    hs = hs[0]
    carry_T = tuple(c[:, 0] for c in carry_T)
  return hs, (carry_T[0] if spec.cell.carry_size == 1 else carry_T)


def _prepare(spec, params, xs, carry0, lengths, mask, key, backward, unroll, impl, remat):
  """Validate `apply`'s arguments and bring them to one batched form.

  Returns:
    `(batched, xs [B, T, D], carry0 tuple of [K, B, H], mask [B, T] bool or None)`.
  """
  _check_spec(spec)
  check_params(spec, params)
  batch_shape, t = _validate_inputs(spec, xs, carry0, lengths, mask, key)
  _checks.check_choice("backward", backward, ("manual", "autodiff"))
  _checks.check_choice("impl", impl, ("sequential", "parallel"))
  _checks.check_unroll("unroll", unroll)
  if remat is not None:
    _checks.check_positive_int("remat", remat)
  if impl == "parallel" and spec.cell.parallel_scan is None:
    raise ValueError(f"impl='parallel' needs a cell with a parallel_scan (e.g. 'mingru'); cell "
                     f"{spec.cell.name!r} has none, use impl='sequential'.")
  batched = len(batch_shape) == 1
  if not batched:
    xs = xs[None]
    lengths = None if lengths is None else jnp.reshape(lengths, (1,))
    mask = None if mask is None else jnp.asarray(mask)[None]
    if carry0 is not None:
      carry0 = jax.tree.map(lambda c: c[:, None], carry0)
  b = xs.shape[0]
  dtype = jnp.result_type(xs, params["layers"][0]["fwd"]["U"])
  if carry0 is None:
    carry0 = initial_carry(spec, params, (b,), dtype)
  if spec.cell.carry_size == 1:
    carry0 = (carry0,)
  if mask is not None:
    mask = jnp.asarray(mask, bool)
  if lengths is not None:
    mask = jnp.arange(t)[None, :] < lengths[:, None]
  return batched, xs, tuple(carry0), mask


def _apply_time_major(spec, params, xs, carry0, mask, key, backward, unroll, impl, remat,
                      matmul_dtype=None, with_readout=False):
  """The stack on time-major inputs: `xs [T, B, D] -> (hs [T, B, dirs * H], carry_T)`.

  Every layer reads and writes time-major (the layout `lax.scan` slices), so a stack transposes
  nothing between layers; `carry_T` is a tuple of `[K, B, H]`. `with_readout` (the loss): the
  first result is the readout's `z [T, B, O]` instead, applied where it saves the most memory
  when the top layer has one direction: fused into the native backward loop
  (`_fuses_readout`), or inside each `remat` chunk (`_run_direction_remat`'s `out`), where no
  `[T, B, H]` state gradient is kept for the top layer; else after the stack.
  """
  t, b = xs.shape[:2]
  mask_tm = None if mask is None else mask.T
  rev_idx = None
  if spec.bidirectional:
    lens = (jnp.full((b,), t, jnp.int32) if mask is None
            else jnp.sum(mask, axis=1, dtype=jnp.int32))
    rev_idx = _reverse_index(lens, t)

  def top(hs):
    return base.readout(hs, params["V"], params["c"], matmul_dtype)

  finals = [[] for _ in range(spec.cell.carry_size)]
  top_inside = False  # whether the top layer's outputs are already the readout's
  layer_in = xs
  for layer, entry in enumerate(params["layers"]):
    outs = []
    last = with_readout and not spec.bidirectional and layer == spec.num_layers - 1
    for j, direction in enumerate(spec.directions):
      k = layer * spec.num_directions + j
      c0 = tuple(c[k] for c in carry0)
      x_dir = layer_in if direction == "fwd" else _time_gather(layer_in, rev_idx)
      if last and remat is None and _fuses_readout(spec, entry[direction], x_dir, c0, mask_tm,
                                                   backward, impl, matmul_dtype, params["V"]):
        hs, carry_T = input_recurrence_readout(spec.cell, entry[direction], params["V"],
                                               params["c"], x_dir, c0, unroll)
        top_inside = True
      elif remat is None:
        hs, carry_T = _run_direction(spec.cell, entry[direction], x_dir, c0, mask_tm, backward,
                                     unroll, impl, matmul_dtype)
      else:
        hs, carry_T = _run_direction_remat(spec.cell, entry[direction], x_dir, c0, mask_tm,
                                           backward, unroll, impl, remat, matmul_dtype,
                                           top if last else None)
        top_inside = last
      outs.append(hs if direction == "fwd" else _time_gather(hs, rev_idx))
      for part, c in zip(finals, carry_T):
        part.append(c)
    layer_in = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)
    if key is not None and spec.dropout > 0 and layer < spec.num_layers - 1:
      key, sub = jax.random.split(key)
      keep = jax.random.bernoulli(sub, 1.0 - spec.dropout, layer_in.shape)
      layer_in = jnp.where(keep, layer_in / (1.0 - spec.dropout), 0)
  if with_readout and not top_inside:
    layer_in = top(layer_in)
  return layer_in, tuple(jnp.stack(part) for part in finals)


def initial_carry(spec: RNN, params: dict, batch_shape: tuple[int, ...] = (), dtype=None):
  """The default initial carry (learned `carry0` if the spec has one, else zeros).

  Returns:
    `[K, *batch_shape, H]`, or a tuple `(h0, c0)` of those for LSTM.
  """
  _check_spec(spec)
  check_params(spec, params)
  k = spec.num_layers * spec.num_directions
  shape = (k, *batch_shape, spec.hidden_size)
  dtype = dtype or params["layers"][0]["fwd"]["U"].dtype
  if spec.learn_initial_state:
    parts = tuple(jnp.broadcast_to(c.reshape((k,) + (1,) * len(batch_shape) + (-1,)), shape)
                  for c in params["carry0"])
  else:
    parts = tuple(jnp.zeros(shape, dtype) for _ in range(spec.cell.carry_size))
  return parts[0] if spec.cell.carry_size == 1 else parts


def step(spec: RNN, params: dict, carry, x: jax.Array):
  """One time step of a unidirectional stack, in `lax.scan` convention (for sampling).

  Uses each cell's single `pointwise` definition, exactly as `apply` does; no dropout.

  Args:
    spec: a unidirectional `RNN`.
    params: its params.
    carry: `[L, B, H]` (`[L, H]` unbatched), or `(h, c)` of those for LSTM.
    x: `[B, D]` or `[D]`.

  Returns:
    `(carry, h_top)`, `h_top` `[B, H]` (or `[H]`); feed it to `readout` for logits.
  """
  _check_spec(spec)
  if spec.bidirectional:
    raise ValueError("step needs a unidirectional spec (bidirectional=False): the reverse "
                     "direction needs the whole sequence; got bidirectional=True.")
  check_params(spec, params)
  _checks.check_float("x", x)
  if _checks.shape_of(x)[-1:] != (spec.input_size,) or len(_checks.shape_of(x)) not in (1, 2):
    raise ValueError(f"x must have shape [B, {spec.input_size}] or [{spec.input_size}]; got "
                     f"{list(_checks.shape_of(x))}.")
  _check_carry(spec, "carry", carry, _checks.shape_of(x)[:-1],
               " ([num_layers, B, H] with x [B, D], [num_layers, H] with x [D])")
  parts = (carry,) if spec.cell.carry_size == 1 else tuple(carry)
  new_parts = [[] for _ in parts]
  h = x
  for layer, entry in enumerate(params["layers"]):
    layer_carry, h = base.step(spec.cell, entry["fwd"], tuple(p[layer] for p in parts), h)
    for acc, c in zip(new_parts, layer_carry):
      acc.append(c)
  new = tuple(jnp.stack(acc) for acc in new_parts)
  return (new[0] if spec.cell.carry_size == 1 else new), h


def readout(spec: RNN, params: dict, hs: jax.Array, matmul_dtype=None) -> jax.Array:
  """The seed's readout `z_t = V h_t + c`: `[..., T, dirs * H] -> [..., T, O]` (logits, before g);
  `matmul_dtype` as in `apply`."""
  _check_spec(spec)
  if spec.output_size is None:
    raise ValueError("readout needs a spec with output_size set; got output_size=None.")
  fan_in = spec.hidden_size * spec.num_directions
  if not isinstance(params, Mapping) or not {"V", "c"} <= set(params):
    raise ValueError("params must hold the readout V [O, dirs * H] and c [O] (from "
                     "jaxrnn.rnn.init with output_size set).")
  _checks.check_shape("params['V']", params["V"], (spec.output_size, fan_in))
  _checks.check_shape("params['c']", params["c"], (spec.output_size,))
  _checks.check_float("hs", hs)
  if len(_checks.shape_of(hs)) < 1 or _checks.shape_of(hs)[-1] != fan_in:
    raise ValueError(f"hs must have shape [..., {fan_in}] (dirs * H, the top layer's outputs); "
                     f"got {list(_checks.shape_of(hs))}.")
  matmul_dtype = _checks.matmul_dtype("matmul_dtype", matmul_dtype)
  return base.readout(hs, params["V"], params["c"], matmul_dtype)


def _fuses_readout(spec, layer_params, xs, carry0, mask_tm, backward, impl, matmul_dtype, V):
  """Whether the loss's top layer (unidirectional; `_apply_time_major`) runs with the readout
  as `input_recurrence_readout`: the layer on the native loops (`kernels.applies`), the manual
  backward, and a readout small enough to fuse into its backward loop (`kernels.readout_fuses`).
  Nothing but the readout reads that layer's `hs`, so the loop may take `dL/dz` in place of
  `dL/dh`."""
  if backward != "manual" or impl != "sequential" or V.dtype != jnp.float32:
    return False
  return (kernels.applies(spec.cell, layer_params, xs, carry0, mask_tm, matmul_dtype)
          and kernels.readout_fuses(spec.output_size, spec.hidden_size))


def loss(spec: RNN, params: dict, xs: jax.Array, targets: jax.Array, carry0=None, *,
         loss: str = "mse", lengths=None, mask=None, key=None, backward: str = "manual",
         unroll: int = 1, impl: str = "sequential", remat: Optional[int] = None,
         matmul_dtype=None) -> jax.Array:
  """`L = (1/B) sum_b sum_t m_bt L_bt` on the readout (see `jaxrnn.losses`); a scalar.

  Steps past `lengths` (or where `mask` is False) do not count. Other args as in `apply`;
  `targets` is `[..., T, O]` floats, or `[..., T]` integer classes for "xent".
  """
  _check_spec(spec)
  if spec.output_size is None:
    raise ValueError("loss needs a spec with output_size set (a readout); got output_size=None.")
  _checks.check_sequence_input("xs", xs, spec.input_size)
  batch_time = _checks.shape_of(xs)[:-1]
  losses.check_targets(loss, targets, batch_time, spec.output_size)
  weights = mask                          # as given: bools, or real weights m_bt
  batched, xs, carry0, mask = _prepare(spec, params, xs, carry0, lengths, mask, key, backward,
                                       unroll, impl, remat)
  matmul_dtype = _checks.matmul_dtype("matmul_dtype", matmul_dtype)
  if lengths is not None:
    weights = mask
  # Time-major from here on: the scan's outputs feed the readout and the loss without a transpose
  # of `hs`; only the (narrower) targets and weights are transposed.
  z, _ = _apply_time_major(spec, params, jnp.swapaxes(xs, 0, 1), carry0, mask, key, backward,
                           unroll, impl, remat, matmul_dtype, with_readout=True)  # [T, B, O]
  targets = jnp.swapaxes(targets if batched else targets[None], 0, 1)
  if weights is not None:
    weights = jnp.reshape(jnp.asarray(weights), xs.shape[:2])
  weights = losses.step_weights(weights, xs.shape[:2], z.dtype)                  # m_bt / B
  return jnp.sum(weights.T * losses.step_losses(z, targets, loss))
