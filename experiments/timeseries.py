"""Time-series forecasting: next-step and closed-loop multi-step forecasts of noisy sine mixtures
and the Mackey-Glass chaotic series, for each cell.

Data:
  sines   `jaxrnn.data.noisy_sines`: every sequence mixes two sines of random frequency (0.05-0.25
          cycles/step) and phase; inputs carry Gaussian noise (std 0.05), targets are the clean
          signal one step ahead. The model must infer each sequence's frequencies from its context.
  mackey  `jaxrnn.data.mackey_glass` (tau = 17, beta = 0.2, gamma = 0.1, n = 10; RK4 with dt = 0.1,
          one sample per time unit): training windows come from 64 trajectories, tests from other
          trajectories (other random initial histories); standardised with the training mean/std.

Training: teacher forcing, per-step MSE on windows of `--window` steps, Adam with a cosine-decayed
learning rate and global-norm clipping, on jaxrnn's manual BPTT.

Evaluation on held-out sequences, each a context of `--context` steps then `--horizon` more:
  one-step   teacher-forced next-step prediction over the whole sequence;
  closed     the model reads the context (`rnn.apply`), then forecasts `--horizon` steps by feeding
             each prediction back as the next input (`rnn.step` + `rnn.readout` in a `lax.scan`).
NRMSE = RMSE / std of the series (of the clean test signal), per horizon k = 1..horizon; 1.0 is the
error of predicting the mean. The persistence forecast (repeat the last observed value) is the
reference row.

Outputs, in a new run folder under `--out`: config.json, metrics.json (learning curves, NRMSE per
horizon, timings), results.md (the NRMSE table), curves.png, forecasts.png, nrmse.png.

Usage (from the repository root):
  python experiments/timeseries.py                  # the full run (~2 min on 2 CPU cores)
  python experiments/timeseries.py --quick          # every output in well under a minute
  python experiments/timeseries.py --cells gru --datasets mackey --steps 4000
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
  from experiments import common
except ImportError:  # run as a script: python experiments/timeseries.py
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
  from experiments import common

import jaxrnn
from jaxrnn import data, rnn

ExperimentError = common.ExperimentError
CELLS = ("elman", "elman_relu", "lstm", "gru")
DATASETS = ("sines", "mackey")
COLORS = {"elman": "tab:blue", "elman_relu": "tab:orange", "lstm": "tab:green", "gru": "tab:purple",
          "persistence": "gray"}
TABLE_HORIZONS = (1, 5, 10, 25, 50, 100)
MG_TRAIN_SERIES, MG_TEST_SERIES = 64, 128


class Dataset(NamedTuple):
  """A training sampler and a fixed test set for one series family.

  Attributes:
    name: "sines" or "mackey".
    batch: jitted `key -> (xs [B, W, 1], ys [B, W, 1])`, teacher-forcing windows.
    test_inputs: `[N, C + K, 1]` what the model reads (noisy for sines).
    test_truth: `[N, C + K, 1]` the clean next value at every step (`truth[:, t] = s_{t+1}`).
    std: standard deviation of the clean test series (the NRMSE denominator).
    scale: the standardisation `{"mean", "std"}` applied to the raw series, or None.
  """
  name: str
  batch: Callable[[jax.Array], tuple]
  test_inputs: jax.Array
  test_truth: jax.Array
  std: float
  scale: Optional[dict]


def make_dataset(name: str, key: jax.Array, args) -> Dataset:
  k_train, k_test = jax.random.split(key)
  total = args.context + args.horizon
  if name == "sines":
    batch = jax.jit(lambda k: data.noisy_sines(k, args.batch, args.window))
    test_inputs, test_truth = data.noisy_sines(k_test, args.test_size, total)
    return Dataset(name, batch, test_inputs, test_truth, float(jnp.std(test_truth)), None)

  train = data.mackey_glass(k_train, MG_TRAIN_SERIES, args.mg_length)
  mean, std = jnp.mean(train), jnp.std(train)
  train = (train - mean) / std                                          # [S, L]
  test = (data.mackey_glass(k_test, args.test_size, total + 1) - mean) / std
  window = args.window

  @jax.jit
  def batch(k):
    k_series, k_start = jax.random.split(k)
    rows = jax.random.randint(k_series, (args.batch,), 0, train.shape[0])
    starts = jax.random.randint(k_start, (args.batch,), 0, train.shape[1] - window)
    cut = jax.vmap(lambda r, s: jax.lax.dynamic_slice(train[r], (s,), (window + 1,)))
    windows = cut(rows, starts)[..., None]                              # [B, W + 1, 1]
    return windows[:, :-1], windows[:, 1:]

  test_truth = test[:, 1:, None]
  return Dataset(name, batch, test[:, :-1, None], test_truth, float(jnp.std(test_truth)),
                 {"mean": float(mean), "std": float(std)})


def make_forecaster(spec: rnn.RNN, horizon: int):
  """`forecast(params, context [N, C, 1]) -> [N, horizon, 1]`, predictions fed back step by step."""

  @jax.jit
  def forecast(params, context):
    hs, carry = rnn.apply(spec, params, context)               # read the whole context
    y0 = rnn.readout(spec, params, hs[:, -1])                  # [N, 1]: the forecast of step C + 1

    def body(state, _):
      carry, y = state
      carry, h = rnn.step(spec, params, carry, y)              # the prediction is the next input
      return (carry, rnn.readout(spec, params, h)), y

    _, ys = jax.lax.scan(body, (carry, y0), None, length=horizon)
    return jnp.swapaxes(ys, 0, 1)
  return forecast


def nrmse(pred, truth, std) -> np.ndarray:
  """Per-step NRMSE over the batch: `[N, K, 1], [N, K, 1] -> [K]`."""
  err = np.asarray(pred, np.float64) - np.asarray(truth, np.float64)
  return np.sqrt(np.mean(err[..., 0] ** 2, axis=0)) / std


def train_and_evaluate(ds: Dataset, cell: str, args, key: jax.Array) -> dict:
  spec = rnn.rnn(cell, 1, args.hidden, output_size=1)
  k_init, k_data = jax.random.split(key)
  params = rnn.init(k_init, spec)
  schedule = optax.cosine_decay_schedule(args.lr, args.steps, alpha=0.1)
  optimizer = optax.chain(optax.clip_by_global_norm(args.clip), optax.adam(schedule))

  def loss_fn(params, xs, ys):  # per-step MSE (rnn.loss is (1/B) sum_t 1/2 ||z_t - y_t||^2)
    return rnn.loss(spec, params, xs, ys, loss="mse") * 2.0 / xs.shape[1]

  step = jaxrnn.make_train_step(loss_fn, optimizer)
  opt_state = optimizer.init(params)
  curve, pending = [], []
  start = time.perf_counter()
  bar = common.progress(range(1, args.steps + 1), total=args.steps, desc=f"{ds.name} {cell}",
                        disable=args.no_progress)
  for i in bar:
    params, opt_state, m = step(params, opt_state, *ds.batch(jax.random.fold_in(k_data, i)))
    pending.append(m["loss"])
    if i % args.log_every == 0 or i == args.steps:
      curve.append([i, float(np.mean(jax.device_get(pending)))])
      pending = []
      if hasattr(bar, "set_postfix"):
        bar.set_postfix(mse=f"{curve[-1][1]:.5f}")
  train_s = time.perf_counter() - start

  c = args.context
  hs, _ = jax.jit(functools.partial(rnn.apply, spec))(params, ds.test_inputs)
  one_step = nrmse(rnn.readout(spec, params, hs), ds.test_truth, ds.std)
  closed = make_forecaster(spec, args.horizon)(params, ds.test_inputs[:, :c])
  truth = ds.test_truth[:, c - 1:c - 1 + args.horizon]       # s_{C+1} .. s_{C+K}
  return {"cell": cell, "dataset": ds.name, "curve": curve, "train_seconds": train_s,
          "one_step_nrmse": float(np.sqrt(np.mean(one_step ** 2))),
          "closed_loop_nrmse": nrmse(closed, truth, ds.std).tolist(),
          "example": {"forecast": np.asarray(closed[0, :, 0]).tolist()}}


def persistence(ds: Dataset, args) -> list[float]:
  c = args.context
  last = ds.test_inputs[:, c - 1:c]                           # the last observed value
  truth = ds.test_truth[:, c - 1:c - 1 + args.horizon]
  return nrmse(jnp.broadcast_to(last, truth.shape), truth, ds.std).tolist()


def table(results, baselines, datasets, cells, horizons) -> str:
  lines = []
  for name in datasets:
    lines += [f"**{name}** (NRMSE, closed loop; one-step = teacher-forced)", "",
              "| cell | one-step | " + " | ".join(f"k={h}" for h in horizons) + " |",
              "|---|---|" + "---|" * len(horizons)]
    rows = [(r["cell"], r["one_step_nrmse"], r["closed_loop_nrmse"]) for r in results
            if r["dataset"] == name]
    rows.append(("persistence", None, baselines[name]))
    for cell, one, curve in rows:
      one_s = "-" if one is None else f"{one:.4f}"
      lines.append(f"| {cell} | {one_s} | " + " | ".join(f"{curve[h - 1]:.4f}" for h in horizons)
                   + " |")
    lines.append("")
  return "\n".join(lines)


def parse_list(flag, text, choices):
  items = [v.strip() for v in text.split(",") if v.strip()]
  if not items:
    raise ExperimentError(f"{flag} must name at least one of {', '.join(choices)}")
  for v in items:
    common.check_choice(f"{flag} entry", v, choices)
  return items


def parse_args(argv):
  parser = common.base_parser(__doc__.splitlines()[0])
  parser.add_argument("--cells", default="elman,lstm,gru",
                      help=f"comma-separated subset of {','.join(CELLS)} (default elman,lstm,gru)")
  parser.add_argument("--datasets", default="sines,mackey", help="comma-separated: sines,mackey")
  parser.add_argument("--steps", type=int, default=2000, help="training steps per (dataset, cell)")
  parser.add_argument("--hidden", type=int, default=64, help="hidden units H")
  parser.add_argument("--batch", type=int, default=32, help="batch size")
  parser.add_argument("--window", type=int, default=100, help="training window length")
  parser.add_argument("--lr", type=float, default=3e-3,
                      help="peak Adam learning rate (cosine decay to a tenth)")
  parser.add_argument("--clip", type=float, default=1.0, help="global-norm gradient clipping")
  parser.add_argument("--context", type=int, default=100, help="steps read before forecasting")
  parser.add_argument("--horizon", type=int, default=100, help="closed-loop forecast steps")
  parser.add_argument("--test-size", type=int, default=128, help="held-out test sequences")
  parser.add_argument("--mg-length", type=int, default=2000,
                      help="samples per Mackey-Glass training trajectory")
  parser.add_argument("--log-every", type=int, default=25, help="steps per learning-curve point")
  args = parser.parse_args(argv)
  if args.quick:
    args.steps, args.hidden, args.test_size, args.mg_length = 150, 32, 32, 400
    args.window, args.context, args.horizon, args.log_every = 50, 50, 50, 10
  args.cells = parse_list("--cells", args.cells, CELLS)
  args.datasets = parse_list("--datasets", args.datasets, DATASETS)
  common.check_positive(steps=args.steps, hidden=args.hidden, batch=args.batch, window=args.window,
                        lr=args.lr, clip=args.clip, context=args.context, horizon=args.horizon,
                        test_size=args.test_size, log_every=args.log_every)
  if args.mg_length <= args.window + 1:
    raise ExperimentError(f"--mg-length must exceed --window + 1 = {args.window + 1}; got "
                          f"{args.mg_length}")
  return args


def plot_all(plt, results, baselines, datasets_obj, args, run_dir):
  names = [d.name for d in datasets_obj]
  # Learning curves.
  fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
  for ax, name in zip(axes[0], names):
    for r in results:
      if r["dataset"] == name:
        c = np.asarray(r["curve"])
        ax.plot(c[:, 0], c[:, 1], color=COLORS[r["cell"]], label=r["cell"])
    ax.set_yscale("log")
    ax.set_title(f"{name}: train MSE (teacher forcing)")
    ax.set_xlabel("step")
  axes[0][0].legend()
  common.save_figure(fig, run_dir / "curves.png")

  # Forecast vs truth for the first test sequence.
  c, k = args.context, args.horizon
  show = min(c, 60)
  fig, axes = plt.subplots(len(names), len(args.cells), figsize=(3.6 * len(args.cells),
                                                                 2.6 * len(names)), squeeze=False)
  for i, ds in enumerate(datasets_obj):
    inputs = np.asarray(ds.test_inputs[0, :, 0])
    truth = np.asarray(ds.test_truth[0, :, 0])
    for j, cell in enumerate(args.cells):
      ax = axes[i][j]
      r = next(r for r in results if r["dataset"] == ds.name and r["cell"] == cell)
      t_ctx = np.arange(c - show, c)
      ax.plot(t_ctx, inputs[c - show:c], color="0.6", lw=1, label="context (input)")
      ax.plot(np.arange(c, c + k), truth[c - 1:c - 1 + k], color="k", lw=1.2, label="truth")
      ax.plot(np.arange(c, c + k), r["example"]["forecast"], color=COLORS[cell], lw=1.2, ls="--",
              label="closed-loop forecast")
      ax.axvline(c - 0.5, color="0.8", lw=0.8)
      ax.set_title(f"{ds.name}, {cell}", fontsize=9)
      if i == len(names) - 1:
        ax.set_xlabel("t")
  axes[0][0].legend(fontsize=7, loc="lower left")
  common.save_figure(fig, run_dir / "forecasts.png")

  # NRMSE per horizon.
  fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
  ks = np.arange(1, k + 1)
  for ax, name in zip(axes[0], names):
    for r in results:
      if r["dataset"] == name:
        ax.plot(ks, r["closed_loop_nrmse"], color=COLORS[r["cell"]], label=r["cell"])
    ax.plot(ks, baselines[name], color=COLORS["persistence"], ls=":", label="persistence")
    ax.axhline(1.0, color="k", lw=0.6, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("horizon k (steps ahead)")
    ax.set_title(f"{name}: closed-loop NRMSE")
  axes[0][0].legend(fontsize=8)
  common.save_figure(fig, run_dir / "nrmse.png")


def main(argv=None) -> int:
  args = parse_args(argv)
  plt = common.plt()
  run_dir = common.make_run_dir(args.out, "timeseries")
  config = common.run_config(
      args, mackey_glass={"tau": 17, "beta": 0.2, "gamma": 0.1, "n": 10, "dt": 0.1,
                          "subsample": 10, "integrator": "RK4"})
  print(f"timeseries: {args.datasets} x {args.cells}, {args.steps} steps, H={args.hidden} -> "
        f"{run_dir}")
  key = jax.random.key(args.seed)
  start = time.perf_counter()
  datasets_obj = [make_dataset(name, jax.random.fold_in(key, i), args)
                  for i, name in enumerate(args.datasets)]
  config["series"] = {d.name: {"test_std": d.std, "normalisation": d.scale} for d in datasets_obj}
  common.write_json(run_dir / "config.json", config)
  baselines = {d.name: persistence(d, args) for d in datasets_obj}
  results = []
  for i, ds in enumerate(datasets_obj):
    for j, cell in enumerate(args.cells):
      r = train_and_evaluate(ds, cell, args, jax.random.fold_in(key, 100 * (i + 1) + j))
      results.append(r)
      if args.no_progress:
        print(f"  {ds.name} {cell}: one-step NRMSE {r['one_step_nrmse']:.4f}, closed-loop "
              f"k=1 {r['closed_loop_nrmse'][0]:.4f} k={args.horizon} "
              f"{r['closed_loop_nrmse'][-1]:.4f} [{r['train_seconds']:.0f} s]", flush=True)
      common.write_json(run_dir / "metrics.json", {"results": results, "complete": False})
  total_s = time.perf_counter() - start
  horizons = [h for h in TABLE_HORIZONS if h <= args.horizon]
  md = table(results, baselines, args.datasets, args.cells, horizons)
  plot_all(plt, results, baselines, datasets_obj, args, run_dir)
  common.write_json(run_dir / "metrics.json", {
      "results": results, "persistence_nrmse": baselines, "table_horizons": horizons,
      "complete": True, "total_seconds": total_s})
  (run_dir / "results.md").write_text(md)
  print(md)
  print(f"done in {total_s:.0f} s -> {run_dir}")
  return 0


if __name__ == "__main__":
  common.run_main(main)
