"""Long-range memory: the adding problem and the copy-memory task across cells and lengths.

Models (all one layer of `--hidden` units, trained with Adam on jaxrnn's manual BPTT, gradients
clipped by global norm `--clip`):
  tanh   Elman tanh RNN, PyTorch's default init, lr `--lr`
  irnn   Elman ReLU RNN with W = I, b = 0 (the IRNN of Le, Jaitly & Hinton 2015), lr `--irnn-lr`
  lstm   LSTM with forget-gate bias 1.0 (Jozefowicz et al. 2015), lr `--lr`
  gru    GRU, PyTorch's default init, lr `--lr`

Tasks:
  adding  two channels: values uniform in [0, 1] and a marker channel with two 1s (one in each
          half); the target, read at the last step, is the sum of the two marked values
          (Hochreiter & Schmidhuber 1997; Le et al. 2015). Metric: test MSE. Baseline: always
          predicting 1, MSE = Var(u1 + u2) = 1/6 ~ 0.167.
  copy    10 symbols from an alphabet of 8, `T` blank steps (the last one the delimiter), then the
          model must output the 10 symbols (Arjovsky et al. 2016). Metric: test cross-entropy per
          step (nats). Baseline: blanks then a uniform guess, 10 log 8 / (T + 20).

A model *solves* a task when its test metric is below 0.1 x the baseline (a 90% reduction of the
trivial solution's loss). A run that *diverges* (its test loss overflows: the IRNN is prone to this
at long T, where a small growth of W above I compounds over T steps; `make_train_step` then skips
every non-finite step) is reported as such, never as solved. Every (task, T, model) pair trains for the same `--steps` steps of batch
`--batch` from fresh data and is tested on `--test-size` held-out sequences.

Outputs, in a new run folder under `--out`: config.json, metrics.json (learning curves, test
metrics, baselines, solved flags, wall times), results.md (the table), adding_curves.png,
copy_curves.png and summary.png.

Usage (from the repository root):
  python experiments/memory.py                       # the full sweep (~15 min on 2 CPU cores)
  python experiments/memory.py --quick               # every output in well under a minute
  python experiments/memory.py --models lstm,irnn --adding-lengths 100,200 --copy-lengths none
"""
from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
  from experiments import common
except ImportError:  # run as a script: python experiments/memory.py
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
  from experiments import common

import jaxrnn
from jaxrnn import data, parallel, rnn

ExperimentError = common.ExperimentError
MODELS = ("tanh", "irnn", "lstm", "gru", "mingru")
DEFAULT_MODELS = ("tanh", "irnn", "lstm", "gru")
LABELS = {"tanh": "Elman tanh", "irnn": "IRNN (ReLU, W=I)", "lstm": "LSTM (forget bias 1)",
          "gru": "GRU", "mingru": "minGRU (linear)"}
COLORS = {"tanh": "tab:blue", "irnn": "tab:red", "lstm": "tab:green", "gru": "tab:purple",
          "mingru": "tab:brown"}
COPY_SYMBOLS, COPY_LENGTH = 8, 10
SOLVED_FRACTION = 0.1


class Task(NamedTuple):
  """One (task, T) pair: how to draw a batch, the loss, and the trivial baseline."""
  name: str                                   # "adding" or "copy"
  length: int                                 # T
  input_size: int
  output_size: int
  baseline: float
  metric: str
  batch: Callable[[jax.Array, int], tuple]    # (key, B) -> (xs [B, T', D], targets)


def adding_task(length: int) -> Task:
  return Task("adding", length, 2, 1, 1.0 / 6.0, "MSE",
              lambda key, b: data.adding_problem(key, b, length))


def copy_task(length: int) -> Task:
  def batch(key, b):
    inputs, targets = data.copy_memory(key, b, length, num_symbols=COPY_SYMBOLS,
                                       copy_length=COPY_LENGTH)
    return jax.nn.one_hot(inputs, COPY_SYMBOLS + 2, dtype=jnp.float32), targets
  baseline = COPY_LENGTH * math.log(COPY_SYMBOLS) / (length + 2 * COPY_LENGTH)
  return Task("copy", length, COPY_SYMBOLS + 2, COPY_SYMBOLS + 1, baseline, "xent/step", batch)


def make_spec(model: str, task: Task, hidden: int) -> rnn.RNN:
  cell = {"tanh": lambda: jaxrnn.cells.elman("tanh"), "irnn": lambda: jaxrnn.cells.elman("relu"),
          "lstm": lambda: jaxrnn.cells.lstm(forget_bias=1.0), "gru": jaxrnn.cells.gru,
          "mingru": jaxrnn.cells.mingru}[model]()
  return rnn.rnn(cell, task.input_size, hidden, output_size=task.output_size)


def init_params(model: str, spec: rnn.RNN, key: jax.Array) -> dict:
  params = rnn.init(key, spec)
  if model == "irnn":  # Le et al. (2015): recurrent weights the identity, biases zero
    layer = dict(params["layers"][0]["fwd"])
    layer["W"] = jnp.eye(spec.hidden_size, dtype=layer["W"].dtype)
    layer["b"] = jnp.zeros_like(layer["b"])
    params = {**params, "layers": [{"fwd": layer}]}
  return params


def make_loss(task: Task, spec: rnn.RNN):
  """`loss(params, xs, targets)`: the task metric itself (MSE, or cross-entropy per step)."""
  if task.name == "adding":
    def loss(params, xs, ys):
      hs, _ = rnn.apply(spec, params, xs)                  # manual BPTT (the default)
      z = rnn.readout(spec, params, hs[:, -1])             # the answer is read at the last step
      return jnp.mean(jnp.square(z - ys))
  else:
    def loss(params, xs, ys):
      return rnn.loss(spec, params, xs, ys, loss="xent") / xs.shape[1]
  return loss


def train_one(task: Task, model: str, args, key: jax.Array, batch_fn, test: tuple) -> dict:
  """Train one model on one task; return its curve, test metric and timings.

  `batch_fn(key) -> batch` is the task's jitted sampler (shared by the models: compiled once).
  """
  spec = make_spec(model, task, args.hidden)
  k_init, k_data = jax.random.split(key)
  params = init_params(model, spec, k_init)
  lr = args.irnn_lr if model == "irnn" else args.lr
  optimizer = optax.chain(optax.clip_by_global_norm(args.clip), optax.adam(lr))
  loss_fn = make_loss(task, spec)
  if args.devices:  # data-parallel: the batch split over a mesh of --devices devices
    step = parallel.make_sharded_train_step(loss_fn, optimizer, parallel.make_mesh(args.devices))
  else:
    step = jaxrnn.make_train_step(loss_fn, optimizer)
  eval_fn = jax.jit(loss_fn)
  opt_state = optimizer.init(params)
  test_start = float(eval_fn(params, *test))

  start = time.perf_counter()
  curve, pending, skipped = [], [], 0
  bar = common.progress(range(1, args.steps + 1), total=args.steps,
                        desc=f"{task.name} T={task.length} {model}", disable=args.no_progress)
  for i in bar:
    params, opt_state, m = step(params, opt_state, *batch_fn(jax.random.fold_in(k_data, i)))
    pending.append((m["loss"], m["finite"]))
    if i % args.log_every == 0 or i == args.steps:
      values = jax.device_get(pending)
      pending = []
      finite = [float(v) for v, ok in values if ok]
      skipped += sum(1 for _, ok in values if not ok)
      curve.append([i, float(np.mean(finite)) if finite else None])  # None: every step skipped
      if hasattr(bar, "set_postfix"):
        bar.set_postfix(loss=f"{curve[-1][1]:.4f}" if finite else "non-finite",
                        base=f"{task.baseline:.4f}")
  train_s = time.perf_counter() - start
  test_end = float(eval_fn(params, *test))
  # Diverged: the test loss overflows (make_train_step skips non-finite steps, so the params stay
  # finite, but they can reach a state where h_T overflows on every batch and nothing trains).
  diverged = not math.isfinite(test_end)
  return {"model": model, "task": task.name, "T": task.length, "lr": lr,
          "test_start": test_start if math.isfinite(test_start) else None,
          "test": None if diverged else test_end, "baseline": task.baseline,
          "ratio": None if diverged else test_end / task.baseline, "diverged": diverged,
          "solved": bool(not diverged and test_end < SOLVED_FRACTION * task.baseline),
          "curve": curve, "skipped_steps": skipped, "train_seconds": train_s,
          "ms_per_step": 1000 * train_s / args.steps}


def parse_lengths(flag: str, text: str) -> list[int]:
  if text.strip().lower() in ("", "none"):
    return []
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ExperimentError(f"{flag} must be comma-separated integers (or 'none'); got {text!r}")
  if any(v < 2 for v in values):
    raise ExperimentError(f"{flag} must hold lengths >= 2; got {text!r}")
  return values


def parse_args(argv):
  parser = common.base_parser(__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                      help=f"comma-separated subset of {','.join(MODELS)} "
                           f"(default: {','.join(DEFAULT_MODELS)})")
  parallel.add_devices_argument(parser)
  parser.add_argument("--adding-lengths", default="50,100,200,400",
                      help="sequence lengths T for the adding problem ('none' to skip)")
  parser.add_argument("--copy-lengths", default="10,50,100",
                      help="blank-gap lengths T for the copy task ('none' to skip)")
  parser.add_argument("--steps", type=int, default=2000, help="training steps per (task, T, model)")
  parser.add_argument("--hidden", type=int, default=64, help="hidden units H")
  parser.add_argument("--batch", type=int, default=50, help="batch size")
  parser.add_argument("--lr", type=float, default=3e-3, help="Adam lr for tanh, LSTM and GRU")
  parser.add_argument("--irnn-lr", type=float, default=3e-4, help="Adam lr for the IRNN")
  parser.add_argument("--clip", type=float, default=1.0, help="global-norm gradient clipping")
  parser.add_argument("--test-size", type=int, default=1000, help="held-out test sequences")
  parser.add_argument("--log-every", type=int, default=25, help="steps per learning-curve point")
  args = parser.parse_args(argv)
  if args.quick:
    args.adding_lengths, args.copy_lengths = "20", "10"
    args.steps, args.hidden, args.test_size, args.log_every = 150, 32, 200, 10
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  if not models:
    raise ExperimentError("--models must name at least one model")
  for m in models:
    common.check_choice("--models entry", m, MODELS)
  args.models = models
  args.adding_lengths = parse_lengths("--adding-lengths", args.adding_lengths)
  args.copy_lengths = parse_lengths("--copy-lengths", args.copy_lengths)
  if not args.adding_lengths and not args.copy_lengths:
    raise ExperimentError("nothing to run: --adding-lengths and --copy-lengths are both 'none'")
  common.check_positive(steps=args.steps, hidden=args.hidden, batch=args.batch, lr=args.lr,
                        irnn_lr=args.irnn_lr, clip=args.clip, test_size=args.test_size,
                        log_every=args.log_every)
  if args.devices is not None:
    common.check_positive(devices=args.devices)
    if args.batch % args.devices:
      raise ExperimentError(f"--batch {args.batch} must be a multiple of --devices {args.devices}")
    try:
      parallel.make_mesh(args.devices)
    except ValueError as err:
      raise ExperimentError(str(err)) from None
  return args


def results_table(results: list[dict], tasks: list[Task], models: list[str]) -> str:
  lines = ["| model | " + " | ".join(f"{t.name} T={t.length}" for t in tasks) + " |",
           "|---|" + "---|" * len(tasks),
           "| baseline | " + " | ".join(f"{t.baseline:.4f}" for t in tasks) + " |"]
  by_key = {(r["model"], r["task"], r["T"]): r for r in results}
  for m in models:
    cells = []
    for t in tasks:
      r = by_key[(m, t.name, t.length)]
      cells.append(f"diverged ({r['skipped_steps']} steps non-finite)" if r["diverged"] else
                   f"{r['test']:.4f}" + (" **solved**" if r["solved"] else ""))
    lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_curves(plt, results, tasks, models, path, title):
  fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.2), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for r in results:
      if r["task"] == task.name and r["T"] == task.length:
        c = np.array([[i, np.nan if v is None else v] for i, v in r["curve"]], float)
        note = " (solved)" if r["solved"] else " (diverged)" if r["diverged"] else ""
        ax.plot(c[:, 0], c[:, 1], color=COLORS[r["model"]], lw=1.2, label=LABELS[r["model"]] + note)
    ax.axhline(task.baseline, color="k", ls="--", lw=1, label="baseline")
    ax.axhline(SOLVED_FRACTION * task.baseline, color="gray", ls=":", lw=1, label="solved below")
    ax.set_yscale("log")
    ax.set_ylim(top=10 * task.baseline)  # loss spikes (IRNN) leave the frame instead of squashing it
    ax.set_title(f"{task.name}, T={task.length}")
    ax.set_xlabel("training step")
  axes[0][0].set_ylabel(f"train {tasks[0].metric}")
  axes[0][0].legend(fontsize=7)
  fig.suptitle(title + " (axes cut at 10 x baseline)")
  common.save_figure(fig, path)


def plot_summary(plt, results, tasks, models, path):
  ratio = np.array([[next(r["ratio"] for r in results if r["model"] == m and r["task"] == t.name
                          and r["T"] == t.length) for t in tasks] for m in models], float)
  fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2.5, 0.6 * len(models) + 1.6))
  cmap = plt.get_cmap("RdYlGn_r").copy()
  cmap.set_bad("0.6")                                   # diverged runs (ratio None -> NaN)
  im = ax.imshow(np.log10(np.clip(ratio, 1e-4, 10)), cmap=cmap, vmin=-3, vmax=0.5, aspect="auto")
  ax.set_xticks(range(len(tasks)), [f"{t.name}\nT={t.length}" for t in tasks], fontsize=8)
  ax.set_yticks(range(len(models)), [LABELS[m] for m in models], fontsize=8)
  for i in range(len(models)):
    for j in range(len(tasks)):
      mark = "\nsolved" if ratio[i, j] < SOLVED_FRACTION else ""
      text = "diverged" if np.isnan(ratio[i, j]) else f"{ratio[i, j]:.3g}{mark}"
      ax.text(j, i, text, ha="center", va="center", fontsize=7)
  fig.colorbar(im, ax=ax, label="log10(test / baseline)")
  ax.set_title(f"test metric / baseline (solved: < {SOLVED_FRACTION})", fontsize=9)
  common.save_figure(fig, path)


def main(argv=None) -> int:
  args = parse_args(argv)
  plt = common.plt()
  run_dir = common.make_run_dir(args.out, "memory")
  tasks = [adding_task(t) for t in args.adding_lengths] + [copy_task(t) for t in args.copy_lengths]
  config = common.run_config(
      args, solved_criterion=f"test metric < {SOLVED_FRACTION} x baseline")
  common.write_json(run_dir / "config.json", config)
  print(f"memory: {len(tasks)} task lengths x {len(args.models)} models, {args.steps} steps each, "
        f"H={args.hidden}, B={args.batch} -> {run_dir}")

  key = jax.random.key(args.seed)
  results, start = [], time.perf_counter()
  for ti, task in enumerate(tasks):
    k_task = jax.random.fold_in(key, ti)
    test = task.batch(jax.random.fold_in(k_task, 10**6), args.test_size)  # shared by all models
    batch_fn = jax.jit(functools.partial(task.batch, b=args.batch))
    for mi, model in enumerate(args.models):
      r = train_one(task, model, args, jax.random.fold_in(k_task, mi), batch_fn, test)
      results.append(r)
      if args.no_progress:
        shown = "diverged" if r["diverged"] else f"{r['test']:.4f}"
        print(f"  {task.name} T={task.length} {model}: test {task.metric} {shown} "
              f"(baseline {task.baseline:.4f}){' solved' if r['solved'] else ''} "
              f"[{r['train_seconds']:.0f} s]", flush=True)
      common.write_json(run_dir / "metrics.json", {"results": results, "complete": False})
  total_s = time.perf_counter() - start

  table = results_table(results, tasks, args.models)
  adding = [t for t in tasks if t.name == "adding"]
  copy = [t for t in tasks if t.name == "copy"]
  if adding:
    plot_curves(plt, results, adding, args.models, run_dir / "adding_curves.png",
                "adding problem: train MSE (baseline 1/6)")
  if copy:
    plot_curves(plt, results, copy, args.models, run_dir / "copy_curves.png",
                "copy memory: train cross-entropy per step")
  plot_summary(plt, results, tasks, args.models, run_dir / "summary.png")
  solved = {m: [f"{r['task']} T={r['T']}" for r in results if r["model"] == m and r["solved"]]
            for m in args.models}
  common.write_json(run_dir / "metrics.json", {
      "results": results, "complete": True, "total_seconds": total_s, "solved": solved,
      "solved_criterion": f"test metric < {SOLVED_FRACTION} x baseline"})
  (run_dir / "results.md").write_text(
      f"Test metric (adding: MSE; copy: cross-entropy per step, nats); **solved** = below "
      f"{SOLVED_FRACTION} x baseline. {args.steps} steps, H={args.hidden}, B={args.batch}.\n\n"
      + table + "\n")
  print(table)
  for m in args.models:
    print(f"{LABELS[m]} solves: {', '.join(solved[m]) or 'nothing'}")
  print(f"done in {total_s:.0f} s -> {run_dir}")
  return 0


if __name__ == "__main__":
  common.run_main(main)
