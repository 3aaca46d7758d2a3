"""jaxrnn.cells.mingru and jaxrnn.parallel_scan: parallel == sequential == a NumPy loop."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxrnn import rnn
from jaxrnn.cells import base
from jaxrnn.cells.mingru import forward, mingru
from jaxrnn.parallel_scan import affine_scan
from conftest import rel_err

B, T, D, H = 3, 9, 4, 5
LENGTHS = np.array([9, 4, 1])
MASK = np.array([[1, 1, 0, 1, 1, 0, 0, 1, 1],      # any pattern, not only a prefix
                 [0, 1, 1, 1, 0, 1, 1, 1, 1],
                 [1, 0, 0, 0, 0, 0, 0, 0, 1]], bool)


def mingru_loop(params, xs, h0=None, mask=None):
  """z_t = sigmoid(U_z x_t + b_z), h~_t = U_h x_t + b_h, h_t = (1 - z_t) h_{t-1} + z_t h~_t, for
  one sequence xs [T, D]; a masked step keeps h and outputs 0. Plain NumPy, float64."""
  U, b = np.asarray(params["U"], np.float64), np.asarray(params["b"], np.float64)
  h_size = U.shape[0] // 2
  h = np.zeros(h_size) if h0 is None else np.asarray(h0, np.float64)
  hs = []
  for t, x in enumerate(np.asarray(xs, np.float64)):
    if mask is not None and not mask[t]:
      hs.append(np.zeros(h_size))
      continue
    z = 1 / (1 + np.exp(-(U[:h_size] @ x + b[:h_size])))
    h_tilde = U[h_size:] @ x + b[h_size:]
    h = (1 - z) * h + z * h_tilde
    hs.append(h)
  return np.stack(hs), h


def problem(dtype=jnp.float64, t=T, scale=1.0):
  kp, kx, kh = jax.random.split(jax.random.key(0), 3)
  params = mingru().init(kp, D, H, dtype)
  params = jax.tree.map(lambda p: scale * p, params)
  xs = jax.random.normal(kx, (B, t, D), dtype)
  h0 = jax.random.normal(kh, (B, H), dtype)
  return params, xs, h0


def masking(kind):
  if kind == "lengths":
    return {"lengths": jnp.asarray(LENGTHS)}
  if kind == "mask":
    return {"mask": jnp.asarray(MASK)}
  return {}


def scalar_of(params, xs, h0, impl, backward, kind):
  """A loss touching every output and the final state, with uneven weights."""
  hs, h_T = forward(params, xs, h0, impl=impl, backward=backward, **masking(kind))
  w = jnp.reshape(jnp.arange(1.0, 1.0 + hs.shape[-2]), (1, -1, 1))
  return jnp.sum(jnp.sin(hs) * w) + jnp.sum(h_T ** 3)


def test_init_and_cell(key):
  cell = mingru()
  assert cell is mingru() and cell.name == "mingru" and not cell.recurrent_weights
  params = cell.init(key, D, H, jnp.float32)
  assert {k: v.shape for k, v in params.items()} == {"U": (2 * H, D), "b": (2 * H,)}
  assert float(jnp.abs(params["U"]).max()) <= 1 / np.sqrt(D)
  assert cell.parallel_scan is not None


@pytest.mark.parametrize("impl", ["parallel", "sequential"])
@pytest.mark.parametrize("kind", [None, "lengths", "mask"])
def test_matches_numpy_loop(impl, kind):
  with jax.enable_x64(True):
    params, xs, h0 = problem()
    hs, h_T = forward(params, xs, h0, impl=impl, **masking(kind))
    for i in range(B):
      mask = (np.arange(T) < LENGTHS[i]) if kind == "lengths" else (
          MASK[i] if kind == "mask" else None)
      ref_hs, ref_h = mingru_loop(params, xs[i], h0[i], mask)
      np.testing.assert_allclose(hs[i], ref_hs, rtol=1e-12, atol=1e-14)
      np.testing.assert_allclose(h_T[i], ref_h, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl", ["parallel", "sequential"])
def test_unbatched_and_default_h0(impl):
  with jax.enable_x64(True):
    params, xs, _ = problem()
    hs, h_T = forward(params, xs[1], impl=impl, lengths=jnp.asarray(5))
    ref_hs, ref_h = mingru_loop(params, xs[1], None, np.arange(T) < 5)
    assert hs.shape == (T, H) and h_T.shape == (H,)
    np.testing.assert_allclose(hs, ref_hs, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h_T, ref_h, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backward", ["manual", "autodiff"])
@pytest.mark.parametrize("kind", [None, "lengths", "mask"])
def test_parallel_equals_sequential_float64(backward, kind):
  """Outputs, final state and grads wrt params, xs and h0, to rtol 1e-10."""
  with jax.enable_x64(True):
    params, xs, h0 = problem()
    out_p = forward(params, xs, h0, impl="parallel", backward=backward, **masking(kind))
    out_s = forward(params, xs, h0, impl="sequential", backward="manual", **masking(kind))
    for a, b in zip(out_p, out_s):
      assert rel_err(a, b) <= 1e-10
    grad = lambda impl, bw: jax.grad(scalar_of, argnums=(0, 1, 2))(params, xs, h0, impl, bw, kind)
    g_par, g_seq = grad("parallel", backward), grad("sequential", "manual")
    g_auto = grad("sequential", "autodiff")  # JAX differentiating the plain lax.scan
    for a, b, c in zip(jax.tree.leaves(g_par), jax.tree.leaves(g_seq), jax.tree.leaves(g_auto)):
      assert rel_err(a, b) <= 1e-10, rel_err(a, b)
      assert rel_err(b, c) <= 1e-10, rel_err(b, c)
    if kind == "lengths":  # steps past the end get no gradient
      d_xs = g_par[1]
      assert float(jnp.abs(d_xs[2, 1:]).max()) == 0.0


def test_parallel_equals_sequential_float32():
  params, xs, h0 = problem(jnp.float32)
  out_p = forward(params, xs, h0, impl="parallel", lengths=jnp.asarray(LENGTHS))
  out_s = forward(params, xs, h0, impl="sequential", lengths=jnp.asarray(LENGTHS))
  assert out_p[0].dtype == jnp.float32 and out_p[1].dtype == jnp.float32
  for a, b in zip(out_p, out_s):
    assert rel_err(a, b) <= 1e-5
  grad = lambda impl: jax.grad(scalar_of, argnums=(0, 1, 2))(params, xs, h0, impl, "manual",
                                                              "lengths")
  for a, b in zip(jax.tree.leaves(grad("parallel")), jax.tree.leaves(grad("sequential"))):
    assert a.dtype == jnp.float32
    assert rel_err(a, b) <= 1e-5


def test_finite_differences():
  with jax.enable_x64(True):
    params, xs, h0 = problem(t=5)
    mask = jnp.asarray(MASK[:, :5])

    def f(params, xs, h0):
      hs, h_T = forward(params, xs, h0, mask=mask, impl="parallel")
      return jnp.sum(jnp.sin(hs)) + jnp.sum(h_T ** 3)
    check_grads(f, (params, xs, h0), order=1, modes=("rev",))


def test_long_sequence_stays_finite_and_equal():
  """T = 1000 with saturated gates (z within rounding of 0 and of 1): products of decays
  underflow towards 0 harmlessly; nothing is divided, no log space needed."""
  params, xs, h0 = problem(jnp.float32, t=1000, scale=30.0)
  run = jax.jit(forward, static_argnames="impl")
  hs_p, h_p = run(params, xs, h0, impl="parallel")
  hs_s, h_s = run(params, xs, h0, impl="sequential")
  assert bool(jnp.all(jnp.isfinite(hs_p)))
  assert rel_err(hs_p, hs_s) <= 1e-5 and rel_err(h_p, h_s) <= 1e-5
  g = jax.jit(jax.grad(lambda p: jnp.sum(forward(p, xs, h0, impl="parallel")[0] ** 2)))(params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(g))


def test_jit():
  params, xs, h0 = problem(jnp.float32)
  f = jax.jit(functools.partial(forward, impl="parallel"))
  np.testing.assert_allclose(f(params, xs, h0)[0], forward(params, xs, h0)[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reverse", [False, True])
def test_affine_scan_matches_loop(reverse):
  with jax.enable_x64(True):
    ka, kb, kh = jax.random.split(jax.random.key(1), 3)
    a = jax.random.uniform(ka, (T, B, H), jnp.float64)
    b = jax.random.normal(kb, (T, B, H), jnp.float64)
    h0 = jax.random.normal(kh, (B, H), jnp.float64)
    h, ref = np.asarray(h0), np.zeros((T, B, H))
    for t in (reversed(range(T)) if reverse else range(T)):
      h = np.asarray(a[t]) * h + np.asarray(b[t])
      ref[t] = h
    np.testing.assert_allclose(affine_scan(a, b, h0, reverse=reverse), ref, rtol=1e-12)
    with pytest.raises(ValueError, match=r"a and b must have the same shape"):
      affine_scan(a, b[1:])
    with pytest.raises(ValueError, match=r"h0 must have shape \[3, 5\]"):
      affine_scan(a, b, h0[0])


# ---- through jaxrnn.rnn: every sequence-layer feature, both implementations ------------------


@pytest.mark.parametrize("bidirectional", [False, True])
def test_rnn_apply_parallel_equals_sequential(bidirectional):
  with jax.enable_x64(True):
    spec = rnn.rnn("mingru", D, H, num_layers=2, bidirectional=bidirectional, output_size=2)
    params = rnn.init(jax.random.key(2), spec, dtype=jnp.float64)
    _, xs, _ = problem()
    k = spec.num_layers * spec.num_directions
    carry0 = jax.random.normal(jax.random.key(3), (k, B, H), jnp.float64)
    targets = jax.random.normal(jax.random.key(4), (B, T, 2), jnp.float64)
    lengths = jnp.asarray(LENGTHS)
    out = {impl: rnn.apply(spec, params, xs, carry0, lengths=lengths, impl=impl)
           for impl in ("parallel", "sequential")}
    for a, b in zip(jax.tree.leaves(out["parallel"]), jax.tree.leaves(out["sequential"])):
      assert rel_err(a, b) <= 1e-10
    loss = lambda p, xs, c0, impl: rnn.loss(spec, p, xs, targets, c0, lengths=lengths, impl=impl)
    g = {impl: jax.grad(loss, argnums=(0, 1, 2))(params, xs, carry0, impl)
         for impl in ("parallel", "sequential")}
    for a, b in zip(jax.tree.leaves(g["parallel"]), jax.tree.leaves(g["sequential"])):
      assert rel_err(a, b) <= 1e-10


def test_rnn_step_and_learned_initial_state():
  """Sampling step by step (base.step, r_t = None) reproduces apply; carry0 can be learned."""
  with jax.enable_x64(True):
    spec = rnn.rnn("mingru", D, H, num_layers=2, learn_initial_state=True)
    params = rnn.init(jax.random.key(5), spec, dtype=jnp.float64)
    params["carry0"] = 0.5 * jnp.ones_like(params["carry0"])
    _, xs, _ = problem()
    hs, carry_T = rnn.apply(spec, params, xs, impl="parallel")
    carry = rnn.initial_carry(spec, params, (B,))
    for t in range(T):
      carry, h = rnn.step(spec, params, carry, xs[:, t])
      np.testing.assert_allclose(h, hs[:, t], rtol=1e-12)
    np.testing.assert_allclose(carry, carry_T, rtol=1e-12)
    g = jax.grad(lambda p: jnp.sum(rnn.apply(spec, p, xs, impl="parallel")[0]))(params)
    assert float(jnp.abs(g["carry0"]).sum()) > 0


def test_cell_without_hand_written_backward():
  """A W-less user cell with no pointwise_bwd: the engine's jax.vjp fallback handles r_t = None."""
  with jax.enable_x64(True):
    cell = mingru()._replace(name="mingru_vjp", pointwise_bwd=None, parallel_scan=None)
    spec, ref_spec = rnn.rnn(cell, D, H), rnn.rnn("mingru", D, H)
    params = rnn.init(jax.random.key(6), ref_spec, dtype=jnp.float64)
    _, xs, _ = problem()
    loss = lambda s, p: jnp.sum(jnp.tanh(rnn.apply(s, p, xs, mask=jnp.asarray(MASK))[0]))
    g, g_ref = jax.grad(functools.partial(loss, spec))(params), jax.grad(
        functools.partial(loss, ref_spec))(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
      assert rel_err(a, b) <= 1e-10


def test_base_step_recurrent_projection_is_none():
  params = mingru().init(jax.random.key(0), D, H, jnp.float32)
  assert base.recurrent_projector(params)(jnp.zeros((B, H))) is None
  carry, h = base.step(mingru(), params, (jnp.zeros((B, H)),), jnp.ones((B, D)))
  assert h.shape == (B, H)


def test_errors():
  params, xs, h0 = problem(jnp.float32)
  with pytest.raises(ValueError, match=r"impl must be one of 'parallel', 'sequential'; got 'fast'"):
    forward(params, xs, impl="fast")
  with pytest.raises(ValueError, match=r"h0 must have shape \[3, 5\]"):
    forward(params, xs, h0[0])
  with pytest.raises(ValueError, match=r"xs must have last axis D = 4"):
    forward(params, xs[..., :3])
  with pytest.raises(ValueError, match=r"params\['U'\] must have shape \[2H, D\]"):
    forward({"U": params["U"][:-1], "b": params["b"]}, xs)
  with pytest.raises(ValueError, match=r"at most one of lengths"):
    forward(params, xs, lengths=jnp.asarray(LENGTHS), mask=jnp.asarray(MASK))
  with pytest.raises(ValueError, match=r"params must have keys \['U', 'b'\].*unexpected \['W'\]"):
    forward({**params, "W": jnp.zeros((2 * H, H))}, xs)
  lstm_spec = rnn.rnn("lstm", D, H)
  with pytest.raises(ValueError, match=r"impl='parallel' needs a cell with a parallel_scan.*"
                                       r"'lstm' has none"):
    rnn.apply(lstm_spec, rnn.init(jax.random.key(0), lstm_spec), xs, impl="parallel")
  spec = rnn.rnn("mingru", D, H)
  bad = rnn.init(jax.random.key(0), spec)
  bad["layers"][0]["fwd"]["W"] = jnp.zeros((2 * H, H))
  with pytest.raises(ValueError, match=r"unexpected \['W'\]"):
    rnn.apply(spec, bad, xs)
