"""PyTorch interop: `nn.RNN`, `nn.LSTM` and `nn.GRU` weights to and from jaxrnn params, losslessly.

Shape legend: `D` input, `H` hidden, `L` layers, `G = num_blocks * H` (1 block for `nn.RNN`, 4 for
`nn.LSTM` in the order i, f, g, o, 3 for `nn.GRU` in the order r, z, n: PyTorch's orders, which
the jaxrnn cells share, so no block is permuted).

The library never imports torch: a state dict is a mapping of str to NumPy arrays, e.g.
``{k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}``. For layer `k` and
direction suffix `s` ("" forward, "_reverse" backward), PyTorch's keys map one to one::

  weight_ih_l{k}{s}  [G, D_k]  <->  params["layers"][k][dir]["U"]   D_0 = D, D_k = dirs * H
  weight_hh_l{k}{s}  [G, H]    <->  params["layers"][k][dir]["W"]
  bias_ih_l{k}{s}    [G]       <->  params["layers"][k][dir]["b"]
  bias_hh_l{k}{s}    [G]       <->  params["layers"][k][dir]["bh"]

with `dir` "fwd" for `s = ""` and "bwd" for `s = "_reverse"`. Both directions of layer `k > 0`
read `[h_fwd | h_bwd]`, as PyTorch does, and `rnn.apply` takes and returns carries in PyTorch's
`h_n` layout `[L * dirs, B, H]` (a tuple `(h, c)` for LSTM), so `hs, carry = rnn.apply(spec,
params, x, carry0)` matches `out, h_n = module(x, h_0)` for a `batch_first=True` module.

What does not convert:
  * A readout: PyTorch's recurrent modules have none, so converted specs have `output_size=None`.
    Add your own, e.g. `V, c = linear.weight, linear.bias` for an `nn.Linear` applied to `hs`.
  * `dropout`: a constructor argument, not a weight; set it with `spec._replace(dropout=p)`.
  * LSTM projections (`proj_size > 0`, keys `weight_hr_l*`): no jaxrnn equivalent; rejected.
  * `bias=False` modules (no `bias_*` keys) convert with zero `b` and `bh`;
    `to_torch(..., bias=False)` converts back and checks those biases are zero.

Example:
  >>> lstm = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
  >>> sd = {k: v.detach().numpy() for k, v in lstm.state_dict().items()}
  >>> spec, params = from_torch(sd, "lstm")
  >>> hs, (h_n, c_n) = rnn.apply(spec, params, xs)       # == lstm(torch.from_numpy(xs))
  >>> lstm.load_state_dict({k: torch.from_numpy(v) for k, v in to_torch(spec, params).items()})
"""
from __future__ import annotations

import collections
import re
from collections.abc import Mapping
from typing import Literal, Optional

import jax.numpy as jnp
import numpy as np

from jaxrnn import _checks
from jaxrnn import rnn as _rnn
from jaxrnn.cells.base import Cell
from jaxrnn.cells.elman import elman
from jaxrnn.cells.gru import gru
from jaxrnn.cells.lstm import lstm

TorchKind = Literal["rnn_tanh", "rnn_relu", "lstm", "gru"]

# kind -> (the PyTorch module, in messages; the jaxrnn cell).
_KINDS = {
    "rnn_tanh": ("nn.RNN(nonlinearity='tanh')", lambda: elman("tanh", two_biases=True)),
    "rnn_relu": ("nn.RNN(nonlinearity='relu')", lambda: elman("relu", two_biases=True)),
    "lstm": ("nn.LSTM", lstm),
    "gru": ("nn.GRU", gru),
}
_KIND_OF_CELL = {"elman_tanh": "rnn_tanh", "elman_relu": "rnn_relu", "lstm": "lstm", "gru": "gru"}
_SUFFIXES = {"fwd": "", "bwd": "_reverse"}
_LAYER_KEY = re.compile(r"^(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")


def torch_cell(kind: TorchKind) -> Cell:
  """The jaxrnn cell that computes what PyTorch module `kind` computes.

  "rnn_tanh" and "rnn_relu" give `cells.elman(f, two_biases=True)` (PyTorch's `nn.RNN` has two
  biases), "lstm" gives `cells.lstm()`, "gru" gives `cells.gru()`.
  """
  return _KINDS[_checks.check_choice("kind", kind, _KINDS)][1]()


def torch_kind(spec: _rnn.RNN) -> str:
  """The PyTorch module kind ("rnn_tanh", "rnn_relu", "lstm", "gru") for `spec`'s cell.

  Cells are recognised by `Cell.name`; anything else (an Elman cell with `f="sigmoid"`, a user
  cell) has no PyTorch module and raises a ValueError.
  """
  _rnn._check_spec(spec)
  cell = spec.cell
  kind = _KIND_OF_CELL.get(cell.name)
  if kind is None or (cell.num_blocks, cell.carry_size) != {
      "rnn_tanh": (1, 1), "rnn_relu": (1, 1), "lstm": (4, 2), "gru": (3, 1)}[kind]:
    raise ValueError(f"spec.cell {cell.name!r} has no PyTorch equivalent; convertible cells are "
                     "elman('tanh'), elman('relu') (nn.RNN), lstm() (nn.LSTM) and gru() (nn.GRU).")
  return kind


def torch_shapes(spec: _rnn.RNN, *, bias: bool = True) -> dict[str, tuple[int, ...]]:
  """PyTorch's state dict keys for `spec`, in PyTorch's order, with their shapes.

  Args:
    spec: an `RNN` spec whose cell has a PyTorch equivalent (see `torch_kind`).
    bias: include the `bias_*` keys (PyTorch's `bias=True`).

  Returns:
    `{"weight_ih_l0": (G, D), "weight_hh_l0": (G, H), "bias_ih_l0": (G,), ...}`.
  """
  torch_kind(spec)
  h, g = spec.hidden_size, spec.cell.num_blocks * spec.hidden_size
  return _expected_shapes(spec.input_size, h, g, spec.num_layers, spec.bidirectional, bias)


def _expected_shapes(d, h, g, num_layers, bidirectional, bias):
  """As `torch_shapes`; `d` or `h` may be None (unknown: matches any size)."""
  dirs = ("fwd", "bwd") if bidirectional else ("fwd",)
  shapes = {}
  for k in range(num_layers):
    d_k = d if k == 0 else (None if h is None else len(dirs) * h)
    for direction in dirs:
      s = f"_l{k}{_SUFFIXES[direction]}"
      shapes[f"weight_ih{s}"] = (g, d_k)
      shapes[f"weight_hh{s}"] = (g, h)
      if bias:
        shapes[f"bias_ih{s}"] = (g,)
        shapes[f"bias_hh{s}"] = (g,)
  return shapes


def _strip_prefix(state_dict, prefix: str) -> dict[str, np.ndarray]:
  if not isinstance(state_dict, Mapping):
    raise TypeError("state_dict must be a mapping of str to NumPy arrays, e.g. "
                    "{k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}; got "
                    f"{type(state_dict).__name__}.")
  return {k[len(prefix):]: np.asarray(v) for k, v in state_dict.items()
          if isinstance(k, str) and k.startswith(prefix)}


def _fmt_shape(shape) -> str:
  return "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"


def _check_state_dict(arrays: dict, expected: dict, what: str, hint: str = "") -> None:
  """Raise one ValueError listing every missing, unexpected, misshapen or non-float key.

  `hint` is added when some shape is wrong.
  """
  missing = [k for k in expected if k not in arrays]
  extra = sorted(k for k in arrays if k not in expected)
  wrong, not_float = [], []
  for key, want in expected.items():
    if key not in arrays:
      continue
    got = arrays[key].shape
    if len(got) != len(want) or any(w is not None and w != s for s, w in zip(got, want)):
      wrong.append(f"{key}: expected {_fmt_shape(want)}, got {list(got)}")
    if not jnp.issubdtype(arrays[key].dtype, jnp.floating):
      not_float.append(f"{key}: {arrays[key].dtype}")
  if not (missing or extra or wrong or not_float):
    return
  lines = [f"state_dict does not match {what}:"]
  if missing:
    lines.append(f"  missing keys: {missing}")
  if extra:
    lines.append(f"  unexpected keys: {extra}")
  if wrong:
    lines.append("  wrong shapes: " + "; ".join(wrong))
  if not_float:
    lines.append("  not floating point: " + "; ".join(not_float))
  if any(k.startswith("weight_hr_l") for k in extra):
    lines.append("LSTM projections (proj_size > 0, keys weight_hr_l*) have no jaxrnn equivalent.")
  if hint and wrong:
    lines.append(hint)
  raise ValueError("\n".join(lines))


def _infer_sizes(arrays: dict, num_blocks: int):
  """`(D or None, H or None, L, bidirectional)` from PyTorch's key names and shapes.

  H is the size most keys agree on, so that one misshapen array is reported as misshapen rather
  than making every other array look wrong. None means no key could tell; the check that follows
  then reports the keys that should have.
  """
  layer_keys = {k: _LAYER_KEY.match(k) for k in arrays}
  layer_keys = {k: m for k, m in layer_keys.items() if m}
  if not layer_keys:
    raise ValueError("state_dict has no PyTorch recurrent keys (weight_ih_l0, weight_hh_l0, "
                     f"bias_ih_l0, bias_hh_l0, ...); got keys {sorted(arrays)}. If the module is "
                     "part of a larger model, pass prefix= (e.g. prefix='rnn.').")
  num_layers = 1 + max(int(m.group(3)) for m in layer_keys.values())
  bidirectional = any(m.group(4) for m in layer_keys.values())
  votes = collections.Counter()
  # weight_hh_l0 first, so that it wins ties.
  for key in sorted(layer_keys, key=lambda k: (k != "weight_hh_l0", k)):
    shape = arrays[key].shape
    rows = shape[0] if len(shape) in (1, 2) else 0
    if key.startswith("weight_hh") and len(shape) == 2:
      votes[shape[1]] += 1
    if rows and rows % num_blocks == 0 and len(shape) == (1 if key.startswith("bias") else 2):
      votes[rows // num_blocks] += 1
  h = votes.most_common(1)[0][0] if votes else None
  d = None
  for key in ("weight_ih_l0", "weight_ih_l0_reverse"):
    if key in arrays and arrays[key].ndim == 2:
      d = arrays[key].shape[1]
      break
  return d, h, num_layers, bidirectional


def _to_params(spec, arrays: dict, has_bias: bool, dtype) -> dict:
  layers = []
  for k in range(spec.num_layers):
    entry = {}
    for direction in spec.directions:
      s = f"_l{k}{_SUFFIXES[direction]}"
      p = {"U": jnp.asarray(arrays[f"weight_ih{s}"], dtype),
           "W": jnp.asarray(arrays[f"weight_hh{s}"], dtype)}
      if has_bias:
        p["b"] = jnp.asarray(arrays[f"bias_ih{s}"], dtype)
        p["bh"] = jnp.asarray(arrays[f"bias_hh{s}"], dtype)
      else:  # bias=False: zero biases compute exactly what PyTorch's bias-free module does
        p["b"] = jnp.zeros(p["U"].shape[:1], p["U"].dtype)
        p["bh"] = jnp.zeros(p["U"].shape[:1], p["U"].dtype)
      entry[direction] = p
    layers.append(entry)
  return {"layers": layers}


def _has_bias(arrays: dict) -> bool:
  # bias=False modules have no bias_* key at all; any bias key means every one must be there.
  return any(k.startswith("bias_") for k in arrays)


def from_torch(state_dict: Mapping[str, np.ndarray], kind: TorchKind, *, dtype=None,
               prefix: str = "") -> tuple[_rnn.RNN, dict]:
  """Convert a PyTorch recurrent module's state dict into a jaxrnn `(spec, params)`.

  `input_size`, `hidden_size`, `num_layers` and `bidirectional` are read off the keys and shapes.

  Args:
    state_dict: str -> NumPy array, PyTorch's keys (`weight_ih_l0`, ...; see the module docstring).
    kind: "rnn_tanh" or "rnn_relu" (`nn.RNN` with that `nonlinearity`), "lstm" or "gru".
    dtype: the params' dtype; None keeps the arrays' dtype (float64 needs `jax.enable_x64`).
    prefix: only keys starting with `prefix` are read, without it (e.g. "encoder.rnn." for a
      submodule of a larger model's state dict); others are ignored.

  Returns:
    `(spec, params)` with `spec = rnn.rnn(torch_cell(kind), D, H, num_layers=L,
    bidirectional=...)` (no readout: `output_size=None`) and params as from `rnn.init(key, spec)`.

  Raises:
    ValueError: listing every missing, unexpected, wrongly shaped or non-float key at once.

  Example:
    >>> gru = torch.nn.GRU(3, 4, batch_first=True)
    >>> spec, params = from_torch({k: v.numpy() for k, v in gru.state_dict().items()}, "gru")
    >>> hs, h_n = rnn.apply(spec, params, xs)             # xs [B, T, 3] -> hs [B, T, 4]
  """
  module, _ = _KINDS[_checks.check_choice("kind", kind, _KINDS)]
  cell = torch_cell(kind)
  arrays = _strip_prefix(state_dict, prefix)
  d, h, num_layers, bidirectional = _infer_sizes(arrays, cell.num_blocks)
  has_bias = _has_bias(arrays)
  g = None if h is None else cell.num_blocks * h
  expected = _expected_shapes(d, h, g, num_layers, bidirectional, has_bias)
  what = (f"a PyTorch {module} with input_size={'?' if d is None else d}, "
          f"hidden_size={'?' if h is None else h}, num_layers={num_layers}, "
          f"bidirectional={bidirectional}, bias={has_bias} (inferred from its keys)")
  hint = (f"For kind={kind!r} the gate rows G are {cell.num_blocks} * hidden_size; check that "
          "kind matches the module.")
  _check_state_dict(arrays, expected, what, hint)
  spec = _rnn.rnn(cell, d, h, num_layers=num_layers, bidirectional=bidirectional)
  return spec, _to_params(spec, arrays, has_bias, dtype)


def params_from_torch(spec: _rnn.RNN, state_dict: Mapping[str, np.ndarray], *, dtype=None,
                      prefix: str = "") -> dict:
  """Convert a PyTorch state dict into params for a given `spec` (the spec's readout excluded).

  Args:
    spec: an `RNN` spec with `output_size=None` and no `learn_initial_state`, whose cell has a
      PyTorch equivalent (see `torch_kind`). An Elman spec built with `rnn.rnn("elman", ...)` works
      too: its params then carry PyTorch's second bias `bh`, which the Elman cell adds.
    state_dict, dtype, prefix: as in `from_torch`.

  Returns:
    params for `spec`, as from `rnn.init(key, spec)` (with `bh` in every cell).

  Raises:
    ValueError: listing every missing, unexpected, wrongly shaped or non-float key at once.
  """
  kind = torch_kind(spec)
  _check_no_extras(spec, "params_from_torch")
  arrays = _strip_prefix(state_dict, prefix)
  has_bias = _has_bias(arrays)
  g = spec.cell.num_blocks * spec.hidden_size
  expected = _expected_shapes(spec.input_size, spec.hidden_size, g, spec.num_layers,
                              spec.bidirectional, has_bias)
  what = (f"a PyTorch {_KINDS[kind][0]} with input_size={spec.input_size}, "
          f"hidden_size={spec.hidden_size}, num_layers={spec.num_layers}, "
          f"bidirectional={spec.bidirectional}, bias={has_bias} (from spec)")
  _check_state_dict(arrays, expected, what)
  return _to_params(spec, arrays, has_bias, dtype)


def _check_no_extras(spec, fn: str) -> None:
  if spec.output_size is not None or spec.learn_initial_state:
    raise ValueError(
        f"{fn} converts only the recurrent layers, which is all a PyTorch nn.RNN/LSTM/GRU holds; "
        f"got a spec with output_size={spec.output_size}, "
        f"learn_initial_state={spec.learn_initial_state}. Pass spec._replace(output_size=None, "
        "learn_initial_state=False) and {'layers': params['layers']}, and move the readout "
        "(V [O, dirs * H], c [O]) to an nn.Linear's weight and bias yourself.")


def to_torch(spec: _rnn.RNN, params: dict, *, bias: bool = True,
             prefix: str = "") -> dict[str, np.ndarray]:
  """Convert jaxrnn params into a PyTorch state dict (NumPy arrays, PyTorch's keys and order).

  Args:
    spec: an `RNN` spec with `output_size=None` and no `learn_initial_state`, whose cell has a
      PyTorch equivalent (see `torch_kind`).
    params: its params (concrete arrays, not tracers). A cell without `bh` (the seed's Elman
      cell) gets `bias_hh` zeros, which computes the same.
    bias: emit the `bias_*` keys, for a module built with `bias=True` (the default). With False,
      every `b` and `bh` must be zero, else a ValueError lists the nonzero ones.
    prefix: prepended to every key.

  Returns:
    `{"weight_ih_l0": [G, D], "weight_hh_l0": [G, H], "bias_ih_l0": [G], "bias_hh_l0": [G], ...}`
    as writable NumPy copies, ready for
    `module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})`.
  """
  torch_kind(spec)
  _check_no_extras(spec, "to_torch")
  _rnn.check_params(spec, params)
  out, nonzero = {}, []
  for k, entry in enumerate(params["layers"]):
    for direction in spec.directions:
      p, s = entry[direction], f"_l{k}{_SUFFIXES[direction]}"
      out[prefix + f"weight_ih{s}"] = np.array(p["U"])
      out[prefix + f"weight_hh{s}"] = np.array(p["W"])
      b = np.array(p["b"])
      bh = np.array(p["bh"]) if "bh" in p else np.zeros_like(b)
      if bias:
        out[prefix + f"bias_ih{s}"] = b
        out[prefix + f"bias_hh{s}"] = bh
      else:
        nonzero += [f"params['layers'][{k}][{direction!r}][{name!r}]"
                    for name, v in (("b", b), ("bh", bh)) if np.any(v != 0)]
  if nonzero:
    raise ValueError(f"to_torch(..., bias=False) drops the biases, but these are nonzero: "
                     f"{nonzero}. Use bias=True (a PyTorch module built with bias=True).")
  return out
