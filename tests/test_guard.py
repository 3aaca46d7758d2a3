"""The non-finite guard of `jaxrnn.loop.fit`: skip within bounds, or stop; report step and cause."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrnn import checkpoint, elman, loop, train

D, H, O, B, T = 2, 3, 1, 2, 4
KEY = jax.random.key(0)


def _batches(nan_steps=()):
  """Batches pure in (key, step); the inputs of the steps in `nan_steps` hold a NaN."""
  nan_steps = jnp.asarray(nan_steps, jnp.int32).reshape(-1)

  @jax.jit
  def batches_fn(key, step):
    xs = jax.random.normal(jax.random.fold_in(key, step), (B, T, D))
    xs = jnp.where(jnp.any(nan_steps == step), xs.at[0, 1, 0].set(jnp.nan), xs)
    return xs, jnp.cumsum(xs[..., :1], axis=1)

  return batches_fn


@pytest.fixture(scope="module")
def adam():
  optimizer = optax.adam(1e-2)
  params = elman.init(jax.random.key(1), D, H, O)
  return optimizer, elman.make_train_step(optimizer), params


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


def _equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                  jax.tree_util.tree_leaves(b)))


def _nonfinite(result):
  return [(e.step, e.info["bad"], e.info["action"]) for e in result.events
          if e.kind == "nonfinite"]


def test_nan_batch_is_skipped_and_reported(tmp_path, adam):
  optimizer, step_fn, params = adam
  batches_fn = _batches(nan_steps=3)
  manager = checkpoint.CheckpointManager(tmp_path, keep=10)
  result = loop.fit(step_fn, params, optimizer.init(params), batches_fn, 6, key=KEY,
                    checkpoint_manager=manager)
  assert result.stopped is None and result.step == 6 and result.skipped == 1
  assert _nonfinite(result) == [(3, ("loss", "grads"), "skipped")]
  assert result.history["finite"].tolist() == [True, True, True, False, True, True]
  assert np.isnan(result.history["loss"][3])
  # The same run by hand, leaving batch 3 out.
  p, s = params, optimizer.init(params)
  for step in (0, 1, 2, 4, 5):
    p, s, _ = step_fn(p, s, *batches_fn(KEY, step))
  assert _equal(result.params, p) and _equal(result.opt_state, s)
  # The skipped step left the state as it was: checkpoints 3 (before it) and 4 (after) agree.
  load = lambda step: manager.load(step, params=params, opt_state=optimizer.init(params))
  assert _equal(load(3).params, load(4).params) and _equal(load(3).opt_state, load(4).opt_state)
  assert not _equal(load(4).params, load(5).params)


def test_guard_does_not_rely_on_the_step_skipping(adam):
  """A step built with skip_nonfinite=False returns NaN params; the loop still discards them."""
  optimizer, _, params = adam
  raw_step = elman.make_train_step(optimizer, skip_nonfinite=False)
  result = loop.fit(raw_step, params, optimizer.init(params), _batches(nan_steps=1), 3, key=KEY)
  assert _nonfinite(result) == [(1, ("loss", "grads"), "skipped")]
  assert _finite(result.params) and _finite(result.opt_state)


def test_reports_which_quantity_went_bad():
  """Finite loss with NaN gradients (sqrt at 0), and -inf loss with finite gradients."""
  optimizer = optax.sgd(0.1)
  params = {"w": jnp.ones(3)}
  grads_bad = train.make_train_step(lambda p, x: jnp.sum(jnp.sqrt(jnp.abs(p["w"] * x))),
                                    optimizer)
  loss_bad = train.make_train_step(
      lambda p, x: jnp.sum(p["w"] ** 2) + jax.lax.stop_gradient(jnp.sum(jnp.log(x))), optimizer)
  batches_fn = lambda key, step: (jnp.where(step == 1, 0.0, 1.0) * jnp.ones(3),)
  for step_fn, bad in ((grads_bad, ("grads",)), (loss_bad, ("loss",))):
    result = loop.fit(step_fn, params, optimizer.init(params), batches_fn, 3, key=KEY)
    assert _nonfinite(result) == [(1, bad, "skipped")]
    assert result.skipped == 1 and _finite(result.params)


def _exploding():
  """SGD with learning rate 1e6 on a ReLU Elman net: step 0 is finite, then the loss is inf."""
  optimizer = optax.sgd(1e6)
  params = elman.init(jax.random.key(1), D, H, O)
  xs = jax.random.normal(jax.random.key(2), (B, T, D))
  batches_fn = lambda key, step: (xs, jnp.cumsum(xs[..., :1], axis=1))
  return optimizer, elman.make_train_step(optimizer, f="relu"), params, batches_fn


def test_exploding_learning_rate_stops_and_keeps_last_good_checkpoint(tmp_path):
  optimizer, step_fn, params, batches_fn = _exploding()
  manager = checkpoint.CheckpointManager(tmp_path, keep=3)
  result = loop.fit(step_fn, params, optimizer.init(params), batches_fn, 10, key=KEY,
                    checkpoint_manager=manager, on_nonfinite="stop")
  assert result.stopped == "non-finite loss and grads at step 1 (on_nonfinite='stop')"
  assert result.step == 1 and result.skipped == 0
  assert _nonfinite(result) == [(1, ("loss", "grads"), "stopped")]
  stop = [e for e in result.events if e.kind == "stopped"]
  assert len(stop) == 1 and stop[0].info["last_checkpoint"] == manager.path(1)
  assert _finite(result.params)
  # The one step that went well, by hand: it is what the run returns and what is on disk.
  p, s, metrics = step_fn(params, optimizer.init(params), *batches_fn(KEY, 0))
  assert bool(metrics["finite"]) and _equal(result.params, p)
  assert manager.steps() == [1]
  on_disk = manager.load(1, params=params, opt_state=optimizer.init(params))
  assert _equal(on_disk.params, p) and _equal(on_disk.opt_state, s)


def test_exploding_learning_rate_skips_up_to_the_bound(tmp_path):
  optimizer, step_fn, params, batches_fn = _exploding()
  manager = checkpoint.CheckpointManager(tmp_path, keep=2)
  result = loop.fit(step_fn, params, optimizer.init(params), batches_fn, 10, key=KEY,
                    checkpoint_manager=manager, every=2, max_consecutive_skips=3)
  assert _nonfinite(result) == [(1, ("loss", "grads"), "skipped"),
                                (2, ("loss", "grads"), "skipped"),
                                (3, ("loss", "grads"), "skipped"),
                                (4, ("loss", "grads"), "stopped")]
  assert result.stopped.endswith("after 3 skipped in a row (max_consecutive_skips=3)")
  assert result.step == 4 and result.skipped == 3
  assert _finite(result.params)
  # Checkpoints 2 and 4 were written (skipped steps leave finite params); nothing after the stop.
  assert manager.steps() == [2, 4]
  on_disk = manager.load(4, params=params, opt_state=optimizer.init(params))
  assert _finite(on_disk.params) and _equal(on_disk.params, result.params)
  assert on_disk.data_position == {"step": 4, "skipped": 3, "consecutive_skipped": 3}


def test_total_skip_bound(adam):
  optimizer, step_fn, params = adam
  result = loop.fit(step_fn, params, optimizer.init(params), _batches(nan_steps=(1, 3, 5)), 8,
                    key=KEY, max_skips=2, max_consecutive_skips=5)
  assert [a for _, _, a in _nonfinite(result)] == ["skipped", "skipped", "stopped"]
  assert result.stopped.endswith("after 2 skipped in all (max_skips=2)")
  assert result.step == 5 and result.skipped == 2


def test_skip_counters_survive_a_resume(tmp_path, adam):
  """Resuming mid-run repeats an uninterrupted run exactly, skip counts included."""
  optimizer, step_fn, params = adam
  batches_fn = _batches(nan_steps=(2, 5))
  whole = loop.fit(step_fn, params, optimizer.init(params), batches_fn, 7, key=KEY,
                   max_skips=2)
  manager = checkpoint.CheckpointManager(tmp_path, keep=2)
  first = loop.fit(step_fn, params, optimizer.init(params), batches_fn, 4, key=KEY,
                   checkpoint_manager=manager, max_skips=2)
  second = loop.fit(step_fn, params, optimizer.init(params), batches_fn, 7, key=KEY,
                    checkpoint_manager=manager, max_skips=2)
  assert first.skipped == 1 and second.skipped == whole.skipped == 2
  assert second.events[0] == loop.Event(4, "resumed", {"path": manager.path(4)})
  assert second.history["step"].tolist() == [4, 5, 6]
  assert _equal(second.params, whole.params) and _equal(second.opt_state, whole.opt_state)


def test_bad_options_are_refused(adam):
  optimizer, step_fn, params = adam
  args = (step_fn, params, optimizer.init(params), _batches(), 2)
  with pytest.raises(ValueError, match="on_nonfinite must be one of 'skip', 'stop'; got 'ignore'"):
    loop.fit(*args, key=KEY, on_nonfinite="ignore")
  with pytest.raises(ValueError, match="every must be an integer >= 1; got 0"):
    loop.fit(*args, key=KEY, every=0)
  with pytest.raises(TypeError, match="key must be a PRNG key"):
    loop.fit(*args, key=0)
  with pytest.raises(TypeError, match="batches_fn must return a tuple"):
    loop.fit(step_fn, params, optimizer.init(params), lambda key, step: jnp.ones((B, T, D)), 1,
             key=KEY)
