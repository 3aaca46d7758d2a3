"""Training: jitted Optax steps on the manual and autodiff paths."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrnn import elman, make_train_step, train


def echo_task(b=16, t=12, lag=2, seed=0, dtype=jnp.float32):
  """Targets echo the input `lag` steps later: y_t = x_{t - lag} (0 before)."""
  xs = jax.random.normal(jax.random.key(seed), (b, t, 1), dtype)
  ys = jnp.concatenate([jnp.zeros((b, lag, 1), dtype), xs[:, :-lag]], axis=1)
  return xs, ys


def _train(opt, grads, steps, seed=0, dtype=jnp.float32):
  params = jax.tree.map(lambda v: v.astype(dtype), elman.init(jax.random.key(seed), 1, 16, 1))
  xs, ys = echo_task(dtype=dtype)
  step = elman.make_train_step(opt, grads=grads)
  state = opt.init(params)
  history = []
  for _ in range(steps):
    params, state, metrics = step(params, state, xs, ys)
    history.append(float(metrics["loss"]))
  return params, history, step


@pytest.mark.parametrize("grads", ["manual", "autodiff"])
@pytest.mark.parametrize("opt_name,opt,steps,threshold", [
    ("adam", optax.adam(1e-2), 300, 0.05),
    ("sgd", optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9)), 300, 0.3),
])
def test_training_learns_echo_task(grads, opt_name, opt, steps, threshold):
  """Echo by 2 steps: the initial loss is ~ 0.5 * T = 6 per sequence; it must fall below 0.05."""
  _, history, _ = _train(opt, grads, steps)
  assert history[0] > 2.0
  assert history[-1] < threshold, (opt_name, history[0], history[-1])


def test_manual_and_autodiff_trajectories_match():
  with jax.enable_x64(True):
    opt = optax.adam(1e-2)
    p_m, h_m, _ = _train(opt, "manual", 20, dtype=jnp.float64)
    p_a, h_a, _ = _train(opt, "autodiff", 20, dtype=jnp.float64)
    np.testing.assert_allclose(h_m, h_a, rtol=1e-8)
    for k in p_m:
      np.testing.assert_allclose(p_m[k], p_a[k], rtol=1e-8, atol=1e-12)
    assert not np.allclose(p_m["W"], elman.init(jax.random.key(0), 1, 16, 1)["W"])


def test_second_call_does_not_recompile():
  opt = optax.adam(1e-3)
  params = elman.init(jax.random.key(0), 1, 8, 1)
  step = elman.make_train_step(opt)
  state = opt.init(params)
  xs, ys = echo_task()
  params, state, _ = step(params, state, xs, ys)
  before = step._cache_size()
  xs2, ys2 = echo_task(seed=1)
  for _ in range(3):
    params, state, _ = step(params, state, xs2, ys2)
  assert step._cache_size() == before == 1


def test_metrics_and_generic_factory():
  params = elman.init(jax.random.key(0), 1, 8, 1)
  xs, ys = echo_task()
  opt = optax.sgd(0.1)
  step = make_train_step(lambda p, x, y: elman.loss(p, x, y), opt)
  new, _, metrics = step(params, opt.init(params), xs, ys)
  grads = jax.grad(lambda p: elman.loss(p, xs, ys, backward="autodiff"))(params)
  expected_norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in grads.values()))
  np.testing.assert_allclose(metrics["grad_norm"], expected_norm, rtol=1e-5)
  np.testing.assert_allclose(new["W"], params["W"] - 0.1 * grads["W"], rtol=1e-5, atol=1e-7)
  assert bool(metrics["finite"])


def test_bad_optimizer_and_options():
  with pytest.raises(TypeError, match="optimizer must be an optax.GradientTransformation"):
    make_train_step(lambda p: 0.0, "adam")
  with pytest.raises(ValueError, match="grads must be one of 'manual', 'autodiff'; got 'fd'"):
    elman.make_train_step(optax.adam(1e-3), grads="fd")
  with pytest.raises(ValueError, match="donate=True needs jit=True.*got jit=False"):
    make_train_step(lambda p: 0.0, optax.adam(1e-3), jit=False, donate=True)


def test_donated_step_reuses_its_inputs_and_computes_the_same():
  params = elman.init(jax.random.key(0), 1, 8, 1)
  xs, ys = echo_task()
  opt = optax.adam(1e-2)
  loss_fn = lambda p, x, y: elman.loss(p, x, y)
  want, _, _ = make_train_step(loss_fn, opt)(params, opt.init(params), xs, ys)
  donated = jax.tree.map(jnp.copy, params)
  got, _, _ = make_train_step(loss_fn, opt, donate=True)(donated, opt.init(donated), xs, ys)
  assert all(x.is_deleted() for x in jax.tree.leaves(donated))
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_steps_are_compiled_with_the_cpu_heap_limit():
  """`jit_step` (how make_train_step compiles) hands XLA the library's options on CPU, and this
  jaxlib knows them (an unknown option is an error at compile time, as the last case shows)."""
  assert train.compiler_options("cpu") == {
      "xla_multiheap_size_constraint_per_heap": 31 * 2**20}
  assert train.compiler_options("gpu") == {} and train.compiler_options("tpu") == {}
  f = lambda x: jnp.tanh(x) @ x
  x = jnp.ones((8, 8))
  np.testing.assert_allclose(train.jit_step(f)(x), f(x), rtol=1e-6)  # compiled with the option
  with pytest.raises(Exception, match="xla_no_such_option"):
    train.jit_step(f, compiler_options={"xla_no_such_option": 1}).lower(x).compile()
