"""jaxrnn.tbptt: chunked gradients equal full-sequence gradients with the carry cut at boundaries."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrnn import rnn, tbptt
from conftest import rel_err

D, H, O, N, K = 3, 4, 5, 12, 4


def _setup():
  spec = rnn.rnn("lstm", D, H, output_size=O)
  params = rnn.init(jax.random.key(0), spec)
  xs = jax.random.normal(jax.random.key(1), (2, N, D))
  ys = jax.random.randint(jax.random.key(2), (2, N), 0, O)
  return spec, params, xs, ys


def _reference_cut_gradient(spec, params, xs, ys):
  """Independent: the full-sequence LSTM written out in jnp, stop_gradient on (h, c) every K steps,
  differentiated once as a whole."""
  def full_loss(p):
    w = p["layers"][0]["fwd"]
    h = jnp.zeros((2, H))
    c = jnp.zeros((2, H))
    total = 0.0
    for t in range(N):
      if t % K == 0:
        h, c = jax.lax.stop_gradient(h), jax.lax.stop_gradient(c)
      z = xs[:, t] @ w["U"].T + w["b"][None] + h @ w["W"].T + w["bh"][None]
      i, f, g, o = jnp.split(z, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      logits = h @ p["V"].T + p["c"][None]
      total = total + jnp.sum(-jnp.take_along_axis(jax.nn.log_softmax(logits), ys[:, t, None], 1))
    return total / 2
  return jax.value_and_grad(full_loss)(params)


def test_chunked_gradient_equals_cut_full_gradient():
  with jax.enable_x64(True):
    spec, params, xs, ys = _setup()
    params = jax.tree.map(lambda v: v.astype(jnp.float64), params)
    xs = xs.astype(jnp.float64)
    want_v, want_g = _reference_cut_gradient(spec, params, xs, ys)
    loss_fn = tbptt.rnn_chunk_loss(spec, loss="xent")
    carry0 = rnn.initial_carry(spec, params, (2,))
    got_v, got_g, _ = tbptt.tbptt_value_and_grad(loss_fn, params, carry0, xs, ys, K)
    assert rel_err(got_v, want_v) < 1e-12
    for got, want in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
      assert rel_err(got, want) < 1e-10
    # The cut matters: the uncut full gradient is different.
    full_g = jax.grad(lambda p: rnn.loss(spec, p, xs, ys, loss="xent"))(params)
    assert rel_err(full_g["layers"][0]["fwd"]["W"], want_g["layers"][0]["fwd"]["W"]) > 1e-3


def test_train_steps_walk_the_stream_and_carry_state():
  spec, params, xs, ys = _setup()
  opt = optax.sgd(0.0)  # lr 0: params fixed, so the carried state can be checked exactly
  step = tbptt.make_tbptt_step(tbptt.rnn_chunk_loss(spec), opt)
  carry0 = rnn.initial_carry(spec, params, (2,))
  _, _, carry, chunk_losses = tbptt.run_tbptt(step, params, opt.init(params), xs, ys, chunk=5,
                                              carry=carry0, reset_at_end=False)
  assert chunk_losses.shape == (3,)  # 5 + 5 + 2 steps
  _, full_carry = rnn.apply(spec, params, xs)
  np.testing.assert_allclose(carry[0], full_carry[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(chunk_losses.sum()),
                             float(rnn.loss(spec, params, xs, ys, loss="xent")), rtol=1e-5)
  _, _, reset, _ = tbptt.run_tbptt(step, params, opt.init(params), xs, ys, chunk=5, carry=carry0)
  np.testing.assert_array_equal(reset[0], carry0[0])


def test_training_reduces_loss_and_reset_per_example():
  spec, params, xs, ys = _setup()
  opt = optax.adam(3e-2)
  step = tbptt.make_tbptt_step(tbptt.rnn_chunk_loss(spec), opt)
  state = opt.init(params)
  carry = rnn.initial_carry(spec, params, (2,))
  first = None
  for epoch in range(15):
    params, state, carry, losses = tbptt.run_tbptt(step, params, state, xs, ys, chunk=K,
                                                   carry=carry)
    first = float(losses.sum()) if first is None else first
  assert float(losses.sum()) < 0.7 * first
  h, c = carry
  reset = tbptt.reset_carry((h + 1, c + 1), jnp.array([True, False]), (h, c))
  np.testing.assert_array_equal(reset[0][:, 0], h[:, 0])
  np.testing.assert_array_equal(reset[0][:, 1], h[:, 1] + 1)


def test_stream_batches_and_errors():
  streams = tbptt.stream_batches(np.arange(10), 3)
  np.testing.assert_array_equal(streams, [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
  with pytest.raises(ValueError, match="tokens must be a 1-D stream; got shape"):
    tbptt.stream_batches(np.zeros((2, 2)), 1)
  spec, params, xs, ys = _setup()
  with pytest.raises(ValueError, match="xs length N = 12 must be a multiple of chunk = 5"):
    tbptt.tbptt_value_and_grad(tbptt.rnn_chunk_loss(spec), params, None, xs, ys, 5)
