"""jaxrnn.rnn: stacks, bidirectional layers, lengths and masks, initial states, any cell."""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from jaxrnn import cells, rnn
from conftest import rel_err
from reference import cell_loop

CELLS = ("elman", "elman_relu", "lstm", "gru")
D, H, O, T = 3, 4, 2, 7


def _data(b=4, t=T, dtype=jnp.float32, seed=1):
  ks = jax.random.split(jax.random.key(seed), 3)
  xs = jax.random.normal(ks[0], (b, t, D), dtype)
  ys = jax.random.normal(ks[1], (b, t, O), dtype)
  lengths = jnp.array([t, 2, 5, 1][:b])
  return xs, ys, lengths


def _carry(spec, b, dtype=jnp.float32, seed=7):
  k = spec.num_layers * spec.num_directions
  parts = tuple(0.5 * jax.random.normal(jax.random.key(seed + i), (k, b, H), dtype)
                for i in range(spec.cell.carry_size))
  return parts[0] if spec.cell.carry_size == 1 else parts


@functools.cache
def _grads(spec, backward, with_lengths):
  def objective(params, xs, ys, carry0, lengths):
    hs, carry_T = rnn.apply(spec, params, xs, carry0, lengths=lengths if with_lengths else None,
                            backward=backward)
    value = rnn.loss(spec, params, xs, ys, carry0, lengths=lengths if with_lengths else None,
                     backward=backward)
    # Use the final carry too, so its cotangent path is checked.
    return value + 0.3 * sum(jnp.sum(jnp.sin(c)) for c in jax.tree.leaves(carry_T))
  return jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 3)))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers,bidir", [(1, False), (2, True)])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("x64", [True, False])
def test_manual_equals_autodiff(cell, layers, bidir, with_lengths, x64):
  tol = 1e-10 if x64 else 1e-5
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    spec = rnn.rnn(cell, D, H, num_layers=layers, bidirectional=bidir, output_size=O)
    params = jax.tree.map(lambda v: v.astype(dtype), rnn.init(jax.random.key(0), spec))
    xs, ys, lengths = _data(dtype=dtype)
    carry0 = _carry(spec, 4, dtype)
    v_m, g_m = _grads(spec, "manual", with_lengths)(params, xs, ys, carry0, lengths)
    v_a, g_a = _grads(spec, "autodiff", with_lengths)(params, xs, ys, carry0, lengths)
    assert rel_err(v_m, v_a) <= tol
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(g_m), jax.tree.leaves(g_a)):
      assert rel_err(got, want) <= tol, (jax.tree_util.keystr(path), rel_err(got, want))
      assert got.dtype == dtype
    assert float(jnp.linalg.norm(g_a[0]["layers"][0]["fwd"]["W"])) > 0


@pytest.mark.parametrize("cell", CELLS)
def test_single_layer_matches_numpy_loop(cell):
  spec = rnn.rnn(cell, D, H)
  params = rnn.init(jax.random.key(2), spec)
  xs, _, _ = _data(b=2)
  carry0 = _carry(spec, 2)
  hs, carry_T = rnn.apply(spec, params, xs, carry0)
  name = {"elman": "tanh", "elman_relu": "relu"}.get(cell, cell)
  parts = carry0 if isinstance(carry0, tuple) else (carry0,)
  for b in range(2):
    init = [p[0, b] for p in parts]
    hs_ref, (h_ref, c_ref) = cell_loop(name, params["layers"][0]["fwd"], xs[b], *init)
    np.testing.assert_allclose(hs[b], hs_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.tree.leaves(carry_T)[0][0, b], h_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers,bidir", [(1, True), (2, True), (2, False)])
def test_padded_batch_equals_each_sequence_alone(cell, layers, bidir):
  spec = rnn.rnn(cell, D, H, num_layers=layers, bidirectional=bidir)
  params = rnn.init(jax.random.key(3), spec)
  xs, _, lengths = _data()
  carry0 = _carry(spec, 4)
  # Garbage in the padding must not leak into anything.
  pad = jnp.arange(T)[None, :, None] >= lengths[:, None, None]
  xs = jnp.where(pad, 1e3, xs)
  hs, carry_T = rnn.apply(spec, params, xs, carry0, lengths=lengths)
  for b, n in enumerate(np.asarray(lengths)):
    alone_carry = jax.tree.map(lambda c: c[:, b], carry0)
    hs_b, carry_b = rnn.apply(spec, params, xs[b, :n], alone_carry)
    np.testing.assert_allclose(hs[b, :n], hs_b, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(hs[b, n:]).max(initial=0)) == 0.0  # zeros at padded steps
    for got, want in zip(jax.tree.leaves(carry_T), jax.tree.leaves(carry_b)):
      np.testing.assert_allclose(got[:, b], want, rtol=1e-5, atol=1e-6)


def test_mask_freezes_state_and_zeroes_outputs():
  spec = rnn.rnn("gru", D, H)
  params = rnn.init(jax.random.key(4), spec)
  xs, _, _ = _data(b=1)
  mask = jnp.array([[True, False, True, True, False, False, True]])
  hs, carry = rnn.apply(spec, params, xs, mask=mask)
  hs_kept, carry_kept = rnn.apply(spec, params, xs[:, np.asarray(mask[0])])
  np.testing.assert_allclose(hs[0, np.asarray(mask[0])], hs_kept[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(hs[0, ~np.asarray(mask[0])], 0.0)
  np.testing.assert_allclose(carry, carry_kept, rtol=1e-5, atol=1e-6)


def test_final_carry_continues_the_sequence():
  spec = rnn.rnn("lstm", D, H, num_layers=2)
  params = rnn.init(jax.random.key(5), spec)
  xs, _, _ = _data(b=3)
  hs, carry = rnn.apply(spec, params, xs)
  hs1, carry1 = rnn.apply(spec, params, xs[:, :3])
  hs2, carry2 = rnn.apply(spec, params, xs[:, 3:], carry1)
  np.testing.assert_allclose(jnp.concatenate([hs1, hs2], 1), hs, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(carry2[1], carry[1], rtol=1e-5, atol=1e-6)
  # And rnn.step, the sampling path, reproduces the same states one step at a time.
  c = rnn.initial_carry(spec, params, (3,))
  for t in range(T):
    c, h = rnn.step(spec, params, c, xs[:, t])
    np.testing.assert_allclose(h, hs[:, t], rtol=1e-5, atol=1e-6)


def test_learned_initial_state_is_a_trained_parameter():
  spec = rnn.rnn("gru", D, H, output_size=O, learn_initial_state=True)
  params = rnn.init(jax.random.key(6), spec)
  assert params["carry0"].shape == (1, 1, H)
  xs, ys, _ = _data()
  params = {**params, "carry0": params["carry0"] + 0.5}
  hs, _ = rnn.apply(spec, params, xs)
  hs_given, _ = rnn.apply(spec, params, xs, jnp.full((1, 4, H), 0.5))
  np.testing.assert_allclose(hs, hs_given, rtol=1e-6)
  g = jax.grad(lambda p: rnn.loss(spec, p, xs, ys))(params)
  assert float(jnp.abs(g["carry0"]).sum()) > 0


def test_dropout_between_layers_only_with_a_key():
  spec = rnn.rnn("lstm", D, H, num_layers=2, dropout=0.5)
  params = rnn.init(jax.random.key(7), spec)
  xs, _, _ = _data()
  no_key, _ = rnn.apply(spec, params, xs)
  no_drop, _ = rnn.apply(spec._replace(dropout=0.0), params, xs)
  np.testing.assert_array_equal(no_key, no_drop)
  a, _ = rnn.apply(spec, params, xs, key=jax.random.key(1))
  b, _ = rnn.apply(spec, params, xs, key=jax.random.key(1))
  c, _ = rnn.apply(spec, params, xs, key=jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, no_key) and not np.allclose(a, c)


def test_unbatched_input(key):
  spec = rnn.rnn("lstm", D, H, bidirectional=True)
  params = rnn.init(key, spec)
  xs, _, _ = _data(b=1)
  hs, (h, c) = rnn.apply(spec, params, xs[0])
  hs_b, (h_b, c_b) = rnn.apply(spec, params, xs)
  assert hs.shape == (T, 2 * H) and h.shape == (2, H)
  np.testing.assert_allclose(hs, hs_b[0], rtol=1e-6)


def minimal_cell() -> jaxrnn.Cell:
  """A user's new cell, h_t = h_{t-1} + tanh(a_t + r_t) * 0.5, with no hand-written backward."""
  def init(key, input_size, hidden_size, dtype=jnp.float32):
    return cells.elman("tanh").init(key, input_size, hidden_size, dtype)

  def pointwise(a, r, carry):
    h = carry[0] + 0.5 * jnp.tanh(a + r)
    return (h,), ()
  return jaxrnn.Cell("leaky", 1, 1, init, pointwise)


_MINIMAL = minimal_cell()


def test_a_custom_cell_gets_every_feature():
  spec = rnn.rnn(_MINIMAL, D, H, num_layers=2, bidirectional=True, output_size=O)
  params = rnn.init(jax.random.key(8), spec)
  xs, ys, lengths = _data()
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda v: v.astype(jnp.float64), params)
    x64, y64 = xs.astype(jnp.float64), ys.astype(jnp.float64)
    g_m = jax.grad(lambda p: rnn.loss(spec, p, x64, y64, lengths=lengths))(p64)
    g_a = jax.grad(lambda p: rnn.loss(spec, p, x64, y64, lengths=lengths, backward="autodiff"))(p64)
    for got, want in zip(jax.tree.leaves(g_m), jax.tree.leaves(g_a)):
      assert rel_err(got, want) <= 1e-10
  # Its equations, by hand, for one layer.
  one = rnn.rnn(_MINIMAL, D, H)
  p1 = rnn.init(jax.random.key(9), one)
  hs, _ = rnn.apply(one, p1, xs[:1])
  w = {k: np.asarray(v, np.float64) for k, v in p1["layers"][0]["fwd"].items()}
  h = np.zeros(H)
  for t in range(T):
    h = h + 0.5 * np.tanh(w["U"] @ np.asarray(xs[0, t], np.float64) + w["b"] + w["W"] @ h)
    np.testing.assert_allclose(hs[0, t], h, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bad input
def _spec_params(cell="lstm", **kw):
  spec = rnn.rnn(cell, D, H, output_size=O, **kw)
  return spec, rnn.init(jax.random.key(0), spec)


BAD = [
    ("lengths above T", lambda s, p, x: rnn.apply(s, p, x, lengths=jnp.array([8, 1, 1, 1])),
     ValueError, r"lengths must lie in \[1, T=7\]; got min 1, max 8"),
    ("lengths zero", lambda s, p, x: rnn.apply(s, p, x, lengths=jnp.array([0, 1, 1, 1])),
     ValueError, r"lengths must lie in \[1, T=7\]; got min 0"),
    ("lengths shape", lambda s, p, x: rnn.apply(s, p, x, lengths=jnp.array([1, 2])), ValueError,
     r"lengths must have shape \[4\] \(one length per sequence\); got \[2\]"),
    ("float lengths", lambda s, p, x: rnn.apply(s, p, x, lengths=jnp.ones(4)), TypeError,
     r"lengths must hold integer class indices|lengths must hold integer"),
    ("mask shape", lambda s, p, x: rnn.apply(s, p, x, mask=jnp.ones((4, 6), bool)), ValueError,
     r"mask must have shape \[4, 7\] \(True at the valid steps\); got \[4, 6\]"),
    ("both", lambda s, p, x: rnn.apply(s, p, x, lengths=jnp.ones(4, int), mask=jnp.ones((4, 7))),
     ValueError, "pass at most one of lengths"),
    ("carry structure", lambda s, p, x: rnn.apply(s, p, x, jnp.zeros((1, 4, H))), ValueError,
     r"carry0 for lstm must be a tuple of 2 arrays \(h0, c0\), each \[1, 4, 4\]; got ArrayImpl"),
    ("carry shape", lambda s, p, x: rnn.apply(s, p, x, (jnp.zeros((1, 4, H)), jnp.zeros((4, H)))),
     ValueError, r"carry0\[1\] must have shape \[1, 4, 4\]"),
    ("params layer shape", lambda s, p, x: rnn.apply(
        s, {**p, "layers": [{"fwd": {**p["layers"][0]["fwd"], "W": jnp.zeros((16, 5))}}]}, x),
     ValueError, r"params\['layers'\]\[0\]\['fwd'\]\['W'\] must have shape \[16, 4\]; got \[16, 5\]"),
    ("params layers count", lambda s, p, x: rnn.apply(s, {**p, "layers": p["layers"] * 2}, x),
     ValueError, r"params\['layers'\] must be a list of num_layers=1 entries; got 2"),
    ("missing readout", lambda s, p, x: rnn.loss(s, {"layers": p["layers"]}, x, jnp.zeros((4, 7, 2))),
     ValueError, r"params must have keys \['V', 'c', 'layers'\] for this spec; missing \['V', 'c'\]"),
    ("bad key", lambda s, p, x: rnn.apply(s, p, x, key=3), TypeError, "key must be a PRNG key"),
    ("integer matmul dtype", lambda s, p, x: rnn.apply(s, p, x, matmul_dtype=jnp.int32),
     ValueError, "matmul_dtype must be None or a floating dtype such as jnp.bfloat16; got"),
    ("unknown matmul dtype", lambda s, p, x: rnn.loss(s, p, x, jnp.zeros((4, 7, 2)),
                                                      matmul_dtype="bf17"),
     ValueError, "matmul_dtype must be None or a floating dtype such as jnp.bfloat16; got 'bf17'"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_errors(name, call, exc, match):
  spec, params = _spec_params()
  xs, _, _ = _data()
  with pytest.raises(exc, match=match):
    call(spec, params, xs)


def test_bad_spec_errors():
  with pytest.raises(ValueError, match="num_layers must be an integer >= 1; got 0"):
    rnn.rnn("lstm", D, H, num_layers=0)
  with pytest.raises(ValueError, match=r"cell must be one of .*; got 'transformer'"):
    rnn.rnn("transformer", D, H)
  with pytest.raises(ValueError, match=r"dropout must be a rate in \[0, 1\); got 1.5"):
    rnn.rnn("gru", D, H, dropout=1.5)
  with pytest.raises(ValueError, match="step needs a unidirectional spec"):
    spec, params = _spec_params(bidirectional=True)
    rnn.step(spec, params, rnn.initial_carry(spec, params, (2,)), jnp.zeros((2, D)))


@pytest.mark.parametrize("cell,layers,bidirectional", [("elman", 2, True), ("lstm", 2, True),
                                                       ("gru", 1, False), ("lstm", 2, False)])
def test_remat_gives_the_same_values_and_gradients(cell, layers, bidirectional):
  """The memory option (chunked recomputation) changes memory, not results: T = 7 in chunks of 3
  (unidirectional: the loss's readout inside each chunk)."""
  with jax.enable_x64(True):
    spec = rnn.rnn(cell, D, H, num_layers=layers, bidirectional=bidirectional, output_size=O)
    params = jax.tree.map(lambda v: v.astype(jnp.float64), rnn.init(jax.random.key(11), spec))
    xs, ys, lengths = _data(dtype=jnp.float64)
    full = jax.value_and_grad(lambda p: rnn.loss(spec, p, xs, ys, lengths=lengths))(params)
    chunked = jax.value_and_grad(lambda p: rnn.loss(spec, p, xs, ys, lengths=lengths, remat=3))(params)
    assert rel_err(chunked[0], full[0]) < 1e-12
    for got, want in zip(jax.tree.leaves(chunked[1]), jax.tree.leaves(full[1])):
      assert rel_err(got, want) < 1e-10
    hs, carry = rnn.apply(spec, params, xs, lengths=lengths, remat=3)
    hs_full, carry_full = rnn.apply(spec, params, xs, lengths=lengths)
    np.testing.assert_allclose(hs, hs_full, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(jax.tree.leaves(carry)[0], jax.tree.leaves(carry_full)[0], rtol=1e-12)
  with pytest.raises(ValueError, match="remat must be an integer >= 1; got 0"):
    rnn.apply(spec, params, xs, remat=0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_remat_keeps_no_array_of_every_state(cell):
  """With `remat` the loss applies its readout inside each chunk: the gradient's temporaries hold
  the logits, the chunk-boundary carries and one chunk, not `hs [T, B, H]` and its gradient
  (here 4 MB each)."""
  t, b, d, h, o = 4000, 4, 3, 64, 2
  spec = rnn.rnn(cell, d, h, output_size=o)
  params = rnn.init(jax.random.key(0), spec)
  xs, ys = jnp.ones((b, t, d)), jnp.ones((b, t, o))
  temp = lambda remat: jax.jit(jax.grad(lambda p: rnn.loss(spec, p, xs, ys, remat=remat))).lower(
      params).compile().memory_analysis().temp_size_in_bytes
  states = t * b * h * 4
  chunked, full = temp(63), temp(None)
  assert full > 4 * states          # every step's gates, states and state gradient
  assert chunked < states / 2, (chunked, states)


@functools.cache
def _bf16_loss_and_grads(spec, backward, matmul_dtype):
  xs, ys, lengths = _data()
  f = jax.jit(jax.value_and_grad(lambda p: rnn.loss(spec, p, xs, ys, lengths=lengths,
                                                    backward=backward, matmul_dtype=matmul_dtype)))
  return f


@pytest.mark.parametrize("cell", ["elman", "lstm", "gru"])
@pytest.mark.parametrize("layers,bidir", [(1, False), (2, True)])
def test_bfloat16_matmuls_stay_close_to_float32(cell, layers, bidir):
  """`matmul_dtype=bfloat16` rounds only the matmul operands (8-bit mantissa, relative 2^-9 per
  operand): value and gradients stay within about 1e-2 of float32, on both backward paths, and
  everything returned is float32."""
  spec = rnn.rnn(cell, D, H, output_size=O, num_layers=layers, bidirectional=bidir)
  params = rnn.init(jax.random.key(3), spec)
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  ref_value, ref_grads = _bf16_loss_and_grads(spec, "manual", None)(params)
  got = {}
  for backward in ("manual", "autodiff"):
    value, grads = _bf16_loss_and_grads(spec, backward, jnp.bfloat16)(params)
    assert value.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert rel_err(value, ref_value) < 1e-2
    assert rel_err(flat(grads), flat(ref_grads)) < 3e-2
    assert rel_err(flat(grads), flat(ref_grads)) > 0   # the operands really were rounded
    got[backward] = flat(grads)
  assert rel_err(got["manual"], got["autodiff"]) < 3e-2


@pytest.mark.parametrize("backward", ["manual", "autodiff"])
def test_matmul_dtype_reaches_the_compiled_matmuls(backward):
  """With bfloat16, the forward matmuls (`U x` [T, B, G], `W h` [B, G], `V h` [T, B, O]) take
  bfloat16 operands on both paths, and so do the manual backward's `d_r W` [B, H] and `dW`
  [G, H]; the matmuls that JAX's autodiff derives stay float32. With the default, none is bf16."""
  spec = rnn.rnn("lstm", D, H, output_size=O)
  params = rnn.init(jax.random.key(3), spec)
  xs, ys, _ = _data()
  g = 4 * H

  def dots(matmul_dtype):
    """{output shape: operands are bf16} for every dot of the compiled gradient."""
    text = jax.jit(jax.grad(lambda p: rnn.loss(spec, p, xs, ys, backward=backward,
                                               matmul_dtype=matmul_dtype))).lower(params).as_text()
    found = {}
    for line in text.splitlines():
      if "dot_general" in line:
        operands, result = line.rsplit(":", 1)[-1].split("->")
        found.setdefault(result.strip(), []).append("bf16" in operands)
    return found

  default, bf16 = dots(None), dots(jnp.bfloat16)
  assert not any(any(v) for v in default.values())
  forward = [f"tensor<{T}x4x{g}xf32>", f"tensor<4x{g}xf32>", f"tensor<{T}x4x{O}xf32>"]
  manual_backward = [f"tensor<{g}x{H}xf32>", f"tensor<4x{H}xf32>"]
  for shape in forward + (manual_backward if backward == "manual" else []):
    assert shape in bf16 and all(bf16[shape]), (shape, bf16)
  assert not all(all(v) for v in bf16.values())   # autodiff-derived matmuls: float32
