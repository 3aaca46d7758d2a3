"""jaxrnn.elman: the seed's worked example, forward vs a NumPy loop, manual BPTT vs autodiff."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxrnn import elman
from conftest import rel_err
from reference import elman_loop

FS = ("tanh", "sigmoid", "relu")
GS = ("identity", "sigmoid", "softmax")
LOSSES = ("mse", "xent", "bce")


def worked_example_params():
  return {
      "U": np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [-0.1, -0.2, 0.1], [0.3, -0.3, 0.2]]),
      "W": np.array([[0.5, -0.1, 0.0, 0.2], [0.1, 0.4, -0.2, 0.0],
                     [0.0, 0.3, 0.2, -0.1], [-0.2, 0.0, 0.1, 0.3]]),
      "b": np.array([0.1, -0.1, 0.05, 0.0]),
      "V": np.array([[1.0, -1.0, 0.5, 0.2], [0.3, 0.8, -0.6, 1.1]]),
      "c": np.array([0.05, -0.05]),
  }


def test_worked_example():
  """The seed's sections 4.1-4.2: one step from x_t = [1, 2, 3], h_{t-1} = [.1, .2, .3, .4]."""
  p = worked_example_params()
  x = np.array([1.0, 2.0, 3.0])
  h_prev = np.array([0.1, 0.2, 0.3, 0.4])
  # Independently, term by term as the seed writes it.
  z = p["U"] @ x + p["W"] @ h_prev + p["b"]
  h_expected = np.tanh(z)
  o_expected = p["V"] @ h_expected + p["c"]
  # By hand: U x = [1.4, 3.2, -0.2, 0.3], W h = [.11, .03, .08, .13], plus b.
  np.testing.assert_allclose(z, [1.61, 3.13, -0.07, 0.43], rtol=1e-12)
  params = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
  hs, os = elman.forward(params, jnp.asarray(x[None], jnp.float32), jnp.asarray(h_prev, jnp.float32))
  np.testing.assert_allclose(hs[0], h_expected, rtol=1e-6)
  np.testing.assert_allclose(os[0], o_expected, rtol=1e-6, atol=1e-6)
  h_step, _ = elman.step(params, jnp.asarray(h_prev, jnp.float32), jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(h_step, h_expected, rtol=1e-6)


def test_init_shapes_and_keys(key):
  p = elman.init(key, 3, 5, 2)
  assert set(p) == {"U", "W", "b", "V", "c"}
  assert {k: v.shape for k, v in p.items()} == {
      "U": (5, 3), "W": (5, 5), "b": (5,), "V": (2, 5), "c": (2,)}
  assert all(v.dtype == jnp.float32 for v in p.values())
  bound = 1 / np.sqrt(5)
  assert all(float(jnp.abs(v).max()) <= bound for v in p.values())
  w = elman.init(key, 3, 5, 2, recurrent_init="orthogonal")["W"]
  np.testing.assert_allclose(w @ w.T, np.eye(5), atol=1e-5)
  assert np.array_equal(elman.init(key, 3, 5, 2, recurrent_init="identity")["W"], np.eye(5))


@pytest.mark.parametrize("f", FS)
@pytest.mark.parametrize("g", GS)
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("t", [1, 7])
def test_forward_matches_numpy_loop(f, g, batched, with_h0, t):
  d, h, o, b = 3, 5, 4, 2
  ks = jax.random.split(jax.random.key(1), 3)
  params = elman.init(ks[0], d, h, o)
  xs = jax.random.normal(ks[1], (b, t, d) if batched else (t, d))
  h0 = jax.random.normal(ks[2], (b, h) if batched else (h,)) if with_h0 else None
  hs, os = elman.forward(params, xs, h0, f=f, g=g)
  assert hs.shape == xs.shape[:-1] + (h,) and os.shape == xs.shape[:-1] + (o,)
  seqs = xs if batched else xs[None]
  h0s = (h0 if batched else h0[None]) if with_h0 else [None] * len(seqs)
  for i, (x, hh0) in enumerate(zip(seqs, h0s)):
    hs_ref, os_ref = elman_loop(params, x, hh0, f, g)
    np.testing.assert_allclose((hs if batched else hs[None])[i], hs_ref, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose((os if batched else os[None])[i], os_ref, rtol=2e-5, atol=2e-6)


def test_step_is_a_scan_body(key):
  params = elman.init(key, 3, 4, 2)
  xs = jax.random.normal(key, (6, 3))
  h_T, hs = jax.lax.scan(functools.partial(elman.step, params), jnp.zeros(4), xs)
  np.testing.assert_allclose(hs, elman.forward(params, xs)[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(h_T, hs[-1])


def _problem(loss, b, t, d=3, h=5, o=4, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  params = jax.tree.map(lambda v: v.astype(dtype), elman.init(ks[0], d, h, o))
  shape = (b, t) if b else (t,)
  xs = jax.random.normal(ks[1], shape + (d,), dtype)
  h0 = 0.5 * jax.random.normal(ks[2], shape[:-1] + (h,), dtype)
  if loss == "xent":
    targets = jax.random.randint(ks[3], shape, 0, o)
  elif loss == "bce":
    targets = jax.random.uniform(ks[3], shape + (o,), dtype)
  else:
    targets = jax.random.normal(ks[3], shape + (o,), dtype)
  mask = (jax.random.uniform(ks[4], shape) < 0.7).astype(dtype)
  return params, xs, targets, h0, mask


@functools.cache
def _compiled(f, loss):
  manual = jax.jit(lambda p, x, y, h0, m: elman.manual_value_and_grad(
      p, x, y, h0, f=f, loss=loss, mask=m, wrt_inputs=True))
  auto = jax.jit(jax.value_and_grad(
      lambda p, x, y, h0, m: elman.loss(p, x, y, h0, f=f, loss=loss, mask=m, backward="autodiff"),
      argnums=(0, 1, 3)))
  custom = jax.jit(jax.value_and_grad(
      lambda p, x, y, h0, m: elman.loss(p, x, y, h0, f=f, loss=loss, mask=m), argnums=(0, 1, 3)))
  return manual, auto, custom


@pytest.mark.parametrize("f", FS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("b,t", [(0, 1), (1, 1), (1, 50), (4, 50)])
@pytest.mark.parametrize("x64", [True, False])
def test_manual_bptt_equals_autodiff(f, loss, b, t, x64):
  tol = 1e-10 if x64 else 1e-5
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    params, xs, targets, h0, mask = _problem(loss, b, t, dtype=dtype)
    manual, auto, custom = _compiled(f, loss)
    v_m, g_m, gin_m = manual(params, xs, targets, h0, mask)
    v_a, (g_a, gx_a, gh0_a) = auto(params, xs, targets, h0, mask)
    v_c, (g_c, gx_c, gh0_c) = custom(params, xs, targets, h0, mask)
    assert g_m.keys() == params.keys()
    assert all(g_m[k].shape == params[k].shape and g_m[k].dtype == dtype for k in params)
    assert rel_err(v_m, v_a) <= tol and rel_err(v_c, v_a) <= tol
    for k in params:
      assert rel_err(g_m[k], g_a[k]) <= tol, (k, rel_err(g_m[k], g_a[k]))
      assert rel_err(g_c[k], g_a[k]) <= tol, (k, rel_err(g_c[k], g_a[k]))
    assert rel_err(gin_m["xs"], gx_a) <= tol and rel_err(gin_m["h0"], gh0_a) <= tol
    assert rel_err(gx_c, gx_a) <= tol and rel_err(gh0_c, gh0_a) <= tol
    assert float(jnp.linalg.norm(g_a["W"])) > 0  # the comparison is not vacuous


@pytest.mark.parametrize("f", ["tanh", "sigmoid"])
@pytest.mark.parametrize("loss", LOSSES)
def test_manual_path_against_finite_differences(f, loss):
  with jax.enable_x64(True):
    params, xs, targets, h0, mask = _problem(loss, 2, 6, dtype=jnp.float64, seed=3)
    fn = lambda p, x, h: elman.loss(p, x, targets, h, f=f, loss=loss, mask=mask)
    check_grads(fn, (params, xs, h0), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-7)
    # And the explicit manual_value_and_grad against central differences on W.
    _, grads = elman.manual_value_and_grad(params, xs, targets, h0, f=f, loss=loss, mask=mask)
    direction = jax.random.normal(jax.random.key(9), params["W"].shape, jnp.float64)
    eps = 1e-6
    bump = lambda s: elman.loss({**params, "W": params["W"] + s * eps * direction}, xs, targets,
                                h0, f=f, loss=loss, mask=mask)
    fd = (bump(1.0) - bump(-1.0)) / (2 * eps)
    np.testing.assert_allclose(jnp.vdot(grads["W"], direction), fd, rtol=1e-7)


def test_losses_against_numpy():
  """The documented totals, recomputed in NumPy from the forward outputs."""
  for loss in LOSSES:
    params, xs, targets, h0, mask = _problem(loss, 3, 5, seed=5)
    _, os = elman.forward(params, xs, h0, g={"mse": "identity", "xent": "softmax",
                                             "bce": "sigmoid"}[loss])
    os, y, m = np.asarray(os, np.float64), np.asarray(targets), np.asarray(mask, np.float64)
    if loss == "mse":
      per_step = 0.5 * ((os - y) ** 2).sum(-1)
    elif loss == "xent":
      per_step = -np.log(np.take_along_axis(os, y[..., None], -1)[..., 0])
    else:
      per_step = -(y * np.log(os) + (1 - y) * np.log(1 - os)).sum(-1)
    expected = (m * per_step).sum() / 3
    np.testing.assert_allclose(elman.loss(params, xs, targets, h0, loss=loss, mask=mask),
                               expected, rtol=1e-5)


def test_xent_is_stable_for_large_logits(key):
  params = elman.init(key, 2, 3, 4)
  params["V"] = params["V"] * 1e4
  xs = jnp.ones((1, 3, 2))
  value, grads = elman.manual_value_and_grad(params, xs, jnp.zeros((1, 3), jnp.int32), loss="xent")
  assert np.isfinite(value) and all(np.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("grads_path", ["manual", "autodiff"])
def test_under_jit_vmap_and_user_jit(key, grads_path):
  params, xs, targets, h0, mask = _problem("mse", 4, 6)
  if grads_path == "manual":
    vg = lambda p, x, y: elman.manual_value_and_grad(p, x, y)
  else:
    vg = jax.value_and_grad(lambda p, x, y: elman.loss(p, x, y, backward="autodiff"))
  # vmap over single sequences: per-example losses and grads.
  per_v, per_g = jax.vmap(vg, in_axes=(None, 0, 0))(params, xs, targets)
  v1, g1 = vg(params, xs[1], targets[1])
  np.testing.assert_allclose(per_v[1], v1, rtol=1e-6)
  np.testing.assert_allclose(per_g["W"][1], g1["W"], rtol=1e-5, atol=1e-7)
  # Batch mean = mean of per-sequence values.
  v_b, g_b = jax.jit(vg)(params, xs, targets)
  np.testing.assert_allclose(v_b, per_v.mean(), rtol=1e-5)
  np.testing.assert_allclose(g_b["U"], per_g["U"].mean(0), rtol=1e-4, atol=1e-7)

  @jax.jit
  def users_own(p, x, y):
    value, g = vg(p, x, y)
    return value + 0.01 * sum(jnp.sum(l ** 2) for l in jax.tree.leaves(g))
  assert np.isfinite(users_own(params, xs, targets))


# ----------------------------------------------------------------------------- bad input
def _good():
  params = elman.init(jax.random.key(0), 3, 4, 2)
  return params, jnp.ones((2, 5, 3)), jnp.zeros((2, 5, 2))


BAD = [
    ("xs rank 1", lambda p, x, y: elman.forward(p, jnp.ones(3)), ValueError,
     r"xs must have shape \[T, D\] .* got rank 1"),
    ("xs rank 4", lambda p, x, y: elman.forward(p, jnp.ones((1, 2, 5, 3))), ValueError,
     r"xs must have shape \[T, D\] .* got rank 4"),
    ("xs wrong D", lambda p, x, y: elman.forward(p, jnp.ones((2, 5, 7))), ValueError,
     r"xs must have last axis D = 3 .* got shape \[2, 5, 7\]"),
    ("integer xs", lambda p, x, y: elman.forward(p, jnp.ones((2, 5, 3), jnp.int32)), TypeError,
     r"xs must have a floating dtype .* got int32"),
    ("T = 0", lambda p, x, y: elman.forward(p, jnp.ones((2, 0, 3))), ValueError,
     r"xs must have at least one time step \(T >= 1\); got shape \[2, 0, 3\]"),
    ("h0 shape", lambda p, x, y: elman.forward(p, x, jnp.zeros((4,))), ValueError,
     r"h0 must have shape \[2, 4\] .* got \[4\]"),
    ("missing key", lambda p, x, y: elman.forward({k: v for k, v in p.items() if k != "c"}, x),
     ValueError, r"params must have exactly the keys .* missing \['c'\]"),
    ("extra key", lambda p, x, y: elman.forward({**p, "d": p["c"]}, x), ValueError,
     r"unexpected \['d'\]"),
    ("leaf shape", lambda p, x, y: elman.forward({**p, "W": jnp.ones((4, 3))}, x), ValueError,
     r"params\['W'\] must have shape \[4, 4\]; got \[4, 3\]"),
    ("unknown f", lambda p, x, y: elman.forward(p, x, f="gelu"), ValueError,
     r"f must be one of 'tanh', 'sigmoid', 'relu'; got 'gelu'"),
    ("unknown g", lambda p, x, y: elman.forward(p, x, g="exp"), ValueError,
     r"g must be one of 'identity', 'sigmoid', 'softmax'; got 'exp'"),
    ("unknown loss", lambda p, x, y: elman.loss(p, x, y, loss="hinge"), ValueError,
     r"loss must be one of 'mse', 'xent', 'bce'; got 'hinge'"),
    ("targets shape", lambda p, x, y: elman.loss(p, x, jnp.zeros((2, 5, 3))), ValueError,
     r"targets must have shape \[2, 5, 2\] for loss='mse'; got \[2, 5, 3\]"),
    ("float classes", lambda p, x, y: elman.loss(p, x, jnp.zeros((2, 5)), loss="xent"), TypeError,
     r"targets must hold integer class indices .* got dtype float32"),
    ("class shape", lambda p, x, y: elman.loss(p, x, jnp.zeros((2, 4), jnp.int32), loss="xent"),
     ValueError, r"targets must have shape \[2, 5\] .* got \[2, 4\]"),
    ("mask shape", lambda p, x, y: elman.manual_value_and_grad(p, x, y, mask=jnp.ones((2, 4))),
     ValueError, r"mask must have shape \[2, 5\] .* got \[2, 4\]"),
    ("manual T = 0", lambda p, x, y: elman.manual_value_and_grad(p, jnp.ones((2, 0, 3)), y),
     ValueError, r"at least one time step"),
]


@pytest.mark.parametrize("name,call,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_errors(name, call, exc, match, monkeypatch):
  params, xs, ys = _good()
  # "Before any computation": nothing may be staged or run before the check fails.
  import jaxrnn.scan
  monkeypatch.setattr(jaxrnn.scan.jax.lax, "scan", _forbidden)
  with pytest.raises(exc, match=match):
    call(params, xs, ys)


def _forbidden(*args, **kwargs):
  raise AssertionError("computation started before the input was validated")
