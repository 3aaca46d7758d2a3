"""Checkpoints: exact round trips, every kind of damage refused, retention, atomic writes."""
import json
import os
import pickle
import stat

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy as stn

from jaxrnn import checkpoint, elman
from jaxrnn.checkpoint import Checkpoint, CheckpointError, CheckpointManager

D, H, O, B, T = 2, 3, 1, 2, 4


def _data(seed=0):
  xs = jax.random.normal(jax.random.key(seed), (B, T, D))
  return xs, jnp.cumsum(xs[..., :1], axis=1)


@pytest.fixture(scope="module")
def trained():
  """Elman params and an Adam state after two real steps (so mu, nu, count are all non-trivial)."""
  optimizer = optax.adam(1e-2)
  params = elman.init(jax.random.key(1), D, H, O)
  opt_state = optimizer.init(params)
  step = elman.make_train_step(optimizer)
  for seed in range(2):
    params, opt_state, _ = step(params, opt_state, *_data(seed))
  return params, opt_state


def _templates(hidden=H):
  params = elman.init(jax.random.key(9), D, hidden, O)
  return params, optax.adam(1e-2).init(params)


def _ckpt(trained, step=7, key=None, metrics=None):
  params, opt_state = trained
  return Checkpoint(params, opt_state, step, jax.random.key(42) if key is None else key,
                    data_position={"epoch": 1, "batch": 3},
                    config={"hidden_size": H, "f": "tanh", "lrs": [0.1, 0.01]},
                    metrics={"loss": 0.25} if metrics is None else metrics)


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.array_equal(np.asarray(x), np.asarray(y))


def _load(path, **kw):
  params, opt_state = _templates()
  return checkpoint.load(path, params=params, opt_state=opt_state, **kw)


def _header(data: bytes) -> tuple[int, dict]:
  n = int.from_bytes(data[:8], "little")
  return n, json.loads(data[8:8 + n])


# ------------------------------------------------------------------------------------------------
# Round trips.


def test_round_trip_is_exact(tmp_path, trained):
  ckpt = _ckpt(trained)
  path = checkpoint.save(tmp_path / "a.safetensors", ckpt)
  back = _load(path, key=jax.random.key(0))
  _assert_trees_equal(back.params, trained[0])
  _assert_trees_equal(back.opt_state, trained[1])
  assert type(back.opt_state[0]) is optax.ScaleByAdamState
  assert int(back.opt_state[0].count) == 2 and back.opt_state[0].count.shape == ()
  assert back.step == 7
  assert jnp.issubdtype(back.key.dtype, jax.dtypes.prng_key)
  assert np.array_equal(jax.random.key_data(back.key), jax.random.key_data(jax.random.key(42)))
  assert back.config == {"hidden_size": 3, "f": "tanh", "lrs": [0.1, 0.01]}
  assert back.data_position == {"epoch": 1, "batch": 3}
  assert back.metrics == {"loss": 0.25}
  # Abstract templates (shapes and dtypes only) do as well as arrays.
  params, opt_state = _templates()
  abstract = checkpoint.load(path, params=jax.eval_shape(lambda: params),
                             opt_state=jax.eval_shape(lambda: opt_state))
  _assert_trees_equal(abstract.opt_state, trained[1])
  # Training on from the restored state is the same as from the original.
  step = elman.make_train_step(optax.adam(1e-2))
  _assert_trees_equal(step(back.params, back.opt_state, *_data(5))[0],
                      step(*trained, *_data(5))[0])


@pytest.mark.parametrize("make_key", [
    lambda: jax.random.PRNGKey(3),                         # legacy uint32[2]
    lambda: jax.random.key(3, impl="rbg"),                 # typed, data uint32[4]
    lambda: None,
], ids=["legacy", "rbg", "none"])
def test_round_trip_keys(tmp_path, trained, make_key):
  key = make_key()
  path = checkpoint.save(tmp_path / "k.safetensors", _ckpt(trained)._replace(key=key))
  back = _load(path)
  if key is None:
    assert back.key is None
  elif jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    assert back.key.dtype == key.dtype
    assert np.array_equal(jax.random.key_data(back.key), jax.random.key_data(key))
    assert np.array_equal(jax.random.normal(back.key, (3,)), jax.random.normal(key, (3,)))
  else:
    assert back.key.dtype == jnp.uint32 and np.array_equal(back.key, [0, 3])


def test_round_trip_non_native_dtype_and_nonfinite_metric(tmp_path):
  """bfloat16 is not a safetensors.numpy dtype: it is stored as bytes and comes back exact."""
  params = {"w": jnp.array([1.5, -2.25, 3.0e-3], jnp.bfloat16), "n": jnp.arange(4, dtype=jnp.int32)}
  path = checkpoint.save(tmp_path / "b.safetensors",
                         Checkpoint(params, (), 0, metrics={"loss": float("nan")}))
  back = checkpoint.load(path, params=params, opt_state=())
  _assert_trees_equal(back.params, params)
  assert np.isnan(back.metrics["loss"])


def test_file_is_standard_safetensors_with_json_record(tmp_path, trained):
  """Other tools can read the arrays; the record carries paths, dtypes, shapes, version, sha256."""
  path = checkpoint.save(tmp_path / "a.safetensors", _ckpt(trained))
  data = open(path, "rb").read()
  arrays = stn.load(data)
  record = json.loads(_header(data)[1]["__metadata__"]["jaxrnn"])
  assert record["version"] == 1 and len(record["sha256"]) == 64
  entries = {e["path"]: e for e in record["trees"]["params"]}
  assert entries["['W']"]["shape"] == [H, H] and entries["['W']"]["dtype"] == "float32"
  assert np.array_equal(arrays[entries["['W']"]["name"]], trained[0]["W"])
  assert "[0].mu['U']" in {e["path"] for e in record["trees"]["opt_state"]}


def test_save_rejects_bad_input(tmp_path, trained):
  with pytest.raises(TypeError, match="ckpt.config must be JSON-able"):
    checkpoint.save(tmp_path / "c.safetensors", _ckpt(trained)._replace(config={"f": jnp.tanh}))
  with pytest.raises(ValueError, match="ckpt.step must be an integer >= 0"):
    checkpoint.save(tmp_path / "c.safetensors", _ckpt(trained, step=-1))
  assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------
# Damage: each kind is refused with a message naming it.


@pytest.fixture
def saved(tmp_path, trained):
  path = checkpoint.save(tmp_path / "ckpt.safetensors", _ckpt(trained))
  return path, open(path, "rb").read()


def _write(path, data):
  with open(path, "wb") as f:
    f.write(data)


def test_corrupted_data_byte(saved):
  path, data = saved
  broken = bytearray(data)
  broken[len(data) - 3] ^= 0x01                # one bit of the last array
  _write(path, bytes(broken))
  with pytest.raises(CheckpointError, match="checksum mismatch") as e:
    _load(path)
  assert e.value.kind == "corrupted" and str(path) in str(e.value)


def test_corrupted_header_value(saved):
  """A digit of the step in the JSON record: still valid JSON, caught by the checksum."""
  path, data = saved
  at = data.index(b'step\\": 7')
  _write(path, data[:at + 8] + b"8" + data[at + 9:])
  with pytest.raises(CheckpointError, match="checksum mismatch"):
    _load(path)


def test_corrupted_header_syntax(saved):
  path, data = saved
  at = data.index(b'"__metadata__"')
  _write(path, data[:at] + b"{" + data[at + 1:])
  with pytest.raises(CheckpointError, match="corrupted header") as e:
    _load(path)
  assert e.value.kind == "corrupted"


@pytest.mark.parametrize("cut", ["length", "header", "data"])
def test_truncated_file(saved, cut):
  path, data = saved
  n = int.from_bytes(data[:8], "little")
  size = {"length": 5, "header": 8 + n // 2, "data": len(data) - 1}[cut]
  _write(path, data[:size])
  with pytest.raises(CheckpointError, match="truncated file") as e:
    _load(path)
  assert e.value.kind == "truncated" and f"{size} bytes" in str(e.value)


def test_wrong_version(saved):
  path, data = saved
  record = json.loads(_header(data)[1]["__metadata__"]["jaxrnn"])
  record["version"] = 2
  _write(path, stn.save(stn.load(data), metadata={"jaxrnn": json.dumps(record)}))
  with pytest.raises(CheckpointError, match="format version 2; this jaxrnn reads version 1") as e:
    _load(path)
  assert e.value.kind == "version"


def test_plain_safetensors_file_is_not_a_checkpoint(tmp_path):
  path = tmp_path / "plain.safetensors"
  _write(path, stn.save({"w": np.ones(3, np.float32)}))
  with pytest.raises(CheckpointError, match="not a jaxrnn checkpoint") as e:
    _load(path)
  assert e.value.kind == "not_checkpoint"


def _save_params(tmp_path, params, opt_state=None, key=None):
  opt_state = optax.adam(1e-2).init(params) if opt_state is None else opt_state
  return checkpoint.save(tmp_path / "s.safetensors", Checkpoint(params, opt_state, 1, key))


def test_missing_leaf(tmp_path, trained):
  params = {k: v for k, v in trained[0].items() if k != "c"}
  path = _save_params(tmp_path, params, optax.adam(1e-2).init(_templates()[0]))
  with pytest.raises(CheckpointError,
                     match=r"missing leaf params\['c'\]: the template has it") as e:
    _load(path)
  assert e.value.kind == "missing"


def test_extra_leaf(tmp_path, trained):
  params = {**trained[0], "d": jnp.zeros(2)}
  path = _save_params(tmp_path, params, optax.adam(1e-2).init(_templates()[0]))
  with pytest.raises(CheckpointError,
                     match=r"extra leaf params\['d'\]: the checkpoint has it") as e:
    _load(path)
  assert e.value.kind == "extra"


def test_extra_optimizer_leaf(tmp_path, trained):
  """An Adam checkpoint loaded into an SGD template: Adam's count is the first extra leaf."""
  path = _save_params(tmp_path, trained[0], trained[1])
  with pytest.raises(CheckpointError, match=r"extra leaf opt_state\[0\]\.count"):
    checkpoint.load(path, params=_templates()[0], opt_state=optax.sgd(0.1).init(trained[0]))


def test_wrong_shape(tmp_path):
  path = _save_params(tmp_path, _templates(hidden=4)[0])
  with pytest.raises(CheckpointError, match=r"shape mismatch at params\['U'\]: the template "
                     r"expects \[3, 2\], the checkpoint has \[4, 2\]") as e:
    _load(path)
  assert e.value.kind == "shape"


def test_wrong_dtype(tmp_path, trained):
  params = jax.tree.map(lambda v: v.astype(jnp.float16), trained[0])
  path = _save_params(tmp_path, params, optax.adam(1e-2).init(_templates()[0]))
  with pytest.raises(CheckpointError, match=r"dtype mismatch at params\['U'\]: the template "
                     "expects float32, the checkpoint has float16") as e:
    _load(path)
  assert e.value.kind == "dtype"


def test_wrong_key_kind(tmp_path, trained):
  path = _save_params(tmp_path, *trained, key=jax.random.key(0))
  with pytest.raises(CheckpointError, match="at key: the template expects"):
    _load(path, key=jax.random.PRNGKey(0))


class _Bomb:
  """Unpickling this creates the file `marker`: code execution, detectable."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def test_pickle_bomb_is_never_executed(tmp_path, trained):
  marker = tmp_path / "pwned"
  payload = pickle.dumps(_Bomb(str(marker)))
  # The payload is live: unpickling it does run code (the control for the assertions below).
  control = tmp_path / "control"
  pickle.loads(pickle.dumps(_Bomb(str(control)))).close()
  assert control.exists()

  run = tmp_path / "run"
  manager = CheckpointManager(run, keep=3)
  manager.save(_ckpt(trained, step=3))
  for path in (tmp_path / "bomb.safetensors", manager.path(5)):
    _write(path, payload)
  with pytest.raises(CheckpointError, match="not a safetensors checkpoint") as e:
    _load(tmp_path / "bomb.safetensors")
  assert e.value.kind == "not_checkpoint"
  latest, skipped = manager.restore_latest(params=_templates()[0], opt_state=_templates()[1])
  assert latest.step == 3
  assert [(s.step, s.error.kind) for s in skipped] == [(5, "not_checkpoint")]
  assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# The manager: retention, no silent overwrite, damaged files passed over.


def _names(directory):
  return sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))


def _name(step):
  return f"ckpt-{step:010d}.safetensors"


def test_keep_last_k_plus_best(tmp_path, trained):
  manager = CheckpointManager(tmp_path, keep=2, best_metric="loss")
  losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: float("nan"), 6: 6.0, 7: 2.0}
  expected = {1: [1], 2: [1, 2], 3: [2, 3], 4: [2, 3, 4], 5: [2, 4, 5], 6: [2, 5, 6], 7: [2, 6, 7]}
  for step, loss in losses.items():
    manager.save(_ckpt(trained, step=step, metrics={"loss": loss}))
    assert _names(tmp_path) == [_name(s) for s in expected[step]], step
  assert manager.best_step() == 2
  assert manager.steps() == [2, 6, 7]


def test_keep_without_best(tmp_path, trained):
  manager = CheckpointManager(tmp_path, keep=1)
  for step in (1, 2, 3):
    manager.save(_ckpt(trained, step=step, metrics={"loss": -step}))
  assert _names(tmp_path) == [_name(3)]


def test_never_overwrites_silently(tmp_path, trained):
  manager = CheckpointManager(tmp_path, keep=3)
  path = manager.save(_ckpt(trained, step=4))
  before = open(path, "rb").read()
  with pytest.raises(CheckpointError, match="exists; pass overwrite=True") as e:
    manager.save(_ckpt(trained, step=4, metrics={"loss": 9.0}))
  assert e.value.kind == "exists"
  assert open(path, "rb").read() == before
  with pytest.raises(CheckpointError, match="exists"):
    checkpoint.save(path, _ckpt(trained, step=4))
  manager.save(_ckpt(trained, step=4, metrics={"loss": 9.0}), overwrite=True)
  assert _load(path).metrics == {"loss": 9.0}


def test_damaged_files_are_skipped_counted_out_and_never_deleted(tmp_path, trained):
  manager = CheckpointManager(tmp_path, keep=2)
  for step in (1, 2):
    manager.save(_ckpt(trained, step=step))
  good = open(manager.path(2), "rb").read()
  _write(manager.path(3), good[:-10])                       # a torn newer file
  latest, skipped = manager.restore_latest(params=_templates()[0], opt_state=_templates()[1])
  assert latest.step == 2
  assert [(s.step, s.error.kind, s.moved_to) for s in skipped] == [(3, "truncated", None)]
  # The damaged file is not one of the 2 kept (2 and 4 are), and it is not deleted either.
  manager.save(_ckpt(trained, step=4))
  assert _names(tmp_path) == [_name(2), _name(3), _name(4)]
  # Quarantine renames it aside, bytes intact, so that its step can be written again.
  latest, skipped = manager.restore_latest(params=_templates()[0], opt_state=_templates()[1],
                                           quarantine=True)
  assert latest.step == 4 and skipped == []
  _write(manager.path(5), good[:-10])
  latest, skipped = manager.restore_latest(params=_templates()[0], opt_state=_templates()[1],
                                           quarantine=True)
  assert latest.step == 4
  assert skipped[0].moved_to == manager.path(5) + ".corrupt"
  assert open(skipped[0].moved_to, "rb").read() == good[:-10]
  manager.save(_ckpt(trained, step=5))
  assert _load(manager.path(5)).step == 5


def test_a_bad_write_prunes_nothing(tmp_path, trained, monkeypatch):
  """If the new file does not read back intact, the old (only good) one is kept."""
  manager = CheckpointManager(tmp_path, keep=1)
  manager.save(_ckpt(trained, step=1))
  real = checkpoint.to_bytes

  def flipped(ckpt):
    data = bytearray(real(ckpt))
    data[-1] ^= 0x10
    return bytes(data)

  monkeypatch.setattr(checkpoint, "to_bytes", flipped)
  with pytest.raises(CheckpointError, match="checksum mismatch"):
    manager.save(_ckpt(trained, step=2))
  monkeypatch.undo()
  assert _load(manager.path(1)).step == 1


def test_restore_latest_raises_on_template_mismatch(tmp_path, trained):
  """An intact checkpoint of another model is the caller's error, not damage to skip."""
  manager = CheckpointManager(tmp_path, keep=2)
  manager.save(_ckpt(trained, step=1))
  params, opt_state = _templates(hidden=5)
  with pytest.raises(CheckpointError, match="shape mismatch"):
    manager.restore_latest(params=params, opt_state=opt_state)


def test_restore_latest_empty_directory(tmp_path):
  assert CheckpointManager(tmp_path / "new").restore_latest(
      params=_templates()[0], opt_state=_templates()[1]) == (None, [])


def test_cleanup_removes_only_stale_temp_files(tmp_path, trained):
  manager = CheckpointManager(tmp_path, keep=2)
  stale = tmp_path / f".{_name(5)}.0a1b2c.tmp"
  other = tmp_path / "notes.tmp"
  stale.write_bytes(b"half a checkpoint")
  other.write_bytes(b"mine")
  assert manager.steps() == []
  manager.save(_ckpt(trained, step=1))          # the first save cleans up
  assert not stale.exists() and other.exists()


# ------------------------------------------------------------------------------------------------
# Atomic writes.


class _Crash(Exception):
  pass


def _crash(*args, **kwargs):
  raise _Crash("simulated crash between writing the temporary file and renaming it")


def test_crash_before_replace_keeps_old_file(tmp_path, trained, monkeypatch):
  path = checkpoint.save(tmp_path / "a.safetensors", _ckpt(trained, step=1))
  before = open(path, "rb").read()
  monkeypatch.setattr(os, "replace", _crash)
  with pytest.raises(_Crash):
    checkpoint.save(path, _ckpt(trained, step=2), overwrite=True)
  monkeypatch.undo()
  assert open(path, "rb").read() == before
  assert _load(path).step == 1
  assert os.listdir(tmp_path) == ["a.safetensors"]          # no temporary file left behind


def test_crash_in_manager_write_keeps_previous_checkpoints(tmp_path, trained, monkeypatch):
  manager = CheckpointManager(tmp_path, keep=1)
  manager.save(_ckpt(trained, step=1))
  monkeypatch.setattr(os, "link", _crash)
  monkeypatch.setattr(os, "replace", _crash)
  with pytest.raises(_Crash):
    manager.save(_ckpt(trained, step=2))
  monkeypatch.undo()
  assert os.listdir(tmp_path) == [_name(1)]
  latest, skipped = manager.restore_latest(params=_templates()[0], opt_state=_templates()[1])
  assert latest.step == 1 and skipped == []


def test_write_protocol_fsyncs_file_then_renames_then_fsyncs_directory(tmp_path, monkeypatch):
  calls = []
  real_fsync, real_link = os.fsync, os.link

  def fsync(fd):
    calls.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
    real_fsync(fd)

  def link(src, dst):
    calls.append("link")
    # The temporary file sits in the target's directory and is complete when it is linked.
    assert os.path.dirname(src) == str(tmp_path) and open(src, "rb").read() == b"new bytes"
    real_link(src, dst)

  monkeypatch.setattr(os, "fsync", fsync)
  monkeypatch.setattr(os, "link", link)
  checkpoint.write_atomic(tmp_path / "f.bin", b"new bytes")
  assert calls == ["fsync file", "link", "fsync dir"]
  assert os.listdir(tmp_path) == ["f.bin"]
