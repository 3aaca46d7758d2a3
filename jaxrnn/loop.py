"""A resumable training loop with a guard against non-finite steps.

`fit` runs a training step over `num_steps` batches and checkpoints every `every` steps through a
`jaxrnn.checkpoint.CheckpointManager`. The batch of step `s` is `batches_fn(key, s)`, a pure
function of the key and the step index, and the checkpoint holds everything else the loop carries
(params, optimiser state, step, key, skip counters), so a run killed at any moment and resumed from
its newest checkpoint performs exactly the same computations as an uninterrupted one and ends with
bit-identical params.

The guard: after each step the loop reads `metrics["loss"]` and `metrics["grad_norm"]` (one host
sync per step). If either is NaN or Inf (or `metrics["finite"]` is False) the step's update is
discarded, whatever the step function did, and a "nonfinite" event names the step and the bad
quantities ("loss", "grads"). With `on_nonfinite="skip"` the run goes on with the next batch, for
at most `max_consecutive_skips` batches in a row and `max_skips` in all; the next non-finite step
beyond either bound, or the first one with `on_nonfinite="stop"`, stops the run. A stop writes no
checkpoint, so the directory keeps the checkpoints written before it, and the returned params are
the last finite ones.

Example:
  >>> optimizer = optax.adam(1e-2)
  >>> step_fn = elman.make_train_step(optimizer)
  >>> def batches_fn(key, step):                   # pure in (key, step): resumable
  ...   xs = jax.random.normal(jax.random.fold_in(key, step), (8, 20, 3))
  ...   return xs, jnp.cumsum(xs[..., :2], axis=1)
  >>> manager = checkpoint.CheckpointManager("runs/a", keep=3, best_metric="loss")
  >>> result = loop.fit(step_fn, params, optimizer.init(params), batches_fn, 1000,
  ...                   key=jax.random.key(0), checkpoint_manager=manager, every=50)
  >>> result.stopped, result.step, result.history["loss"][-1]
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn import _checks, checkpoint

OnNonfinite = Literal["skip", "stop"]


class Event(NamedTuple):
  """Something the loop reports.

  Attributes:
    step: the step index it concerns (for "checkpoint" and "resumed", the number of steps done).
    kind: "resumed", "corrupt_checkpoint" (info: path, error, error_kind, moved_to),
      "temp_files_removed", "checkpoint" (info: path), "nonfinite" or "stopped" (info: reason,
      last_checkpoint).
    info: details, e.g. for "nonfinite" `{"bad": ("loss", "grads"), "loss": nan, "grad_norm": nan,
      "action": "skipped" or "stopped", "consecutive": 1, "total": 1}`.
  """
  step: int
  kind: str
  info: dict


class FitResult(NamedTuple):
  """What `fit` returns.

  Attributes:
    params, opt_state: the final state (the last finite one if the run stopped).
    step: the number of steps done, counting those before a resume (a stopped run does not count
      the step that stopped it).
    history: `{"step", "loss", "grad_norm", "finite"}`, NumPy arrays over the steps run by this
      call, skipped ones included.
    events: every `Event`, in order.
    stopped: None if the run reached `num_steps`, else why it stopped.
    skipped: how many steps were skipped in the whole run, counting those before a resume.
  """
  params: Any
  opt_state: Any
  step: int
  history: dict
  events: list
  stopped: Optional[str]
  skipped: int


def _key_data(key) -> tuple[str, np.ndarray]:
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return str(key.dtype), np.asarray(jax.random.key_data(key))
  return "legacy", np.asarray(key)


def _same_key(a, b) -> bool:
  (kind_a, data_a), (kind_b, data_b) = _key_data(a), _key_data(b)
  return kind_a == kind_b and np.array_equal(data_a, data_b)


def fit(step_fn: Callable, params: Any, opt_state: Any, batches_fn: Callable, num_steps: int, *,
        key: jax.Array, checkpoint_manager: Optional[checkpoint.CheckpointManager] = None,
        every: int = 1, resume: bool = True, config: Optional[dict] = None,
        on_nonfinite: OnNonfinite = "skip", max_skips: int = 100,
        max_consecutive_skips: int = 10,
        on_step: Optional[Callable[[int, dict], None]] = None,
        on_event: Optional[Callable[[Event], None]] = None) -> FitResult:
  """Train for `num_steps` steps, resumably, skipping or stopping on non-finite steps.

  Step `s` (0-based) runs `step_fn(params, opt_state, *batches_fn(key, s))`.

  Args:
    step_fn: `(params, opt_state, *batch) -> (params, opt_state, metrics)` with scalar
      `metrics["loss"]` and `metrics["grad_norm"]`, e.g. from `jaxrnn.train.make_train_step` or
      `jaxrnn.elman.make_train_step`. It must not donate its inputs: the loop keeps them to undo
      a non-finite step.
    params, opt_state: the initial state; also the templates a checkpoint is checked against.
    batches_fn: `(key, step) -> tuple` of the batch arguments of `step_fn`, e.g. `(xs, targets)`.
      It must be a pure function of `(key, step)` for a resumed run to repeat an uninterrupted one.
    num_steps: the total number of steps of the run, resumed steps included.
    key: the run's PRNG key, passed to `batches_fn` and stored in checkpoints.
    checkpoint_manager: where to checkpoint; None for no checkpoints.
    every: checkpoint after every `every`-th step, and after the last.
    resume: start from the manager's newest intact checkpoint if there is one (damaged ones are
      reported, renamed `*.corrupt` and passed over). If False the directory must hold no
      checkpoint.
    config: a JSON-able dict stored in every checkpoint; a resumed run must pass the same one.
    on_nonfinite: "skip" (drop the update and go on, within the bounds below) or "stop".
    max_skips: the most non-finite steps skipped in the whole run.
    max_consecutive_skips: the most non-finite steps skipped in a row.
    on_step: called as `on_step(step, {"loss": float, "grad_norm": float, "finite": bool})`.
    on_event: called with every `Event` as it happens (for logging; the loop never prints).

  Returns:
    A `FitResult`.

  Raises:
    ValueError: `resume=False` with checkpoints present, or a resumed run's `key` or `config`
      differs from the checkpoint's.
    jaxrnn.checkpoint.CheckpointError: the newest intact checkpoint does not match `params` /
      `opt_state` (another model or optimiser), or a write would overwrite a file.
  """
  if not callable(step_fn):
    raise TypeError(f"step_fn must be callable (params, opt_state, *batch) -> (params, opt_state, "
                    f"metrics); got {type(step_fn).__name__}.")
  if not callable(batches_fn):
    raise TypeError(f"batches_fn must be callable (key, step) -> tuple of batch arrays; got "
                    f"{type(batches_fn).__name__}.")
  num_steps = _checks.check_positive_int("num_steps", num_steps, minimum=0)
  every = _checks.check_positive_int("every", every)
  max_skips = _checks.check_positive_int("max_skips", max_skips, minimum=0)
  max_consecutive_skips = _checks.check_positive_int("max_consecutive_skips",
                                                     max_consecutive_skips, minimum=0)
  _checks.check_choice("on_nonfinite", on_nonfinite, ("skip", "stop"))
  _checks.check_key("key", key)
  if checkpoint_manager is not None and not isinstance(checkpoint_manager,
                                                       checkpoint.CheckpointManager):
    raise TypeError("checkpoint_manager must be a jaxrnn.checkpoint.CheckpointManager or None; "
                    f"got {type(checkpoint_manager).__name__}.")
  if config is not None:
    if not isinstance(config, dict):
      raise TypeError(f"config must be a JSON-able dict or None; got {type(config).__name__}.")
    config = json.loads(json.dumps(config, allow_nan=False))

  events: list[Event] = []

  def emit(step, kind, **info):
    event = Event(step, kind, info)
    events.append(event)
    if on_event is not None:
      on_event(event)

  step, skipped, consecutive = 0, 0, 0
  manager = checkpoint_manager
  if manager is not None:
    if resume:
      ckpt, passed = manager.restore_latest(params=params, opt_state=opt_state, key=key,
                                            quarantine=True)
      for s in passed:
        emit(s.step, "corrupt_checkpoint", path=s.path, error=str(s.error),
             error_kind=s.error.kind, moved_to=s.moved_to)
      if ckpt is not None:
        where = manager.path(ckpt.step)
        if ckpt.key is None or not _same_key(ckpt.key, key):
          raise ValueError(f"key differs from the key stored in {where}; a resumed run must use "
                           "the key it started with (its batches depend on it). Pass that key, or "
                           "resume=False with a fresh directory.")
        if config is not None and ckpt.config != config:
          raise ValueError(f"config differs from the one stored in {where}: expected "
                           f"{ckpt.config}, got {config}. Resume with the same config, or start a "
                           "new run in a fresh directory.")
        params, opt_state, step = ckpt.params, ckpt.opt_state, ckpt.step
        position = ckpt.data_position if isinstance(ckpt.data_position, dict) else {}
        skipped = int(position.get("skipped", 0))
        consecutive = int(position.get("consecutive_skipped", 0))
        emit(step, "resumed", path=where)
    elif manager.steps():
      raise ValueError(f"checkpoint_manager's directory {manager.directory} already holds "
                       f"checkpoints (steps {manager.steps()}); pass resume=True to continue that "
                       "run, or use a fresh directory.")
    removed = manager.cleanup()
    if removed:
      emit(step, "temp_files_removed", paths=removed)

  history = {"step": [], "loss": [], "grad_norm": [], "finite": []}
  stopped = None
  while step < num_steps:
    batch = batches_fn(key, step)
    if not isinstance(batch, tuple):
      raise TypeError("batches_fn must return a tuple of step_fn's batch arguments, e.g. "
                      f"(xs, targets); got {type(batch).__name__} at step {step}.")
    new_params, new_opt_state, metrics = step_fn(params, opt_state, *batch)
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    bad = tuple(name for name, value in (("loss", loss), ("grads", grad_norm))
                if not math.isfinite(value))
    if not bad and not bool(metrics.get("finite", True)):
      bad = ("finite",)
    for name, value in (("step", step), ("loss", loss), ("grad_norm", grad_norm),
                        ("finite", not bad)):
      history[name].append(value)
    if on_step is not None:
      on_step(step, {"loss": loss, "grad_norm": grad_norm, "finite": not bad})

    if not bad:
      params, opt_state, consecutive = new_params, new_opt_state, 0
    else:
      if on_nonfinite == "stop":
        stopped = f"non-finite {' and '.join(bad)} at step {step} (on_nonfinite='stop')"
      elif consecutive + 1 > max_consecutive_skips:
        stopped = (f"non-finite {' and '.join(bad)} at step {step} after {consecutive} skipped in "
                   f"a row (max_consecutive_skips={max_consecutive_skips})")
      elif skipped + 1 > max_skips:
        stopped = (f"non-finite {' and '.join(bad)} at step {step} after {skipped} skipped in all "
                   f"(max_skips={max_skips})")
      else:
        skipped, consecutive = skipped + 1, consecutive + 1
      emit(step, "nonfinite", bad=bad, loss=loss, grad_norm=grad_norm,
           action="stopped" if stopped else "skipped", consecutive=consecutive, total=skipped)
      if stopped:
        emit(step, "stopped", reason=stopped,
             last_checkpoint=(manager.path(max(manager.steps())) if manager is not None
                              and manager.steps() else None))
        break

    step += 1
    if manager is not None and (step % every == 0 or step == num_steps):
      path = manager.save(checkpoint.Checkpoint(
          params, opt_state, step, key,
          data_position={"step": step, "skipped": skipped, "consecutive_skipped": consecutive},
          config=config, metrics={"loss": loss, "grad_norm": grad_norm}))
      emit(step, "checkpoint", path=path)

  history = {"step": np.asarray(history["step"], np.int64),
             "loss": np.asarray(history["loss"], np.float64),
             "grad_norm": np.asarray(history["grad_norm"], np.float64),
             "finite": np.asarray(history["finite"], bool)}
  return FitResult(params, opt_state, step, history, events, stopped, skipped)
