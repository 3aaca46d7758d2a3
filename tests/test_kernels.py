"""The native LSTM and GRU loops (jaxrnn.kernels): same numbers as the definitions, used where
they apply.

References: the float64 NumPy loop of tests/reference.py for the forward, `jax.grad` through the
`lax.scan` path (`backward="autodiff"`) for the gradients, and the library's `lax.scan` forward
and manual backward for the kernels' raw outputs.
"""
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrnn import kernels, rnn
from jaxrnn.backward import recurrent_scan_bwd
from jaxrnn.cells import elman, gru, lstm
from jaxrnn.scan import recurrent_scan

from conftest import rel_err
import reference


def test_library_builds_here():
  """The machines this project runs on (CI included) have a C++ compiler: the kernels must build
  (elsewhere the library falls back to the scan; see the fallback tests below)."""
  assert kernels.library() is not None, kernels.build_error()

# (B, T, D, H): row counts that take every tile after the 6-row ones (`RowTiles`: B = 17 ends
# with a 4- and a 1-row tile, 32 with a 2-row one, 3 with 2 + 1, 19 with 1), an odd number of
# 16-unit chunks (H = 48), one chunk (H = 16), 2-thread splits (B * H * H large enough): by units
# (B = 17, 19: under 32 rows) and by rows (B = 32: 16 each; B = 35: 16 and 19, a 16-row block
# and a 3-row tail in the second thread's transposes); under 16 rows, more than 32 steps (the
# backward writes its gradients 16 steps at a time there: full groups, a 16 x 16 transpose at
# B = 1, and a partial last group).
SHAPES = [(3, 7, 5, 16), (1, 9, 1, 48), (17, 6, 3, 64), (19, 4, 3, 32), (32, 5, 7, 128),
          (35, 4, 3, 32), (1, 37, 2, 32), (3, 34, 2, 16)]
# Past 32 MB of gate-major residuals (4 blocks x 4 bytes x H T B) the forward writes them with
# non-temporal stores (`kStreamMinBytes` in cells_cpu.cc), which the backward then reads.
STREAMED = (16, 2100, 2, 64)
assert 4 * 4 * 64 * 2100 * 16 > 32 * 2**20 and kernels.gate_major(STREAMED[0])


CELLS = {"lstm": lstm(), "gru": gru()}


def _inputs(cell, b, t, d, h, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  params = CELLS[cell].init(ks[0], d, h)
  xs = jax.random.normal(ks[1], (t, b, d))
  h0 = 0.5 * jax.random.normal(ks[2], (b, h))
  c0 = 0.5 * jax.random.normal(ks[3], (b, h))
  return params, xs, h0, c0


def _custom_calls(text):
  return set(re.findall(r"jaxrnn_(?:elman|lstm|gru)_(?:forward|backward)", text))


def _forward(cell, params, xs, h0, c0):
  if cell == "lstm":
    return kernels.lstm_forward(xs, params["U"], params["W"], params["b"] + params["bh"], h0, c0)
  return kernels.gru_forward(xs, params["U"], params["W"], params["b"], params["bh"], h0)


def _scan(cell, params, xs, h0, c0):
  a = jnp.einsum("tbd,gd->tbg", xs, params["U"], precision="highest")
  carry0 = (h0, c0) if cell == "lstm" else (h0,)
  return a, carry0, recurrent_scan(CELLS[cell], params, a, carry0)[2]


def _piece_rows(cell, b, t, h):
  """The rows of the pieces a loop keeps its residual or gradient blocks in: one array (the GRU's
  as 3H | H), or, where the four blocks pass `HEAP_LIMIT_BYTES`, one array per block."""
  if 4 * 4 * h * t * b > kernels.HEAP_LIMIT_BYTES:
    return [h] * 4
  return [4 * h] if cell == "lstm" else [3 * h, h]


def _joined(pieces, b):
  """A loop's residual or gradient pieces as one time-major `[T, B, 4H]` array."""
  if kernels.gate_major(b):
    return jnp.transpose(jnp.concatenate(pieces), (1, 2, 0))
  return jnp.concatenate(pieces, axis=-1)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("b,t,d,h", SHAPES + [STREAMED])
def test_forward_matches_numpy_reference(cell, b, t, d, h):
  params, xs, h0, c0 = _inputs(cell, b, t, d, h)
  out = jax.jit(functools.partial(_forward, cell))(params, xs, h0, c0)
  hs = out[0]
  for i in range(b):
    want_hs, (_, want_c) = reference.cell_loop(cell, params, xs[:, i], h0[i], c0[i])
    np.testing.assert_allclose(hs[:, i], want_hs, rtol=0, atol=2e-6)
    if cell == "lstm":
      np.testing.assert_allclose(out[1][-1, i], want_c, rtol=0, atol=5e-6)
  # The saved residuals are what the scan path saves (i | f | g | o, or r | z | n | rec_n):
  # gate-major ([4H, T, B], the GRU's as [3H | H, T, B]) from 16 rows on.
  _, _, saved = _scan(cell, params, xs, h0, c0)
  residuals = _joined(out[-1], b)
  rows = [k.shape[0 if kernels.gate_major(b) else -1] for k in out[-1]]
  assert rows == _piece_rows(cell, b, t, h)
  assert residuals.shape == (t, b, 4 * h)
  if cell == "lstm":
    np.testing.assert_allclose(residuals, saved.res, rtol=0, atol=2e-6)  # g as sigmoid(2z)
    np.testing.assert_allclose(out[1], saved.carries[1], rtol=0, atol=5e-6)
  else:
    s, n, rec_n = saved.res                                              # r | z | n | rec_n
    want = jnp.concatenate([s[..., :2 * h], n, rec_n], axis=-1)
    np.testing.assert_allclose(residuals, want, rtol=0, atol=5e-6)


def _unroll(d_t):
  """The loops' gradients `[., T, B]` come rolled by one step (column t - 1 holds step t's, the
  last column step 0's): back in step order."""
  return jnp.concatenate([d_t[:, -1:], d_t[:, :-1]], axis=1)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("b,t,d,h", SHAPES + [STREAMED])
def test_backward_matches_scan_backward(cell, b, t, d, h):
  params, xs, h0, c0 = _inputs(cell, b, t, d, h)
  a, carry0, saved = _scan(cell, params, xs, h0, c0)
  ks = jax.random.split(jax.random.key(1), 3)
  d_hs = jax.random.normal(ks[0], (t, b, h))
  d_T = (jax.random.normal(ks[1], (b, h)), jax.random.normal(ks[2], (b, h)))[:len(carry0)]
  d_rec, want_da, want_dcarry = recurrent_scan_bwd(CELLS[cell], params, a, carry0, None, saved,
                                                   d_hs, d_T)
  h_prev = jnp.concatenate([h0[None], saved.carries[0][:-1]]).reshape(t * b, h)
  if cell == "lstm":
    _, _, s = _forward(cell, params, xs, h0, c0)
    d_pieces, *d_carry, db = jax.jit(kernels.lstm_backward)(params["W"], s, saved.carries[1], c0,
                                                            d_hs, *d_T)
    # gate-major, whatever b
    assert [d.shape for d in d_pieces] == [(r, t, b) for r in _piece_rows(cell, b, t, h)]
    d_t = _unroll(jnp.concatenate(d_pieces))
    d_a, d_rec_rows = d_t, d_t
    want_sums = {"b": d_rec["b"], "bh": d_rec["bh"]}
    got_sums = {"b": db, "bh": db}
  else:
    _, res = _forward(cell, params, xs, h0, c0)
    d_pieces, *d_carry, sums = jax.jit(kernels.gru_backward)(params["W"], res, saved.carries[0],
                                                             h0, d_hs, *d_T)
    assert [d.shape for d in d_pieces] == [(r, t, b) for r in _piece_rows(cell, b, t, h)]
    d_t = _unroll(jnp.concatenate(d_pieces))                # d_r | d_z | d_n r | d_n
    d_a = jnp.concatenate([d_t[:2 * h], d_t[3 * h:]])
    d_rec_rows = d_t[:3 * h]
    want_sums = {"b": d_rec["b"], "bh": d_rec["bh"]}     # b: d_r | d_z | d_n; bh: d_r | d_z | d_n r
    got_sums = {"b": jnp.concatenate([sums[:2 * h], sums[3 * h:]]), "bh": sums[:3 * h]}
  assert rel_err(jnp.transpose(d_a, (1, 2, 0)), want_da) < 1e-5
  # The recurrent rows give the scan's dW (for the GRU, through its d_n r block).
  assert rel_err(d_rec_rows.reshape(-1, t * b) @ h_prev, d_rec["W"]) < 1e-5
  assert len(d_carry) == len(want_dcarry)
  for got, want in zip(d_carry, want_dcarry):
    assert rel_err(got, want) < 1e-5
  # The biases' gradients, which the loop adds up itself: the scan backward's sums over T, B.
  for k in ("b", "bh"):
    assert got_sums[k].shape == want_sums[k].shape
    assert rel_err(got_sums[k], want_sums[k]) < 1e-5


def _grads(spec, backward, **kw):
  def loss(params, xs, carry0, ys):
    return rnn.loss(spec, params, xs, ys, carry0, backward=backward, **kw)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

# The Elman loops: H a multiple of 64 (the tile takes 16 units from each quarter of H); with and
# without the second bias; every activation; gate-major output from 1 to 35 rows (32 and 35 split
# between two threads by rows); 1 and 2 rows over more than 32 steps (16-step groups, as above).
ELMAN_SHAPES = [(3, 7, 5, 64), (1, 9, 1, 128), (17, 4, 3, 64), (32, 5, 7, 128), (35, 4, 3, 128),
                (1, 37, 2, 64), (2, 33, 3, 64)]


def _elman_inputs(f, b, t, d, h, two_biases, seed=0):
  cell = elman(f, two_biases=two_biases)
  ks = jax.random.split(jax.random.key(seed), 3)
  params = cell.init(ks[0], d, h)
  return cell, params, jax.random.normal(ks[1], (t, b, d)), 0.5 * jax.random.normal(ks[2], (b, h))


@pytest.mark.parametrize("f,two_biases", [("tanh", False), ("sigmoid", True), ("relu", False)])
@pytest.mark.parametrize("b,t,d,h", ELMAN_SHAPES)
def test_elman_forward_matches_numpy_reference(f, two_biases, b, t, d, h):
  _, params, xs, h0 = _elman_inputs(f, b, t, d, h, two_biases)
  bias = params["b"] + params["bh"] if two_biases else params["b"]
  hs = jax.jit(functools.partial(kernels.elman_forward, activation=f))(
      xs, params["U"], params["W"], bias, h0)
  assert hs.shape == (t, b, h)
  for i in range(b):
    want, _ = reference.cell_loop(f, params, xs[:, i], h0[i])
    np.testing.assert_allclose(hs[:, i], want, rtol=0, atol=2e-6)


@pytest.mark.parametrize("f,two_biases", [("tanh", True), ("sigmoid", False), ("relu", False)])
@pytest.mark.parametrize("b,t,d,h", ELMAN_SHAPES)
def test_elman_backward_matches_scan_backward(f, two_biases, b, t, d, h):
  cell, params, xs, h0 = _elman_inputs(f, b, t, d, h, two_biases)
  a = jnp.einsum("tbd,gd->tbg", xs, params["U"], precision="highest")
  _, _, saved = recurrent_scan(cell, params, a, (h0,))
  ks = jax.random.split(jax.random.key(1), 2)
  d_hs = jax.random.normal(ks[0], (t, b, h))
  dh_T = jax.random.normal(ks[1], (b, h))
  d_rec, want_da, (want_dh0,) = recurrent_scan_bwd(cell, params, a, (h0,), None, saved, d_hs,
                                                   (dh_T,))
  e, dh0, db = jax.jit(functools.partial(kernels.elman_backward, activation=f))(
      params["W"], saved.carries[0], d_hs, dh_T)
  assert e.shape == (h, t, b)
  d_t = _unroll(e)                     # rolled: column t - 1 holds delta_t, the last delta_0
  assert rel_err(jnp.transpose(d_t, (1, 2, 0)), want_da) < 1e-5
  h_prev = jnp.concatenate([h0[None], saved.carries[0][:-1]]).reshape(t * b, h)
  assert rel_err(d_t.reshape(h, t * b) @ h_prev, d_rec["W"]) < 1e-5
  assert rel_err(dh0, want_dh0) < 1e-5
  assert db.shape == (h,) and rel_err(db, d_rec["b"]) < 1e-5  # the loop's own sum over T, B


def test_elman_kernel_rejects_a_bad_activation_by_name():
  xs, z = jnp.ones((2, 1, 3)), jnp.zeros((1, 64))
  with pytest.raises(ValueError, match=r"activation must be one of \['relu', 'sigmoid', "
                                       r"'tanh'\]; got 'gelu'"):
    kernels.elman_forward(xs, jnp.ones((64, 3)), jnp.ones((64, 64)), jnp.zeros(64), z, "gelu")



# By name: the cell, the loop family. Elman with and without the second bias.
GRAD_CELLS = {"lstm": ("lstm", "lstm"), "gru": ("gru", "gru"),
              "elman_tanh": (elman("tanh"), "elman"),
              "elman_relu_two_biases": (elman("relu", two_biases=True), "elman")}


# LSTM and GRU: row-major residuals, and gate-major (b = 19).
@pytest.mark.parametrize("name,b,t,d,h",
                         [(c, *shape) for c in ("lstm", "gru") for shape in SHAPES[:4]]
                         + [("elman_tanh", 3, 7, 5, 64), ("elman_relu_two_biases", 19, 4, 3, 64)])
def test_loss_gradients_equal_autodiff_params_inputs_and_state(name, b, t, d, h, monkeypatch):
  """One layer: the loop with the readout fused (`input_recurrence_readout`)."""
  calls = []
  real = rnn.input_recurrence_readout
  monkeypatch.setattr(rnn, "input_recurrence_readout",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  cell, family = GRAD_CELLS[name]
  spec = rnn.rnn(cell, d, h, output_size=3)
  params = rnn.init(jax.random.key(2), spec)
  ks = jax.random.split(jax.random.key(3), 4)
  xs = jax.random.normal(ks[0], (b, t, d))
  ys = jax.random.normal(ks[1], (b, t, 3))
  carry0 = (jax.random.normal(ks[2], (1, b, h)), jax.random.normal(ks[3], (1, b, h)))
  carry0 = carry0 if family == "lstm" else carry0[0]
  manual = _grads(spec, "manual")
  assert _custom_calls(manual.lower(params, xs, carry0, ys).as_text()) == {
      f"jaxrnn_{family}_forward", f"jaxrnn_{family}_backward"}
  assert calls == [1]
  got = manual(params, xs, carry0, ys)
  want = _grads(spec, "autodiff")(params, xs, carry0, ys)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("cell,b", [("lstm", 3), ("lstm", 16), ("gru", 3), ("gru", 16)])
def test_residuals_past_the_heap_limit_come_one_array_per_block(cell, b, monkeypatch):
  """Past `HEAP_LIMIT_BYTES` (lowered here so that small shapes pass it) the loops keep one array
  per gate block: the same numbers, the same gradients (the GRU's weight gradients are then
  assembled per block), and the backward still writes over the residuals."""
  t, d, h = 5, 4, 16
  params, xs, h0, c0 = _inputs(cell, b, t, d, h)
  whole = jax.jit(functools.partial(_forward, cell))(params, xs, h0, c0)
  spec = rnn.rnn(cell, d, h, output_size=3)
  rparams = rnn.init(jax.random.key(2), spec)
  bxs = jax.random.normal(jax.random.key(3), (b, t, d))
  ys = jax.random.normal(jax.random.key(4), (b, t, 3))
  want = _grads(spec, "autodiff")(rparams, bxs, None, ys)
  monkeypatch.setattr(kernels, "HEAP_LIMIT_BYTES", 1024)
  assert kernels.pieces(cell, b, t, h) == (1, 1, 1, 1)
  split = jax.jit(functools.partial(_forward, cell))(params, xs, h0, c0)
  shape = (h, t, b) if kernels.gate_major(b) else (t, b, h)
  assert [k.shape for k in split[-1]] == [shape] * 4
  np.testing.assert_array_equal(_joined(split[-1], b), _joined(whole[-1], b))
  for got, w in zip(split[:-1], whole[:-1]):
    np.testing.assert_array_equal(got, w)
  manual = _grads(spec, "manual")
  compiled = manual.lower(rparams, bxs, None, ys).compile()
  assert _custom_calls(compiled.as_text()) == {f"jaxrnn_{cell}_forward", f"jaxrnn_{cell}_backward"}
  got = manual(rparams, bxs, None, ys)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_err(g, w) < 1e-5
  if kernels.gate_major(b):  # aliased: one set of four [H, T, B] arrays, not two
    gates, states = 4 * h * t * b * 4, h * t * b * 4
    assert compiled.memory_analysis().temp_size_in_bytes < gates + 5 * states


@pytest.mark.parametrize("cell,b,h", [("lstm", 2, 16), ("lstm", 16, 16),  # row-major, gate-major
                                      ("gru", 2, 16), ("gru", 16, 16), ("elman", 2, 64)])
def test_stack_bidirectional_and_vmap_equal_autodiff(cell, b, h):
  spec = rnn.rnn(cell, 4, h, num_layers=2, bidirectional=True, output_size=2)
  params = rnn.init(jax.random.key(4), spec)
  xs = jax.random.normal(jax.random.key(5), (3, b, 6, 4))        # a vmapped axis of 3
  ys = jax.random.normal(jax.random.key(6), (3, b, 6, 2))

  def grads(backward):
    g = jax.grad(lambda p, x, y: rnn.loss(spec, p, x, y, backward=backward))
    return jax.jit(jax.vmap(g, in_axes=(None, 0, 0)))

  assert f"jaxrnn_{cell}_backward" in grads("manual").lower(params, xs, ys).as_text()
  got, want = grads("manual")(params, xs, ys), grads("autodiff")(params, xs, ys)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_apply_uses_the_native_forward_and_matches_the_reference(cell):
  spec = rnn.rnn(cell, 3, 32)
  params = rnn.init(jax.random.key(7), spec)
  xs = jax.random.normal(jax.random.key(8), (2, 5, 3))
  fn = jax.jit(lambda p, x: rnn.apply(spec, p, x)[0])
  assert _custom_calls(fn.lower(params, xs).as_text()) == {f"jaxrnn_{cell}_forward"}
  hs = fn(params, xs)
  layer = params["layers"][0]["fwd"]
  for i in range(2):
    np.testing.assert_allclose(hs[i], reference.cell_loop(cell, layer, xs[i])[0], atol=2e-6)


@pytest.mark.parametrize("case", ["mask", "hidden_not_multiple_of_16", "matmul_dtype",
                                  "float64", "no_library", "elman_hidden_not_multiple_of_64",
                                  "autodiff", "own_pointwise"])
def test_falls_back_to_the_scan_where_the_kernel_does_not_apply(case, monkeypatch):
  h = {"hidden_not_multiple_of_16": 20, "elman_hidden_not_multiple_of_64": 48}.get(case, 16)
  cell = "elman" if case.startswith("elman") else "lstm"
  if case == "own_pointwise":  # same math, but a user's function: the loop must not stand in
    cell = lstm()._replace(pointwise=lambda a, r, carry: lstm().pointwise(a, r, carry))
  spec = rnn.rnn(cell, 3, h, output_size=2)
  dtype = jnp.float64 if case == "float64" else jnp.float32
  kw = {}
  if case == "mask":
    kw["lengths"] = jnp.array([4, 2])
  if case == "matmul_dtype":
    kw["matmul_dtype"] = jnp.bfloat16
  if case == "no_library":
    monkeypatch.setattr(kernels, "library", lambda: None)
  with jax.enable_x64(case == "float64"):
    params = rnn.init(jax.random.key(9), spec, dtype=dtype)
    xs = jax.random.normal(jax.random.key(10), (2, 4, 3), dtype)
    ys = jax.random.normal(jax.random.key(11), (2, 4, 2), dtype)
    backward = "autodiff" if case == "autodiff" else "manual"
    text = _grads(spec, backward, **kw).lower(params, xs, None, ys).as_text()
  assert not _custom_calls(text)
  assert "while" in text  # the lax.scan loops


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_the_backward_writes_its_gradients_over_the_forward_residuals(cell):
  """The gradient's temporaries hold one set of gate-major gate arrays (four `[H, T, B]`), not
  two: the backward's outputs take the buffers of the forward's residual gates
  (`input_output_aliases`)."""
  t, b, d, h = 64, 32, 8, 128
  spec = rnn.rnn(cell, d, h, output_size=4)
  params = rnn.init(jax.random.key(0), spec)
  xs, ys = jnp.ones((b, t, d)), jnp.ones((b, t, 4))
  compiled = jax.jit(jax.grad(lambda p: rnn.loss(spec, p, xs, ys))).lower(params).compile()
  assert _custom_calls(compiled.as_text()) == {f"jaxrnn_{cell}_forward", f"jaxrnn_{cell}_backward"}
  gates = 4 * h * t * b * 4                    # bytes of four [H, T, B] float32 arrays
  states = h * t * b * 4                       # bytes of one [T, B, H] array
  # The residual gates (then the gradients) plus hs, cs or the saved input, d_hs, h_{t-1} and
  # room for the small ones: with a second set of gate arrays this would be 3 MB over.
  assert compiled.memory_analysis().temp_size_in_bytes < gates + 5 * states


@pytest.mark.parametrize("cell", ["elman", "lstm", "gru"])
def test_lowered_for_gpu_the_same_function_is_the_scan(cell):
  """`lax.platform_dependent`: a trace exported for CUDA carries no CPU custom call."""
  spec = rnn.rnn(cell, 3, 64 if cell == "elman" else 16, output_size=2)
  params = rnn.init(jax.random.key(12), spec)
  xs, ys = jnp.ones((2, 4, 3)), jnp.ones((2, 4, 2))
  f = jax.jit(jax.grad(lambda p: rnn.loss(spec, p, xs, ys)))
  native = [jax.export.DisabledSafetyCheck.custom_call(f"jaxrnn_{cell}_{d}")
            for d in ("forward", "backward")]
  with pytest.raises(ValueError, match=f"jaxrnn_{cell}_forward"):
    jax.export.export(f, platforms=["cpu"])(params)  # no compatibility guarantee: opt in
  cpu = jax.export.export(f, platforms=["cpu"], disabled_checks=native)(params).mlir_module()
  cuda = jax.export.export(f, platforms=["cuda"])(params).mlir_module()
  assert _custom_calls(cpu) == {f"jaxrnn_{cell}_forward", f"jaxrnn_{cell}_backward"}
  assert not _custom_calls(cuda) and "stablehlo.while" in cuda


def test_one_and_two_threads_give_identical_results():
  """Two threads split the hidden units (3 and 16 rows; at 3 rows over 34 steps the backward
  writes each thread's units 16 steps at a time from the ring of step blocks) or the rows (32
  rows, in groups of 16; the biases' sums are added per group, in group order); every number is
  computed by the same code as with one thread."""
  code = """
import jax, numpy as np
from jaxrnn import kernels
from jaxrnn.cells import elman, gru, lstm
outs = []
for b, t in ((3, 34), (16, 6), (32, 6)):
  p = lstm().init(jax.random.key(0), 8, 64)
  xs = jax.random.normal(jax.random.key(1), (t, b, 8))
  z = np.zeros((b, 64), np.float32)
  hs, cs, s = kernels.lstm_forward(xs, p["U"], p["W"], p["b"] + p["bh"], z, z)
  d_a, *d = kernels.lstm_backward(p["W"], s, cs, z, jax.numpy.ones_like(hs), z, z)
  q = gru().init(jax.random.key(2), 8, 64)
  ghs, res = kernels.gru_forward(xs, q["U"], q["W"], q["b"], q["bh"], z)
  d_g, *e = kernels.gru_backward(q["W"], res, ghs, z, jax.numpy.ones_like(ghs), z)
  r = elman().init(jax.random.key(3), 8, 128)  # two 64-unit tiles: one per thread
  z2 = np.zeros((b, 128), np.float32)
  ehs = kernels.elman_forward(xs, r["U"], r["W"], r["b"], z2)
  f = kernels.elman_backward(r["W"], ehs, jax.numpy.ones_like(ehs), z2)
  outs += [hs, cs, *s, *d_a, *d, ghs, *res, *d_g, *e, ehs, *f]
print(kernels.threads_for(16, 64))
np.save(__import__("sys").argv[1], np.concatenate([np.ravel(x) for x in outs]))
"""
  out = {}
  for threads in ("1", "2"):
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"jaxrnn_threads_{os.getpid()}_{threads}.npy")
    env = dict(os.environ, JAXRNN_THREADS=threads)
    proc = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True,
                          text=True, check=True)
    assert proc.stdout.split()[-1] == threads
    out[threads] = np.load(path)
    os.unlink(path)
  np.testing.assert_array_equal(out["1"], out["2"])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux CPU affinity")
def test_loops_give_every_thread_its_cpu_affinity_back():
  """The loops keep each of their threads on its own CPU during a call (two threads on one CPU
  took turns at every step) and then restore what the thread had: afterwards every thread of the
  process has the affinity it had before, a user's restriction included (with a single CPU
  allowed nothing is pinned, and the results are the same)."""
  code = """
import os, sys
import jax, jax.numpy as jnp, numpy as np
from jaxrnn import kernels
from jaxrnn.cells import gru, lstm
if sys.argv[1] == "one":
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
p = lstm().init(jax.random.key(0), 8, 64)
q = gru().init(jax.random.key(2), 8, 64)
xs = jax.random.normal(jax.random.key(1), (6, 16, 8))
z = jnp.zeros((16, 64))
def masks():
  return {t: os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")}
def run():
  hs, cs, s = kernels.lstm_forward(xs, p["U"], p["W"], p["b"] + p["bh"], z, z)
  d_a, *d = kernels.lstm_backward(p["W"], s, cs, z, jnp.ones_like(hs), z, z)
  ghs, res = kernels.gru_forward(xs, q["U"], q["W"], q["b"], q["bh"], z)
  d_g, *e = kernels.gru_backward(q["W"], res, ghs, z, jnp.ones_like(ghs), z)
  return np.concatenate([np.ravel(x) for x in (hs, cs, *s, *d_a, *d, ghs, *res, *d_g, *e)])
before = masks()  # XLA's threads exist once the arrays above do
first = run()
again = [run() for _ in range(5)]
after = masks()
changed = [t for t in before if t in after and before[t] != after[t]]
print(len(before), len(changed), all(np.array_equal(first, a) for a in again))
np.save(sys.argv[2], first)
"""
  out = {}
  for mode in ("all", "one"):
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                        f"jaxrnn_affinity_{os.getpid()}_{mode}.npy")
    env = dict(os.environ, JAXRNN_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", code, mode, path], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads, changed, same = proc.stdout.split()[-3:]
    assert int(threads) > 2 and changed == "0" and same == "True", proc.stdout
    out[mode] = np.load(path)
    os.unlink(path)
  np.testing.assert_array_equal(out["all"], out["one"])


def test_concurrent_calls_finish_and_agree():
  """Several JAX computations running the loops at once (Python threads): each call's helper
  threads come from XLA's pool, which the other calls may occupy; a call must not wait for a
  helper that cannot start (it hung before the join timeout), and the results stay exact."""
  code = """
import threading, sys
import jax, jax.numpy as jnp, numpy as np
from jaxrnn import rnn
out = {}
for cell in ("lstm", "gru"):
  spec = rnn.rnn(cell, 16, 64, output_size=4)
  p = rnn.init(jax.random.key(0), spec)
  x, y = jnp.ones((16, 30, 16)), jnp.ones((16, 30, 4))
  f = jax.jit(jax.grad(lambda p, x, y: rnn.loss(spec, p, x, y)))
  want = jax.tree.leaves(f(p, x, y))
  bad = []
  def work():
    for _ in range(5):
      got = jax.tree.leaves(f(p, x, y))
      bad.extend(i for i, (g, w) in enumerate(zip(got, want)) if not np.array_equal(g, w))
  threads = [threading.Thread(target=work) for _ in range(6)]
  for t in threads: t.start()
  for t in threads: t.join()
  out[cell] = len(bad)
print(out["lstm"], out["gru"])
"""
  env = dict(os.environ, JAXRNN_THREADS="2")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split() == ["0", "0"]


def test_bad_thread_count_names_the_variable(monkeypatch):
  monkeypatch.setenv("JAXRNN_THREADS", "two")
  with pytest.raises(ValueError, match="JAXRNN_THREADS must be a positive integer; got 'two'"):
    kernels.threads_for(32, 128)
  monkeypatch.setenv("JAXRNN_THREADS", "0")
  with pytest.raises(ValueError, match="got '0'"):
    kernels.threads_for(32, 128)


def _backward_call(cell, b, t, d, h, seed=0):
  """One cell's backward loop as a function of its output cotangent (`d_hs`, `readout`), on
  fixed forward residuals."""
  if cell == "elman":
    _, params, xs, h0 = _elman_inputs("tanh", b, t, d, h, False, seed)
    hs = kernels.elman_forward(xs, params["U"], params["W"], params["b"], h0)
    return jax.jit(lambda d_hs, dh_T, readout: kernels.elman_backward(
        params["W"], hs, d_hs, dh_T, readout=readout))
  params, xs, h0, c0 = _inputs(cell, b, t, d, h)
  if cell == "lstm":
    _, cs, s = _forward(cell, params, xs, h0, c0)
    return jax.jit(lambda d_hs, dh_T, readout: kernels.lstm_backward(
        params["W"], s, cs, c0, d_hs, dh_T, 0.5 * dh_T, readout=readout))
  hs, res = _forward(cell, params, xs, h0, c0)
  return jax.jit(lambda d_hs, dh_T, readout: kernels.gru_backward(
      params["W"], res, hs, h0, d_hs, dh_T, readout=readout))


@pytest.mark.parametrize("cell,b,h", [("lstm", 3, 16), ("lstm", 19, 32), ("gru", 3, 16),
                                      ("gru", 19, 32), ("elman", 3, 64), ("elman", 19, 128)])
def test_a_fused_readout_gives_the_backward_of_its_d_hs(cell, b, h):
  """`readout=(dz, V)`: the loop adds `dz_t V` to each step's state gradient itself; the same
  numbers as the loop given `d_hs = dz V` (computed here in float64 NumPy), with `d_hs` None or
  added to it."""
  t, d, o = 6, 5, 7
  call = _backward_call(cell, b, t, d, h)
  ks = jax.random.split(jax.random.key(7), 4)
  dz = jax.random.normal(ks[0], (t, b, o))
  V = jax.random.normal(ks[1], (o, h))
  extra = jax.random.normal(ks[2], (t, b, h))
  dh_T = jax.random.normal(ks[3], (b, h))
  d_hs = jnp.asarray(np.einsum("tbo,oh->tbh", np.float64(dz), np.float64(V)), jnp.float32)
  want = call(d_hs, dh_T, None)
  got = call(None, dh_T, (dz, V))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape
    assert rel_err(g, w) < 1e-5
  both = call(extra, dh_T, (dz, V))
  for g, w in zip(jax.tree.leaves(both), jax.tree.leaves(call(d_hs + extra, dh_T, None))):
    assert rel_err(g, w) < 1e-5
  # Without the readout's part the gradients are different ones: the assertions above can fail.
  assert rel_err(jax.tree.leaves(call(extra, dh_T, None))[0], jax.tree.leaves(both)[0]) > 0.1


def test_bad_cotangents_are_rejected_by_name():
  t, b, h = 3, 2, 64
  call = lambda d_hs, readout: kernels.elman_backward(
      jnp.ones((h, h)), jnp.ones((t, b, h)), d_hs, jnp.ones((b, h)), readout=readout)
  with pytest.raises(ValueError, match=r"elman_backward: d_hs may be None only with a readout; "
                                       r"got d_hs=None, readout=None"):
    call(None, None)
  with pytest.raises(ValueError, match=r"elman_backward: d_hs must have shape \(3, 2, 64\) "
                                       r"\(\[T, B, H\]\); got \(3, 2, 32\)"):
    call(jnp.ones((t, b, 32)), None)
  with pytest.raises(ValueError, match=r"elman_backward: readout must be \(dz \[T, B, O\], "
                                       r"V \[O, H\]\) with T=3, B=2, H=64; got dz \(3, 2, 5\), "
                                       r"V \(4, 64\)"):
    call(None, (jnp.ones((t, b, 5)), jnp.ones((4, h))))
  with pytest.raises(ValueError, match=r"gru_backward: readout must be float32; got dz float32, "
                                       r"V int32"):
    kernels.gru_backward(jnp.ones((3 * 16, 16)), (jnp.ones((t, b, 48)), jnp.ones((t, b, 16))),
                         jnp.ones((t, b, 16)), jnp.ones((b, 16)), None, jnp.ones((b, 16)),
                         readout=(jnp.ones((t, b, 5)), jnp.ones((5, 16), jnp.int32)))


@pytest.mark.parametrize("cell", ["elman", "lstm", "gru"])
def test_the_loss_fuses_its_readout_into_the_backward_loop(cell):
  """`rnn.loss` on one layer runs the readout inside the native path: the step holds no
  `d_hs [T, B, H]` (about one `[T, B, H]` array less than the same loss written as `apply` +
  `readout` + the loss), and its gradients are autodiff's."""
  t, b, d, h = 48, 32, 8, 128
  spec = rnn.rnn(cell, d, h, output_size=4)
  params = rnn.init(jax.random.key(0), spec)
  xs = jax.random.normal(jax.random.key(1), (b, t, d))
  ys = jax.random.normal(jax.random.key(2), (b, t, 4))

  def unfused(p):
    z = rnn.readout(spec, p, rnn.apply(spec, p, xs)[0])
    return 0.5 * jnp.sum((z - ys) ** 2) / b          # mse: (1/B) sum_bt 1/2 ||z - y||^2

  fused = jax.jit(jax.grad(lambda p: rnn.loss(spec, p, xs, ys)))
  plain = jax.jit(jax.grad(unfused))
  np.testing.assert_allclose(rnn.loss(spec, params, xs, ys), unfused(params), rtol=1e-6)
  text = fused.lower(params).compile().as_text()
  assert _custom_calls(text) == {f"jaxrnn_{cell}_forward", f"jaxrnn_{cell}_backward"}
  temp = lambda f: f.lower(params).compile().memory_analysis().temp_size_in_bytes
  # XLA's packing of the rest moves by a few KB either way: at least 3/4 of the array's bytes.
  assert temp(plain) - temp(fused) >= 0.75 * t * b * h * 4
  want = jax.jit(jax.grad(lambda p: rnn.loss(spec, p, xs, ys, backward="autodiff")))(params)
  for g, w, u in zip(jax.tree.leaves(fused(params)), jax.tree.leaves(want),
                     jax.tree.leaves(plain(params))):
    assert rel_err(g, w) < 1e-5 and rel_err(u, w) < 1e-5


@pytest.mark.parametrize("cell,h,layers", [("elman", 64, 1), ("lstm", 16, 1), ("gru", 16, 1),
                                           ("lstm", 16, 2), ("elman", 64, 2)])
def test_the_fused_readout_under_vmap_and_in_stacks_equals_autodiff(cell, h, layers, monkeypatch):
  """The top layer of a unidirectional stack takes the readout into its loop too."""
  calls = []
  real = rnn.input_recurrence_readout
  monkeypatch.setattr(rnn, "input_recurrence_readout",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  spec = rnn.rnn(cell, 4, h, num_layers=layers, output_size=3)
  params = rnn.init(jax.random.key(4), spec)
  xs = jax.random.normal(jax.random.key(5), (2, 3, 6, 4))        # a vmapped axis of 2
  ys = jax.random.normal(jax.random.key(6), (2, 3, 6, 3))

  def grads(backward):
    g = jax.grad(lambda p, x, y: rnn.loss(spec, p, x, y, backward=backward))
    return jax.jit(jax.vmap(g, in_axes=(None, 0, 0)))

  got, want = grads("manual")(params, xs, ys), grads("autodiff")(params, xs, ys)
  assert calls == [1]                                  # the top layer only, traced once
  assert f"jaxrnn_{cell}_backward" in grads("manual").lower(params, xs, ys).as_text()
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("cell", ["elman", "lstm", "gru"])
def test_off_the_cpu_the_fused_readout_is_the_scan_and_the_readout(cell, monkeypatch):
  """The branch `lax.platform_dependent` takes on GPU/TPU, forced here: no custom call, and the
  gradients of the scan's manual backward through the readout are autodiff's."""
  monkeypatch.setattr(jax.lax, "platform_dependent",
                      lambda *args, cpu, default: default(*args))
  spec = rnn.rnn(cell, 3, 64 if cell == "elman" else 16, output_size=2)
  params = rnn.init(jax.random.key(12), spec)
  xs = jax.random.normal(jax.random.key(13), (2, 5, 3))
  ys = jax.random.normal(jax.random.key(14), (2, 5, 2))
  manual = jax.jit(jax.grad(lambda p: rnn.loss(spec, p, xs, ys)))
  assert not _custom_calls(manual.lower(params).as_text())
  want = jax.grad(lambda p: rnn.loss(spec, p, xs, ys, backward="autodiff"))(params)
  for g, w in zip(jax.tree.leaves(manual(params)), jax.tree.leaves(want)):
    assert rel_err(g, w) < 1e-5


@pytest.mark.parametrize("cell,h", [("elman", 64), ("lstm", 16), ("gru", 16)])
def test_the_fused_readouts_final_carry_is_differentiable(cell, h, monkeypatch):
  """`input_recurrence_readout` returns `(z, carry_T)`: a loss of both gives the gradients of the
  scan branch (autodiff through the readout, the same cell's scan backward)."""
  from jaxrnn import backward
  spec = rnn.rnn(cell, 3, h, output_size=2)
  params = rnn.init(jax.random.key(20), spec)
  layer, V, c = params["layers"][0]["fwd"], params["V"], params["c"]
  xs = jax.random.normal(jax.random.key(21), (5, 4, 3))               # time-major
  carry0 = tuple(0.1 * jax.random.normal(jax.random.key(22 + i), (4, h))
                 for i in range(2 if cell == "lstm" else 1))
  wz, wc = jax.random.normal(jax.random.key(25), (5, 4, 2)), jax.random.normal(jax.random.key(26),
                                                                            (4, h))

  def f(layer, V, c, xs, carry0):
    z, carry_T = backward.input_recurrence_readout(spec.cell, layer, V, c, xs, carry0)
    return jnp.sum(wz * z) + sum(jnp.sum(wc * ct) for ct in carry_T)

  grad = jax.grad(f, argnums=(0, 1, 2, 3, 4))
  got = jax.jit(grad)(layer, V, c, xs, carry0)
  assert _custom_calls(jax.jit(grad).lower(layer, V, c, xs, carry0).as_text())
  monkeypatch.setattr(jax.lax, "platform_dependent",
                      lambda *args, cpu, default: default(*args))
  want = grad(layer, V, c, xs, carry0)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_err(g, w) < 1e-5


def test_a_readout_too_big_for_the_cache_is_not_fused(monkeypatch):
  spec = rnn.rnn("lstm", 3, 16, output_size=4)
  params = rnn.init(jax.random.key(0), spec)
  xs, ys = jnp.ones((2, 5, 3)), jnp.ones((2, 5, 4))
  calls = []
  real = rnn.input_recurrence_readout
  monkeypatch.setattr(rnn, "input_recurrence_readout",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  g1 = jax.grad(lambda p: rnn.loss(spec, p, xs, ys))(params)
  assert calls == [1]
  monkeypatch.setattr(kernels, "READOUT_MAX_BYTES", 4 * 16 * 4 - 1)   # V [4, 16] is 256 bytes
  assert not kernels.readout_fuses(4, 16) and kernels.readout_fuses(3, 16)
  g2 = jax.grad(lambda p: rnn.loss(spec, p, xs, ys))(params)
  assert calls == [1]
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    assert rel_err(a, b) < 1e-5


def test_bad_shapes_are_rejected_by_the_kernel():
  x = jnp.ones((2, 3, 4))
  with pytest.raises(Exception, match="lstm kernel: expected H a positive multiple of 16"):
    kernels.lstm_forward(x, jnp.ones((80, 4)), jnp.ones((80, 20)), jnp.ones(80),
                         jnp.ones((3, 20)), jnp.ones((3, 20)))
  with pytest.raises(Exception, match="gru kernel: expected H a positive multiple of 16"):
    kernels.gru_forward(x, jnp.ones((60, 4)), jnp.ones((60, 20)), jnp.ones(60), jnp.ones(60),
                        jnp.ones((3, 20)))
  with pytest.raises(Exception, match="elman kernel: expected H a positive multiple of 64"):
    kernels.elman_forward(x, jnp.ones((48, 4)), jnp.ones((48, 48)), jnp.ones(48),
                          jnp.ones((3, 48)))
  # Residuals in the other layout than the batch size implies (gate-major from 16 rows on).
  t, b, h = 3, 16, 16
  state, w = jnp.ones((b, h)), jnp.ones((4 * h, h))
  with pytest.raises(ValueError, match=r"lstm_backward: s must be 1 array\(s\) of shapes "
                     r"\[\(64, 3, 16\)\] \(gate-major for batch 16, as the forward returns "
                     r"them\); got \[\(3, 16, 64\)\]"):
    kernels.lstm_backward(w, (jnp.ones((t, b, 4 * h)),), jnp.ones((t, b, h)), state,
                          jnp.ones((t, b, h)), state, state)
  with pytest.raises(ValueError, match=r"lstm_backward: s must be 1 array\(s\) .*; got one array "
                     r"of shape \(64, 3, 16\)"):  # an array, not the forward's tuple
    kernels.lstm_backward(w, jnp.ones((4 * h, t, b)), jnp.ones((t, b, h)), state,
                          jnp.ones((t, b, h)), state, state)
  with pytest.raises(ValueError, match=r"gru_backward: res must be 2 array\(s\) of shapes "
                     r"\[\(48, 3, 16\), \(16, 3, 16\)\] .*; got \[\(48, 3, 16\)\]"):
    kernels.gru_backward(w[:3 * h], (jnp.ones((3 * h, t, b)),), jnp.ones((t, b, h)), state,
                         jnp.ones((t, b, h)), state)


def test_build_is_cached_and_keyed_by_the_source(tmp_path):
  """A fresh cache directory gets one library, built once; a changed source gets another.

  The compiler here is a stand-in that logs each call and copies this process's library to the
  output it is given (a real build takes about 14 s; `test_library_builds_here` does one)."""
  assert kernels.library() is not None, kernels.build_error()
  calls = tmp_path / "calls.txt"
  fake = tmp_path / "fake-c++"
  fake.write_text("#!/bin/sh\n"
                  f"echo \"$*\" >> {calls}\n"
                  "while [ \"$1\" != -o ]; do shift; done\n"
                  f"cp {kernels.library_info()['path']} \"$2\"\n")
  fake.chmod(0o755)
  code = ("import sys; from jaxrnn import kernels; from pathlib import Path; "
          "kernels._SOURCE = Path(sys.argv[1]); "
          "print(kernels.library() is not None, kernels.library_info()['built_s'] is not None, "
          "kernels.library_info()['path'])")
  src = tmp_path / "cells_cpu.cc"
  src.write_text(kernels._SOURCE.read_text())
  env = dict(os.environ, JAXRNN_CACHE_DIR=str(tmp_path / "cache"), CXX=str(fake))
  run = lambda: subprocess.run([sys.executable, "-c", code, str(src)], env=env,
                               capture_output=True, text=True, check=True).stdout.split()
  compiled = lambda: calls.read_text().splitlines() if calls.exists() else []
  loaded, built, path = run()
  assert (loaded, built) == ("True", "True")  # compiled by this process
  assert list((tmp_path / "cache").glob("*.so")) == [Path(path)]
  assert len(compiled()) == 1 and str(src) in compiled()[0] and "-march=native" in compiled()[0]
  assert run() == ["True", "False", path]  # the same file, from the cache: no compiler call
  assert len(compiled()) == 1 and len(list((tmp_path / "cache").glob("*.so"))) == 1
  src.write_text(kernels._SOURCE.read_text() + "\n// changed\n")
  loaded, built, other = run()
  assert (loaded, built) == ("True", "True") and other != path
  assert len(compiled()) == 2 and len(list((tmp_path / "cache").glob("*.so"))) == 2
  assert not list((tmp_path / "cache").glob("*.tmp"))  # no half-built leftovers


def test_no_compiler_or_no_cache_means_no_kernel_and_a_reason(tmp_path):
  code = ("from jaxrnn import kernels; print(kernels.library() is None); "
          "print(kernels.build_error())")
  env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"),
             JAXRNN_CACHE_DIR=str(tmp_path / "cache"))
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout
  assert out.splitlines()[0] == "True"
  assert "no C++ compiler" in out
  (tmp_path / "a_file").write_text("")
  env = dict(os.environ, JAXRNN_CACHE_DIR=str(tmp_path / "a_file" / "cache"))  # cannot be made
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout
  assert out.splitlines()[0] == "True"
  assert "Error" in out.splitlines()[1]
  env = dict(os.environ, JAXRNN_NATIVE="0")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True).stdout
  assert out.splitlines() == ["True", "turned off by JAXRNN_NATIVE=0"]


def test_the_build_command_reports_the_library_or_why_not(tmp_path):
  """`python -m jaxrnn.kernels` builds ahead of the first step; here the cache already has it."""
  assert kernels.library() is not None, kernels.build_error()
  done = subprocess.run([sys.executable, "-m", "jaxrnn.kernels"], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  assert f"{kernels.library_info()['path']} (found in the cache;" in done.stdout
  done = subprocess.run([sys.executable, "-m", "jaxrnn.kernels"], capture_output=True, text=True,
                        env=dict(os.environ, JAXRNN_NATIVE="0"))
  assert done.returncode == 1 and "not available (turned off by JAXRNN_NATIVE=0)" in done.stderr
