"""jaxrnn.parallel: data-parallel training over 4 virtual CPU devices equals 1 device.

The device count of a JAX process is fixed when its backend starts, so every check runs in a
subprocess started with `XLA_FLAGS=--xla_force_host_platform_device_count=4` (this file run as a
script); the 4 devices never leak into the process running the other tests. One subprocess runs
all single-process cases and reports each as "ok" or its traceback; the multi-host test starts two
more processes of 2 devices each, joined by `jax.distributed.initialize`.
"""
import json
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
B, T, D, H, O = 8, 6, 3, 8, 2
STEPS = 10


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE.parent), env.get("PYTHONPATH", "")])
  return env


def _last_json(stdout: str):
  return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results():
  proc = subprocess.run([sys.executable, str(HERE), "cases"], env=_env(4), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return _last_json(proc.stdout)


def _ok(results, name):
  assert results[name] == "ok", f"{name}:\n{results[name]}"


def test_four_devices_visible(results):
  _ok(results, "devices")


def test_lstm_adam_1_vs_4_devices_same_params(results):
  """10 Adam steps of an LSTM via rnn.loss with lengths: 1 device, 4 devices, plain jit agree."""
  _ok(results, "same_params")


def test_batch_is_split_and_params_replicated(results):
  _ok(results, "layout")


def test_non_divisible_batch_raises_before_tracing(results):
  _ok(results, "non_divisible")


def test_second_call_does_not_recompile(results):
  _ok(results, "no_recompile")


def test_replicated_argument_and_manual_bptt(results):
  """batch_argnums leaves an initial state replicated; value_and_grad_fn takes a manual BPTT."""
  _ok(results, "batch_argnums_and_manual")


def test_mingru_parallel_impl_sharded(results):
  _ok(results, "mingru_parallel")


def test_make_mesh_and_devices_flag(results):
  _ok(results, "make_mesh")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(results):
  """Multi-host for real: 2 processes x 2 CPU devices (jax.distributed, gloo) == 1 x 4 devices."""
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, str(HERE), "multihost", str(i), "2", port],
                            env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = []
  for proc in procs:
    try:
      out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    assert proc.returncode == 0, err[-5000:]
    outs.append(_last_json(out))
  import numpy as np
  reference = results["reference_params"]
  for out in outs:
    assert out["loss"] == pytest.approx(results["reference_loss"], rel=1e-5)
    np.testing.assert_allclose(out["params"], reference, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# What the subprocesses run.


def _problem(dtype=None):
  import jax
  import jax.numpy as jnp
  from jaxrnn import rnn
  dtype = dtype or jnp.float32
  spec = rnn.rnn("lstm", D, H, output_size=O)
  params = rnn.init(jax.random.key(0), spec, dtype=dtype)
  kx, ky = jax.random.split(jax.random.key(1))
  xs = jax.random.normal(kx, (B, T, D), dtype)
  ys = jax.random.normal(ky, (B, T, O), dtype)
  lengths = jnp.array([6, 5, 4, 3, 6, 2, 1, 6], jnp.int32)

  def loss_fn(params, xs, ys, lengths):
    return rnn.loss(spec, params, xs, ys, lengths=lengths)
  return spec, params, (xs, ys, lengths), loss_fn


def _train(step, params, opt, batch, steps=STEPS):
  state = opt.init(params)
  for _ in range(steps):
    params, state, metrics = step(params, state, *batch)
  return params, metrics


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
  """Float32 params after 10 Adam steps: elementwise rtol 1e-5; the atol covers entries near 0,
  where the ~1e-7 differences of a reordered all-reduce are large relative to the entry."""
  import jax
  import numpy as np
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def case_devices(out):
  import jax
  assert jax.device_count() == 4, jax.devices()


def case_same_params(out):
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jaxrnn import parallel, train
  _, params, batch, loss_fn = _problem()
  opt = optax.adam(1e-2)
  plain, m0 = _train(train.make_train_step(loss_fn, opt), params, opt, batch)
  one, m1 = _train(parallel.make_sharded_train_step(loss_fn, opt, parallel.make_mesh(1)),
                   params, opt, batch)
  four, m4 = _train(parallel.make_sharded_train_step(loss_fn, opt, parallel.make_mesh(4)),
                    params, opt, batch)
  _assert_same(one, plain, rtol=1e-6, atol=0)
  _assert_same(four, one)
  assert abs(float(m4["loss"]) - float(m1["loss"])) <= 1e-5 * abs(float(m1["loss"]))
  assert bool(m4["finite"])
  # The multi-host test compares against this.
  out["reference_params"] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(four)]).tolist()
  out["reference_loss"] = float(m4["loss"])
  # In float64 the only difference, the order of the gradient all-reduce, all but vanishes.
  with jax.enable_x64(True):
    _, params, batch, loss_fn = _problem(jnp.float64)
    one, _ = _train(parallel.make_sharded_train_step(loss_fn, opt, parallel.make_mesh(1)),
                    params, opt, batch)
    four, _ = _train(parallel.make_sharded_train_step(loss_fn, opt, parallel.make_mesh(4)),
                     params, opt, batch)
    assert jax.tree.leaves(four)[0].dtype == jnp.float64
    _assert_same(four, one, rtol=1e-10, atol=0)


def case_layout(out):
  import jax
  import optax
  from jax.sharding import PartitionSpec as P
  from jaxrnn import parallel
  _, params, batch, loss_fn = _problem()
  mesh = parallel.make_mesh(4)
  xs, ys, lengths = parallel.shard_batch(mesh, *batch)
  assert xs.sharding.spec == P("data") and lengths.sharding.spec == P("data")
  assert sorted(s.data.shape for s in xs.addressable_shards) == [(B // 4, T, D)] * 4
  assert len({s.device for s in xs.addressable_shards}) == 4
  opt = optax.adam(1e-2)
  step = parallel.make_sharded_train_step(loss_fn, opt, mesh)
  new, state, metrics = step(params, opt.init(params), xs, ys, lengths)
  for leaf in jax.tree.leaves((new, state, metrics)):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 4, leaf.sharding
  # The compiled program all-reduces the gradients: the batch really is split.
  hlo = jax.jit(jax.grad(loss_fn)).lower(parallel.replicate(mesh, params), xs, ys, lengths)
  assert "all-reduce" in hlo.compile().as_text()


def _counting_loss(spec):
  """`(traced, loss_fn)`: an `rnn.loss` with lengths that appends to `traced` each time it traces."""
  from jaxrnn import rnn
  traced = []

  def loss_fn(params, xs, targets, lengths):
    traced.append(1)
    return rnn.loss(spec, params, xs, targets, lengths=lengths)

  return traced, loss_fn


def case_non_divisible(out):
  import optax
  import pytest
  from jaxrnn import parallel
  spec, params, (xs, ys, lengths), _ = _problem()
  traced, loss_fn = _counting_loss(spec)
  opt = optax.adam(1e-2)
  step = parallel.make_sharded_train_step(loss_fn, opt, parallel.make_mesh(4))
  with pytest.raises(ValueError, match=r"xs \(argument 2 of the train step\) has batch size 6 "
                                       r"\(axis 0\), which the 4 device\(s\) on mesh axis 'data' "
                                       r"cannot split evenly.*multiple of 4 \(e\.g\. 8\)"):
    step(params, opt.init(params), xs[:6], ys[:6], lengths[:6])
  assert not traced, "the error must come before any tracing"
  with pytest.raises(ValueError, match=r"targets \(argument 3.*batch size 7"):
    step(params, opt.init(params), xs[:4], ys[:7], lengths[:4])
  with pytest.raises(ValueError, match=r"lengths \(argument 4.*scalar"):
    step(params, opt.init(params), xs, ys, lengths[0])
  with pytest.raises(ValueError, match=r"batch\[0\] has batch size 3"):
    parallel.shard_batch(parallel.make_mesh(4), xs[:3])
  with pytest.raises(ValueError, match=r"batch_argnums must be .* >= 2"):
    parallel.make_sharded_train_step(loss_fn, opt, parallel.make_mesh(4), batch_argnums=(0,))
  with pytest.raises(ValueError, match=r"axis must be one of the mesh's axes"):
    parallel.make_sharded_train_step(loss_fn, opt, parallel.make_mesh(4), axis="batch")
  assert not traced


def case_no_recompile(out):
  import jax
  import optax
  from jaxrnn import parallel
  spec, params, batch, _ = _problem()
  traced, loss_fn = _counting_loss(spec)
  opt = optax.adam(1e-2)
  step = parallel.make_sharded_train_step(loss_fn, opt, parallel.make_mesh(4))
  state = opt.init(params)
  for seed in range(3):  # new data of the same shapes each call
    xs = jax.random.normal(jax.random.key(seed), batch[0].shape)
    params, state, _ = step(params, state, xs, batch[1], batch[2])
  assert len(traced) == 1, len(traced)


def case_batch_argnums_and_manual(out):
  import jax
  with jax.enable_x64(True):  # float64: Adam magnifies float32 reduction-order noise near g = 0
    _batch_argnums_and_manual()


def _batch_argnums_and_manual():
  import jax
  import jax.numpy as jnp
  import optax
  from jaxrnn import elman, parallel, rnn, train
  spec, params, (xs, ys, lengths), _ = _problem(jnp.float64)
  h0 = 0.1 * jnp.ones((1, B, H), jnp.float64)
  c0 = -0.1 * jnp.ones((1, B, H), jnp.float64)

  def loss_fn(params, xs, ys, carry0):  # carry0 [K, B, H]: batch on axis 1, so replicated
    return rnn.loss(spec, params, xs, ys, carry0)

  opt = optax.adam(1e-2)
  one, _ = _train(train.make_train_step(loss_fn, opt), params, opt, (xs, ys, (h0, c0)))
  step = parallel.make_sharded_train_step(loss_fn, opt, parallel.make_mesh(4),
                                          batch_argnums=(2, 3))
  four, _ = _train(step, params, opt, (xs, ys, (h0, c0)))
  _assert_same(four, one, rtol=1e-10, atol=0)

  e_params = elman.init(jax.random.key(3), D, H, O, dtype=jnp.float64)
  manual = lambda p, xs, ys: elman.manual_value_and_grad(p, xs, ys)
  e_loss = lambda p, xs, ys: elman.loss(p, xs, ys)
  ref, _ = _train(train.make_train_step(e_loss, opt, value_and_grad_fn=manual), e_params, opt,
                  (xs, ys))
  got, _ = _train(parallel.make_sharded_train_step(e_loss, opt, parallel.make_mesh(4),
                                                   value_and_grad_fn=manual),
                  e_params, opt, (xs, ys))
  _assert_same(got, ref, rtol=1e-10, atol=0)


def case_mingru_parallel(out):
  import jax
  with jax.enable_x64(True):
    _mingru_parallel()


def _mingru_parallel():
  import jax
  import jax.numpy as jnp
  import optax
  from jaxrnn import parallel, rnn, train
  _, _, (xs, ys, lengths), _ = _problem(jnp.float64)
  spec = rnn.rnn("mingru", D, H, num_layers=2, output_size=O)
  params = rnn.init(jax.random.key(4), spec, dtype=jnp.float64)
  opt = optax.adam(1e-2)
  loss_seq = lambda p, xs, ys, lengths: rnn.loss(spec, p, xs, ys, lengths=lengths)
  loss_par = lambda p, xs, ys, lengths: rnn.loss(spec, p, xs, ys, lengths=lengths,
                                                 impl="parallel")
  ref, _ = _train(train.make_train_step(loss_seq, opt), params, opt, (xs, ys, lengths))
  got, _ = _train(parallel.make_sharded_train_step(loss_par, opt, parallel.make_mesh(4)),
                  params, opt, (xs, ys, lengths))
  _assert_same(got, ref, rtol=1e-10, atol=0)


def case_make_mesh(out):
  import argparse
  import jax
  import pytest
  from jaxrnn import parallel
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data",) and mesh.shape["data"] == 4
  two = parallel.make_mesh(2, axis="batch")
  assert two.shape["batch"] == 2 and list(two.devices.flat) == jax.devices()[:2]
  assert parallel.make_mesh(jax.devices()[1:3]).shape["data"] == 2
  with pytest.raises(ValueError, match=r"devices=8 but only 4 device\(s\) are available.*"
                                       r"xla_force_host_platform_device_count=8"):
    parallel.make_mesh(8)
  with pytest.raises(ValueError, match=r"devices must be a positive number of devices; got 0"):
    parallel.make_mesh(0)
  with pytest.raises(TypeError, match=r"devices must be None"):
    parallel.make_mesh("4")
  parser = parallel.add_devices_argument(argparse.ArgumentParser())
  assert parser.parse_args([]).devices is None
  assert parallel.make_mesh(parser.parse_args(["--devices", "2"]).devices).shape["data"] == 2


def run_cases() -> dict:
  import jax
  jax.config.update("jax_numpy_rank_promotion", "raise")
  out = {}
  for name in ("devices", "same_params", "layout", "non_divisible", "no_recompile",
               "batch_argnums_and_manual", "mingru_parallel", "make_mesh"):
    try:
      globals()[f"case_{name}"](out)
      out[name] = "ok"
    except Exception:  # reported to the parent test, which fails with the traceback
      out[name] = traceback.format_exc()
  return out


def run_multihost(process_id: int, num_processes: int, port: str) -> dict:
  import jax
  jax.config.update("jax_numpy_rank_promotion", "raise")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=num_processes, process_id=process_id)
  import numpy as np
  import optax
  from jaxrnn import parallel
  assert jax.process_count() == num_processes and jax.device_count() == 4
  _, params, batch, loss_fn = _problem()
  rows = B // num_processes  # this process's rows of the global batch, in process order
  local = tuple(np.asarray(x)[process_id * rows:(process_id + 1) * rows] for x in batch)
  opt = optax.adam(1e-2)
  step = parallel.make_sharded_train_step(loss_fn, opt, parallel.make_mesh())
  params, metrics = _train(step, params, opt, local)
  flat = np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(params)])
  result = {"loss": float(metrics["loss"]), "params": flat.tolist()}
  jax.distributed.shutdown()
  return result


if __name__ == "__main__":
  if sys.argv[1] == "cases":
    print(json.dumps(run_cases()))
  elif sys.argv[1] == "multihost":
    print(json.dumps(run_multihost(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])))
  else:
    raise SystemExit(f"unknown mode {sys.argv[1]!r}; expected 'cases' or 'multihost'")
