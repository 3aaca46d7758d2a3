"""Exact resume: a run SIGKILLed again and again ends bit-identical to an uninterrupted one."""
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrnn import checkpoint, elman, loop

D, H, O, B, T = 2, 3, 1, 2, 4
KEY = jax.random.key(0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "_resumable_train.py")


@jax.jit
def _batches_fn(key, step):
  xs = jax.random.normal(jax.random.fold_in(key, step), (B, T, D))
  return xs, jnp.cumsum(xs[..., :1], axis=1)


@pytest.fixture(scope="module")
def setup():
  optimizer = optax.adam(1e-2)
  params = elman.init(jax.random.key(1), D, H, O)
  return optimizer, elman.make_train_step(optimizer), params


def _equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def test_resume_in_process_is_exact_and_passes_over_a_damaged_checkpoint(tmp_path, setup):
  optimizer, step_fn, params = setup
  fit = lambda n, **kw: loop.fit(step_fn, params, optimizer.init(params), _batches_fn, n, key=KEY,
                                 config={"H": H}, **kw)
  whole = fit(9)
  manager = checkpoint.CheckpointManager(tmp_path, keep=5)
  fit(6, checkpoint_manager=manager, every=2)
  assert manager.steps() == [2, 4, 6]
  torn = open(manager.path(6), "rb").read()[:-7]
  with open(manager.path(6), "wb") as f:
    f.write(torn)
  resumed = fit(9, checkpoint_manager=manager, every=2)
  kinds = [(e.kind, e.step) for e in resumed.events]
  assert kinds[:2] == [("corrupt_checkpoint", 6), ("resumed", 4)]
  assert resumed.events[0].info["error_kind"] == "truncated"
  assert open(manager.path(6) + ".corrupt", "rb").read() == torn     # set aside, not deleted
  assert resumed.history["step"].tolist() == [4, 5, 6, 7, 8]
  assert _equal(resumed.params, whole.params) and _equal(resumed.opt_state, whole.opt_state)
  assert manager.steps() == [2, 4, 6, 8, 9]
  # Resuming a finished run does nothing and returns its final state.
  again = fit(9, checkpoint_manager=manager, every=2)
  assert again.step == 9 and len(again.history["step"]) == 0
  assert _equal(again.params, whole.params)


def test_resume_refuses_another_key_config_or_a_used_directory(tmp_path, setup):
  optimizer, step_fn, params = setup
  manager = checkpoint.CheckpointManager(tmp_path, keep=2)
  args = (step_fn, params, optimizer.init(params), _batches_fn, 2)
  loop.fit(*args, key=KEY, checkpoint_manager=manager, config={"H": H})
  with pytest.raises(ValueError, match="key differs from the key stored in .*ckpt-0000000002"):
    loop.fit(*args, key=jax.random.key(1), checkpoint_manager=manager, config={"H": H})
  with pytest.raises(ValueError, match=r"config differs .*expected \{'H': 3\}, got \{'H': 4\}"):
    loop.fit(*args, key=KEY, checkpoint_manager=manager, config={"H": 4})
  with pytest.raises(ValueError, match=r"already holds checkpoints \(steps \[1, 2\]\)"):
    loop.fit(*args, key=KEY, checkpoint_manager=manager, resume=False)


# ------------------------------------------------------------------------------------------------
# The kill test.

NUM_STEPS, EVERY, KILLS = 150, 2, 22


class _Proc:
  """A run of tests/_resumable_train.py whose stdout lines arrive on a queue."""

  def __init__(self, directory, env, log):
    self.popen = subprocess.Popen([sys.executable, SCRIPT, str(directory), str(NUM_STEPS),
                                   str(EVERY)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=log, text=True, bufsize=1)
    self.lines = queue.Queue()
    self.seen = []
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.popen.stdout:
      self.lines.put(line.split())
    self.lines.put(None)

  def until(self, word, count=1, timeout=60.0):
    """Wait for the `count`-th line starting with `word`; return it, or None at "done" / EOF."""
    found = 0
    while True:
      line = self.lines.get(timeout=timeout)
      if line is None or line[0] == "done":
        return None
      self.seen.append(line)
      if line[0] == word:
        found += 1
        if found == count:
          return line

  def kill(self) -> bool:
    """SIGKILL it and collect what it printed; whether it was still running (killed)."""
    self.popen.send_signal(signal.SIGKILL)
    self.popen.wait(timeout=60)
    self.until("never")
    return self.popen.returncode == -signal.SIGKILL


def _env(cache, write_sleep=0.0, step_sleep=0.0):
  env = dict(os.environ)
  env.update({
      "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""),
      "JAX_PLATFORMS": "cpu",
      # Compile once, then every relaunch loads the executables (about 1 s saved per launch).
      "JAX_COMPILATION_CACHE_DIR": str(cache),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
      "JAXRNN_TEST_WRITE_SLEEP": str(write_sleep),
      "JAXRNN_TEST_STEP_SLEEP": str(step_sleep),
  })
  return env


def _templates():
  params = elman.init(jax.random.key(1), 2, 4, 1)      # the script's model
  return params, optax.adam(1e-2).init(params)


def _load_all(directory):
  params, opt_state = _templates()
  names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
  return {n: checkpoint.load(os.path.join(directory, n), params=params, opt_state=opt_state)
          for n in names}


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
  """22 SIGKILLs: during start-up, mid-write (temp file written, not yet renamed), right after a
  checkpoint, and at random moments in training; each relaunch resumes from the newest checkpoint.
  The final params and optimiser state equal an uninterrupted run's bit for bit."""
  rng = random.Random(20240601)
  cache, ref_dir, run_dir = tmp_path / "cache", tmp_path / "ref", tmp_path / "run"
  log = open(tmp_path / "stderr.log", "w")

  reference = subprocess.run([sys.executable, SCRIPT, str(ref_dir), str(NUM_STEPS), str(EVERY)],
                             cwd=ROOT, env=_env(cache), stdout=subprocess.PIPE, stderr=log,
                             text=True, timeout=120)
  assert reference.returncode == 0, open(tmp_path / "stderr.log").read()
  assert reference.stdout.split()[-2:] == ["done", str(NUM_STEPS)]

  modes = ["startup", "mid_write", "after_save", "random"] + \
      ["mid_write", "after_save", "random"] * 6
  assert len(modes) == KILLS
  kills, mid_write_kills, last_saved, resumes, progress = 0, 0, 0, [], []
  started = time.monotonic()
  for mode in modes:
    # Paced at >= 10 ms a step, so that each killed run gets a few steps further, not to the end.
    proc = _Proc(run_dir, _env(cache, 0.2 if mode == "mid_write" else 0.0, 0.01), log)
    if mode == "startup":
      time.sleep(rng.uniform(0.05, 0.6))
      writing = None
    else:
      saved = proc.until("saved", count=rng.randint(1, 3) if mode == "after_save" else 1)
      assert saved is not None, ("the run finished before the kill", mode, proc.seen, progress)
      writing = proc.until("writing") if mode == "mid_write" else None
      if mode == "random":
        time.sleep(rng.uniform(0.0, 0.05))
    assert proc.kill(), ("the run finished before the kill", mode, proc.seen)
    kills += 1
    # A relaunch resumes from the newest checkpoint announced (or one written just after it,
    # by a run killed before it could announce it).
    resumed = [int(w[1]) for w in proc.seen if w[0] == "resumed"]
    if mode != "startup" and last_saved > 0:
      assert resumed and last_saved <= resumed[0] <= last_saved + EVERY, (mode, proc.seen)
      resumes.append(resumed[0])
    assert not [w for w in proc.seen if w[0] == "corrupt"], proc.seen
    last_saved = max([int(w[1]) for w in proc.seen if w[0] == "saved"] + [last_saved])
    progress.append((mode, last_saved, round(time.monotonic() - started, 2)))
    if mode == "mid_write":
      # Killed after the temporary file was complete and before its rename: the temporary file
      # is there, the new name is not, and the previous checkpoints all load.
      assert writing is not None and not os.path.exists(writing[1]), proc.seen
      assert any(n.endswith(".tmp") for n in os.listdir(run_dir)), os.listdir(run_dir)
      assert max(int(n[5:15]) for n in _load_all(run_dir)) == last_saved
      mid_write_kills += 1

  final = _Proc(run_dir, _env(cache), log)
  assert final.until("never") is None and final.popen.wait(timeout=60) == 0
  resumed = [int(w[1]) for w in final.seen if w[0] == "resumed"]
  assert resumed and last_saved <= resumed[0] <= last_saved + EVERY, final.seen
  elapsed = time.monotonic() - started
  log.close()

  assert kills == KILLS >= 20 and mid_write_kills == 7 and len(resumes) >= KILLS - 2
  assert last_saved < NUM_STEPS, progress         # every kill landed before the end of training
  # Nothing torn was ever found or left: no damaged file set aside, no temporary file left over.
  assert sorted(os.listdir(run_dir)) == sorted(n for n in os.listdir(run_dir)
                                               if n.endswith(".safetensors")), os.listdir(run_dir)
  ckpts, ref = _load_all(run_dir), _load_all(ref_dir)
  last = f"ckpt-{NUM_STEPS:010d}.safetensors"
  assert last in ckpts and last in ref and len(ckpts) <= 4      # keep=3 plus the best
  assert ckpts[last].step == NUM_STEPS
  assert _equal(ckpts[last].params, ref[last].params)
  assert _equal(ckpts[last].opt_state, ref[last].opt_state)
  assert int(ckpts[last].opt_state[0].count) == NUM_STEPS
  assert elapsed < 300, elapsed
