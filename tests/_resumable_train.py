"""A resumable training run for tests/test_resume.py: an Elman RNN trained with Adam.

Usage: python tests/_resumable_train.py DIRECTORY NUM_STEPS EVERY

Resumes from DIRECTORY's newest checkpoint if there is one. Prints one line per event, flushed:
"resumed S", "saved S", "corrupt S" and finally "done S". Environment (for the kill test):
  JAXRNN_TEST_WRITE_SLEEP  seconds to sleep inside each checkpoint write, after the temporary file
                           is written and fsynced and before it gets its name; "writing" is
                           printed first, so a kill on that line lands mid-write.
  JAXRNN_TEST_STEP_SLEEP   seconds to sleep after each step, to pace the run for the killer.
"""
import os
import sys
import time


def _slow_commits(seconds: float) -> None:
  """Make every commit of a checkpoint write announce itself, then pause."""
  for name in ("link", "replace"):
    real = getattr(os, name)

    def slow(src, dst, *args, _real=real, **kwargs):
      if str(src).endswith(".tmp"):
        print("writing", dst, flush=True)
        time.sleep(seconds)
      return _real(src, dst, *args, **kwargs)

    setattr(os, name, slow)


def main() -> None:
  directory, num_steps, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
  write_sleep = float(os.environ.get("JAXRNN_TEST_WRITE_SLEEP", "0"))
  step_sleep = float(os.environ.get("JAXRNN_TEST_STEP_SLEEP", "0"))
  if write_sleep > 0:
    _slow_commits(write_sleep)

  import jax
  import jax.numpy as jnp
  import optax

  from jaxrnn import checkpoint, elman, loop

  config = {"input_size": 2, "hidden_size": 4, "output_size": 1, "lr": 1e-2, "batch": 2, "T": 5}
  params = elman.init(jax.random.key(1), config["input_size"], config["hidden_size"],
                      config["output_size"])
  optimizer = optax.adam(config["lr"])
  step_fn = elman.make_train_step(optimizer)

  @jax.jit
  def batches_fn(key, step):
    xs = jax.random.normal(jax.random.fold_in(key, step),
                           (config["batch"], config["T"], config["input_size"]))
    return xs, 0.5 * jnp.cumsum(xs[..., :1], axis=1)

  def on_event(event):
    word = {"resumed": "resumed", "checkpoint": "saved", "corrupt_checkpoint": "corrupt"}
    if event.kind in word:
      print(word[event.kind], event.step, flush=True)

  manager = checkpoint.CheckpointManager(directory, keep=3, best_metric="loss")
  result = loop.fit(step_fn, params, optimizer.init(params), batches_fn, num_steps,
                    key=jax.random.key(0), checkpoint_manager=manager, every=every, config=config,
                    on_event=on_event, on_step=lambda step, metrics: time.sleep(step_sleep))
  print("done", result.step, flush=True)


if __name__ == "__main__":
  main()
