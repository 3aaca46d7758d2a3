"""Gradient flow through time: vanishing and exploding gradients, Jacobian spectra, and clipping.

For each model, untrained and after training on the adding problem (loss on the last step only,
`L_T = (1/B) sum_b 1/2 (z_T - y)^2` with `z_T = V h_T + c`), this measures

  * ||dL_T/dh_t|| against the distance T - t (mean over a batch of test sequences), computed with
    jaxrnn's manual BPTT engine (`jaxrnn.backward.recurrent_scan_bwd`) and cross-checked against
    `jax.grad` of the loss with respect to a perturbation added to every h_t (the run fails if the
    two disagree beyond 1e-8 relative error, in float64);
  * the spectral radius of the one-step state Jacobian d carry_t / d carry_{t-1} along those
    sequences (for the LSTM the state is (h, c), the pair through which gradients flow), via
    `jax.jacfwd` of `jaxrnn.rnn.step`;
  * the per-step growth factor of the gradient norm, exp(slope of log ||dL_T/dh_t|| vs T - t):
    below 1 vanishing, above 1 exploding.

Models: Elman tanh and Elman ReLU with W = s * Q (Q a random orthogonal matrix, so the spectral
radius of W is exactly s; b = 0) for each s in `--scales` (default 0.5, 1.0, 1.5: below, at and
above 1), the LSTM (forget-gate bias 1) and the GRU (PyTorch's init).

Clipping: an Elman net at an exploding init (`--explode-cell`, `--explode-scale`) is trained with
plain SGD with and without `optax.clip_by_global_norm(--clip)`, same data and seed; the loss and the
(pre-clipping) gradient norm are recorded at every step. No step is skipped on non-finite values
(`skip_nonfinite=False`), so a divergence shows as it happens.

How dL_T/dh_t comes out of the manual engine: the engine's reverse scan carries dL/dcarry_t but only
returns the per-step deltas dL/da_t and dL/dcarry_0. For every start t, the suffix of the sequence
(steps t+1..T, padded at the end with masked steps, which copy the carry through) is run from
carry_t, and `recurrent_scan_bwd` with cotangent dL_T/dh_T on the final carry returns
dL_T/dcarry_t as its `d_carry0`. This is exact for every cell (the GRU's direct path through z_t
included); it costs T backward passes instead of one.

Outputs, in a new run folder under `--out`: config.json, metrics.json (norm curves, spectral radii,
growth factors, cross-check errors, training and clipping curves), results.md, gradnorm.png,
spectral.png, clipping.png.

Usage (from the repository root):
  python experiments/gradflow.py                 # the full run (~3 min on 2 idle CPU cores)
  python experiments/gradflow.py --quick         # every output in well under a minute
  python experiments/gradflow.py --scales 0.9,1.0,1.1 --length 200
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

try:
  from experiments import common
except ImportError:  # run as a script: python experiments/gradflow.py
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
  from experiments import common

import jaxrnn
from jaxrnn import backward, cells, data, losses, rnn, scan

ExperimentError = common.ExperimentError
CELLS = ("tanh", "relu", "lstm", "gru")
CROSS_CHECK_TOL = 1e-8


class Model(NamedTuple):
  name: str          # e.g. "tanh s=1.5"
  cell: str          # "tanh", "relu", "lstm", "gru"
  scale: float       # s for the Elman nets (spectral radius of W); None for gated cells


def models_for(cell_names, scales) -> list[Model]:
  out = []
  for c in cell_names:
    if c in ("tanh", "relu"):
      out += [Model(f"{c} s={s:g}", c, s) for s in scales]
    else:
      out.append(Model(c, c, None))
  return out


def make_spec(model: Model, hidden: int) -> rnn.RNN:
  cell = {"tanh": lambda: cells.elman("tanh"), "relu": lambda: cells.elman("relu"),
          "lstm": lambda: cells.lstm(forget_bias=1.0), "gru": cells.gru}[model.cell]()
  return rnn.rnn(cell, 2, hidden, output_size=1)


def init_params(model: Model, spec: rnn.RNN, key: jax.Array) -> dict:
  k_init, k_w = jax.random.split(key)
  params = rnn.init(k_init, spec)
  if model.scale is not None:
    layer = dict(params["layers"][0]["fwd"])
    h = spec.hidden_size
    layer["W"] = model.scale * jax.nn.initializers.orthogonal()(k_w, (h, h), layer["W"].dtype)
    layer["b"] = jnp.zeros_like(layer["b"])
    params = {**params, "layers": [{"fwd": layer}]}
  return params


def last_step_loss(spec):
  """`L_T(params, xs [B, T, 2], ys [B, 1])`: the library's MSE on the last step's readout."""
  def loss(params, xs, ys):
    hs, _ = rnn.apply(spec, params, xs)                               # manual BPTT
    z = rnn.readout(spec, params, hs[:, -1:])                         # [B, 1, 1]
    return losses.total_loss(z, ys[:, None], "mse")
  return loss


# ---------------------------------------------------------------------------------------------
# dL_T/dh_t, two ways.

def manual_state_grads(spec: rnn.RNN, params: dict, xs: jax.Array, ys: jax.Array) -> jax.Array:
  """dL_T/dcarry_t for t = 0..T via the manual BPTT engine: `[T + 1, P, B, H]`.

  `P` is the number of carry parts (1, or 2 for the LSTM's (h, c)); part 0 is dL_T/dh_t. For each
  t < T, the suffix run from carry_t (padded with masked steps) is differentiated by
  `jaxrnn.backward.recurrent_scan_bwd`, whose `d_carry0` is dL_T/dcarry_t.
  """
  cell, p = spec.cell, params["layers"][0]["fwd"]
  b, t_len = xs.shape[0], xs.shape[1]
  a = scan.project(p, xs)                                               # [T, B, G]
  carry0 = cells.zeros_carry(cell, (b,), spec.hidden_size, a.dtype)
  hs, carry_T, saved = scan.recurrent_scan(cell, p, a, carry0)
  z_T = rnn.readout(spec, params, hs[-1])                               # [B, 1]
  d_z = losses.logits_grad(z_T, ys, "mse") / b                          # dL_T/dz_T
  d_h_T = d_z @ params["V"]                                             # [B, H]
  d_carry_T = (d_h_T,) + tuple(jnp.zeros_like(c) for c in carry_T[1:])
  carries = tuple(jnp.concatenate([c0[None], cs], axis=0)               # carry_t, t = 0..T
                  for c0, cs in zip(carry0, saved.carries))
  steps = jnp.arange(t_len)

  def from_start(t):
    a_suffix = jnp.take(a, jnp.minimum(steps + t, t_len - 1), axis=0)   # a_{t+1}.., then padding
    mask = jnp.broadcast_to((steps < t_len - t)[:, None], (t_len, b))   # padding steps: masked
    start = tuple(c[t] for c in carries)
    _, _, saved_s = scan.recurrent_scan(cell, p, a_suffix, start, mask)
    _, _, d_start = backward.recurrent_scan_bwd(cell, p, a_suffix, start, mask, saved_s,
                                                jnp.zeros_like(hs), d_carry_T)
    return jnp.stack(d_start)                                           # [P, B, H]

  d_carry = jax.lax.map(from_start, steps)                              # [T, P, B, H], t < T
  return jnp.concatenate([d_carry, jnp.stack(d_carry_T)[None]], axis=0)


def autodiff_state_grads(spec: rnn.RNN, params: dict, xs: jax.Array, ys: jax.Array) -> jax.Array:
  """dL_T/dcarry_t for t = 0..T by `jax.grad` w.r.t. a perturbation `eps_t` added to every carry_t.

  Returns `[T + 1, P, B, H]` like `manual_state_grads` (part 0: h_t; for the LSTM part 1: c_t).
  """
  b = xs.shape[0]
  carry0 = rnn.initial_carry(spec, params, (b,), xs.dtype)
  parts = spec.cell.carry_size

  def add_to_h(carry, e):                              # carry [1, B, H] or (h, c) of those
    if isinstance(carry, tuple):
      return tuple(c + e[j][None] for j, c in enumerate(carry))
    return carry + e[0][None]

  def loss_of(eps):                                    # eps [T + 1, P, B, H]
    def body(carry, inputs):
      x_t, e_t = inputs
      carry, _ = rnn.step(spec, params, carry, x_t)
      return add_to_h(carry, e_t), None
    carry_T, _ = jax.lax.scan(body, add_to_h(carry0, eps[0]), (jnp.swapaxes(xs, 0, 1), eps[1:]))
    h_T = (carry_T[0] if isinstance(carry_T, tuple) else carry_T)[-1]
    z = rnn.readout(spec, params, h_T)
    return losses.total_loss(z[:, None], ys[:, None], "mse")

  eps = jnp.zeros((xs.shape[1] + 1, parts, b, spec.hidden_size), xs.dtype)
  return jax.grad(loss_of)(eps)


def jacobian_radii(spec: rnn.RNN, params: dict, xs: jax.Array) -> jax.Array:
  """The one-step Jacobians d carry_t / d carry_{t-1} along every sequence: `[B, T, n, n]`.

  `n = P * H` (the LSTM's state is (h, c)); their spectral radii are taken in NumPy.
  """
  carry0 = rnn.initial_carry(spec, params, (), xs.dtype)          # unbatched: [1, H] (or pair)
  _, unravel = ravel_pytree(carry0)

  def one_sequence(x_seq):
    def body(carry, x_t):
      new, _ = rnn.step(spec, params, carry, x_t)
      jac = jax.jacfwd(lambda f: ravel_pytree(rnn.step(spec, params, unravel(f), x_t)[0])[0])(
          ravel_pytree(carry)[0])
      return new, jac
    _, jacs = jax.lax.scan(body, carry0, x_seq)
    return jacs                                                     # [T, n, n]

  return jax.vmap(one_sequence)(xs)


# ---------------------------------------------------------------------------------------------

def norm_stats(grads: np.ndarray) -> dict:
  """Summaries of dL_T/dcarry_t `[T + 1, P, B, H]`, indexed by k = T - t (norms of the h part)."""
  per = np.linalg.norm(grads[:, 0], axis=-1)[::-1]                 # [T + 1, B], k = 0..T
  mean = per.mean(axis=1)
  full = np.sqrt(np.sum(grads ** 2, axis=(1, 3)))[::-1].mean(axis=1)   # ||dL/d(h, c)||
  ks = np.arange(len(mean))
  ok = mean > 0
  slope = np.polyfit(ks[ok], np.log(mean[ok]), 1)[0] if ok.sum() > 2 else float("nan")
  out = {"norm_by_distance": mean.tolist(), "relative_norm": (mean / mean[0]).tolist(),
         "growth_per_step": float(np.exp(slope)), "ratio_T": float(mean[-1] / mean[0])}
  if grads.shape[1] > 1:
    out["carry_relative_norm"] = (full / full[0]).tolist()
  return out


def cross_check_error(manual: np.ndarray, auto: np.ndarray) -> float:
  """max over t of ||manual_t - auto_t|| / ||auto_t|| (steps with a zero gradient: absolute)."""
  num = np.linalg.norm((manual - auto).reshape(len(auto), -1), axis=1)
  den = np.linalg.norm(auto.reshape(len(auto), -1), axis=1)
  return float(np.max(np.where(den > 0, num / np.where(den > 0, den, 1), num)))


def measure(spec, params, xs, ys, fns) -> dict:
  """All the measurements for one model state, in float64."""
  manual_fn, auto_fn, jac_fn = fns
  p64 = jax.tree.map(lambda v: v.astype(jnp.float64), params)
  manual = np.asarray(manual_fn(p64, xs, ys))
  auto = np.asarray(auto_fn(p64, xs, ys))
  jacs = np.asarray(jac_fn(p64, xs[: min(8, xs.shape[0])]))       # [b, T, n, n]
  radii = np.max(np.abs(np.linalg.eigvals(jacs)), axis=-1)        # [b, T]
  out = norm_stats(manual)
  out.update(cross_check_rel_err=cross_check_error(manual, auto),
             jacobian_radius_mean=float(radii.mean()),
             jacobian_radius_median=float(np.median(radii)),
             jacobian_radius_max=float(radii.max()),
             jacobian_radius_by_step=radii.mean(axis=0).tolist())
  w = p64["layers"][0]["fwd"]["W"]
  if w.shape[0] == w.shape[1]:
    out["W_radius"] = float(np.max(np.abs(np.linalg.eigvals(np.asarray(w)))))
  return out


def train(params, loss_fn, optimizer, batch_fn, steps, key, desc, args, skip_nonfinite=True):
  """Train with `jaxrnn.make_train_step`; return params and per-step (loss, grad_norm) records."""
  step = jaxrnn.make_train_step(loss_fn, optimizer, skip_nonfinite=skip_nonfinite)
  opt_state = optimizer.init(params)
  history, pending = [], []
  bar = common.progress(range(1, steps + 1), total=steps, desc=desc, disable=args.no_progress)
  for i in bar:
    params, opt_state, m = step(params, opt_state, *batch_fn(jax.random.fold_in(key, i)))
    pending.append((m["loss"], m["grad_norm"]))
    if i % 25 == 0 or i == steps:
      history += [(float(l), float(g)) for l, g in jax.device_get(pending)]
      pending = []
      if hasattr(bar, "set_postfix"):
        recent = [l for l, _ in history[-25:] if np.isfinite(l)]
        bar.set_postfix(loss=f"{np.mean(recent):.4f}" if recent else "nan")
  return params, history


def smooth(values, window):
  v = np.asarray(values, np.float64)
  out = []
  for i in range(0, len(v), window):
    chunk = v[i:i + window]
    out.append(float(np.mean(chunk)) if np.all(np.isfinite(chunk)) else float("nan"))
  return out


def parse_args(argv):
  parser = common.base_parser(__doc__.splitlines()[0])
  parser.add_argument("--cells", default=",".join(CELLS),
                      help=f"comma-separated subset of {','.join(CELLS)} (tanh/relu: Elman)")
  parser.add_argument("--scales", default="0.5,1.0,1.5",
                      help="spectral radii s of the Elman W = s * orthogonal")
  parser.add_argument("--length", type=int, default=100, help="sequence length T")
  parser.add_argument("--hidden", type=int, default=64, help="hidden units H")
  parser.add_argument("--batch", type=int, default=50, help="training batch size")
  parser.add_argument("--measure-batch", type=int, default=32,
                      help="test sequences the gradient norms are averaged over")
  parser.add_argument("--train-steps", type=int, default=2000,
                      help="Adam steps on the adding problem for the 'trained' models")
  parser.add_argument("--test-size", type=int, default=1000,
                      help="held-out sequences for the trained models' test MSE")
  parser.add_argument("--lr", type=float, default=3e-3, help="Adam lr (tanh, LSTM, GRU)")
  parser.add_argument("--relu-lr", type=float, default=3e-4, help="Adam lr for the ReLU nets")
  parser.add_argument("--clip", type=float, default=1.0, help="global-norm clipping threshold")
  parser.add_argument("--explode-cell", default="tanh",
                      help="tanh or relu: the Elman net of the clipping study")
  parser.add_argument("--explode-scale", type=float, default=1.5,
                      help="spectral radius of W in the clipping study")
  parser.add_argument("--sgd-lr", type=float, default=0.05, help="SGD lr in the clipping study")
  parser.add_argument("--clip-steps", type=int, default=600, help="steps in the clipping study")
  args = parser.parse_args(argv)
  if args.quick:
    args.length, args.hidden, args.measure_batch, args.scales = 30, 32, 8, "0.5,1.5"
    args.test_size = 200
    args.train_steps, args.clip_steps = 80, 80
  args.cells = [c.strip() for c in args.cells.split(",") if c.strip()]
  if not args.cells:
    raise ExperimentError(f"--cells must name at least one of {', '.join(CELLS)}")
  for c in args.cells:
    common.check_choice("--cells entry", c, CELLS)
  try:
    args.scales = [float(s) for s in args.scales.split(",") if s.strip()]
  except ValueError:
    raise ExperimentError(f"--scales must be comma-separated numbers; got {args.scales!r}")
  if not args.scales or any(s <= 0 for s in args.scales):
    raise ExperimentError(f"--scales must be positive numbers; got {args.scales}")
  common.check_choice("--explode-cell", args.explode_cell, ("tanh", "relu"))
  common.check_positive(length=args.length, hidden=args.hidden, batch=args.batch,
                        measure_batch=args.measure_batch, train_steps=args.train_steps,
                        test_size=args.test_size,
                        lr=args.lr, relu_lr=args.relu_lr, clip=args.clip,
                        explode_scale=args.explode_scale, sgd_lr=args.sgd_lr,
                        clip_steps=args.clip_steps)
  if args.length < 2:
    raise ExperimentError(f"--length must be >= 2 (the adding problem has two markers); got "
                          f"{args.length}")
  return args


STYLE = {"tanh": ("Blues", "-"), "relu": ("Reds", "--")}


def color_of(model: Model, scales):
  import matplotlib
  if model.scale is None:
    return {"lstm": "tab:green", "gru": "tab:purple"}[model.cell], "-"
  cmap, ls = STYLE[model.cell]
  rank = sorted(scales).index(model.scale)
  return matplotlib.colormaps[cmap](0.45 + 0.55 * rank / max(1, len(scales) - 1)), ls


def plot_norms(plt, models, results, scales, path):
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, state in zip(axes, ("untrained", "trained")):
    for m in models:
      r = results[m.name][state]
      rel = np.asarray(r["relative_norm"])
      color, ls = color_of(m, scales)
      ax.plot(np.arange(len(rel)), np.where(rel > 0, rel, np.nan), color=color, ls=ls, lw=1.5,
              label=f"{m.name} (x{r['growth_per_step']:.3f}/step)")
      if "carry_relative_norm" in r:      # the LSTM's gradient also flows through c_t
        ax.plot(np.arange(len(rel)), r["carry_relative_norm"], color=color, ls=":", lw=1.5,
                label=f"{m.name}: ||dL_T/d(h_t, c_t)||")
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xlabel("T - t (steps back from the loss)")
    ax.set_title(f"{state}")
    ax.legend(fontsize=7, loc="best")
  axes[0].set_ylabel("||dL_T/dh_t|| / ||dL_T/dh_T||")
  fig.suptitle("gradient flow through time (adding problem, loss on the last step)")
  common.save_figure(fig, path)


def plot_spectral(plt, models, results, scales, path):
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(models) + 2), 3.6))
  x = np.arange(len(models))
  for off, state, hatch in ((-0.2, "untrained", ""), (0.2, "trained", "//")):
    vals = [results[m.name][state]["jacobian_radius_mean"] for m in models]
    ax.bar(x + off, vals, width=0.38, color=[color_of(m, scales)[0] for m in models],
           hatch=hatch, edgecolor="k", label=state)
  ax.axhline(1.0, color="k", ls="--", lw=1)
  ax.set_xticks(x, [m.name for m in models], rotation=30, fontsize=8)
  ax.set_ylabel("mean rho(d carry_t / d carry_{t-1})")
  ax.set_yscale("log")
  ax.legend(fontsize=8)
  ax.set_title("one-step Jacobian spectral radius (plain: untrained, hatched: trained)", fontsize=9)
  common.save_figure(fig, path)


def plot_clipping(plt, clipping, args, path):
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  names = ("no clipping", f"clip_by_global_norm({args.clip:g})")
  for name, color in zip(names, ("tab:red", "tab:blue")):
    hist = np.asarray(clipping[name]["history"], np.float64)
    steps = np.arange(1, len(hist) + 1)
    axes[0].plot(steps, 2 * hist[:, 0], color=color, lw=1, label=name)   # 2 x (1/2 MSE) = MSE
    axes[1].plot(steps, hist[:, 1], color=color, lw=0.8, label=name)
  axes[0].axhline(1 / 6, color="k", ls="--", lw=1, label="baseline: predict 1 (MSE 1/6)")
  axes[0].set_yscale("log")
  axes[0].set_ylabel("train MSE (last step)")
  axes[1].set_yscale("log")
  axes[1].set_ylabel("gradient global norm (before clipping)")
  for ax in axes:
    ax.set_xlabel("SGD step")
    ax.legend(fontsize=8)
  fig.suptitle(f"Elman {args.explode_cell}, W = {args.explode_scale:g} * orthogonal, "
               f"SGD lr {args.sgd_lr:g}, adding T={args.length}", fontsize=10)
  common.save_figure(fig, path)


def main(argv=None) -> int:
  args = parse_args(argv)
  plt = common.plt()
  run_dir = common.make_run_dir(args.out, "gradflow")
  config = common.run_config(args, cross_check_tolerance=CROSS_CHECK_TOL)
  common.write_json(run_dir / "config.json", config)
  models = models_for(args.cells, args.scales)
  print(f"gradflow: {len(models)} models, T={args.length}, H={args.hidden} -> {run_dir}")
  key = jax.random.key(args.seed)
  k_models, k_measure, k_clip, k_test = jax.random.split(key, 4)
  batch_fn = jax.jit(lambda k: data.adding_problem(k, args.batch, args.length))
  xs_m, ys_m = data.adding_problem(k_measure, args.measure_batch, args.length)
  test = data.adding_problem(k_test, args.test_size, args.length)
  start = time.perf_counter()

  results, worst = {}, 0.0
  for i, model in enumerate(models):
    spec = make_spec(model, args.hidden)
    k_init, k_train = jax.random.split(jax.random.fold_in(k_models, i))
    params = init_params(model, spec, k_init)
    loss_fn = last_step_loss(spec)
    lr = args.relu_lr if model.cell == "relu" else args.lr
    optimizer = optax.chain(optax.clip_by_global_norm(args.clip), optax.adam(lr))
    trained, history = train(params, loss_fn, optimizer, batch_fn, args.train_steps, k_train,
                             f"train {model.name}", args)
    with jax.enable_x64(True):
      fns = (jax.jit(lambda p, x, y: manual_state_grads(spec, p, x, y)),
             jax.jit(lambda p, x, y: autodiff_state_grads(spec, p, x, y)),
             jax.jit(lambda p, x: jacobian_radii(spec, p, x)))
      xs64, ys64 = xs_m.astype(jnp.float64), ys_m.astype(jnp.float64)
      entry = {"untrained": measure(spec, params, xs64, ys64, fns),
               "trained": measure(spec, trained, xs64, ys64, fns)}
    test_loss = float(jax.jit(loss_fn)(trained, *test))
    entry["train"] = {"lr": lr, "loss_curve": smooth([h[0] for h in history], 25),
                      "test_mse": 2 * test_loss}
    results[model.name] = entry
    worst = max(worst, entry["untrained"]["cross_check_rel_err"],
                entry["trained"]["cross_check_rel_err"])
    u, t = entry["untrained"], entry["trained"]
    print(f"  {model.name:10s} growth/step {u['growth_per_step']:.3f} -> {t['growth_per_step']:.3f}"
          f"  rho(J) {u['jacobian_radius_mean']:.3f} -> {t['jacobian_radius_mean']:.3f}"
          f"  test MSE {entry['train']['test_mse']:.4f}"
          f"  manual vs autodiff {max(u['cross_check_rel_err'], t['cross_check_rel_err']):.1e}",
          flush=True)

  # Clipping study: same init, data and seed; only the clipping differs.
  clip_model = Model(f"{args.explode_cell} s={args.explode_scale:g}", args.explode_cell,
                     args.explode_scale)
  spec = make_spec(clip_model, args.hidden)
  k_init, k_train = jax.random.split(k_clip)
  params0 = init_params(clip_model, spec, k_init)
  loss_fn = last_step_loss(spec)
  clipping = {}
  for name, opt in (("no clipping", optax.sgd(args.sgd_lr)),
                    (f"clip_by_global_norm({args.clip:g})",
                     optax.chain(optax.clip_by_global_norm(args.clip), optax.sgd(args.sgd_lr)))):
    trained, history = train(params0, loss_fn, opt, batch_fn, args.clip_steps, k_train,
                             f"SGD {name}", args, skip_nonfinite=False)
    losses_ = np.asarray([h[0] for h in history])
    bad = np.flatnonzero(~np.isfinite(losses_))
    test_loss = float(jax.jit(loss_fn)(trained, *test))
    clipping[name] = {"history": history,
                      "first_nonfinite_step": int(bad[0]) + 1 if bad.size else None,
                      "max_grad_norm": float(np.nanmax([h[1] for h in history])),
                      "final_mse": 2 * float(np.mean(losses_[-25:])), "test_mse": 2 * test_loss}
  total_s = time.perf_counter() - start

  plot_norms(plt, models, results, args.scales, run_dir / "gradnorm.png")
  plot_spectral(plt, models, results, args.scales, run_dir / "spectral.png")
  plot_clipping(plt, clipping, args, run_dir / "clipping.png")
  cross_ok = worst < CROSS_CHECK_TOL
  summary = {"models": results, "clipping": clipping, "total_seconds": total_s, "complete": True,
             "cross_check": {"max_rel_err": worst, "tolerance": CROSS_CHECK_TOL, "dtype": "float64",
                             "passed": bool(cross_ok)}}
  common.write_json(run_dir / "metrics.json", summary)

  lines = ["| model | W radius | rho(J) untrained | rho(J) trained | growth/step untrained | "
           "growth/step trained | ||dL/dh_0|| / ||dL/dh_T|| untrained | trained | test MSE |",
           "|---|---|---|---|---|---|---|---|---|"]
  for m in models:
    u, t = results[m.name]["untrained"], results[m.name]["trained"]
    lines.append(f"| {m.name} | {u.get('W_radius', float('nan')):.2f} | "
                 f"{u['jacobian_radius_mean']:.3f} | {t['jacobian_radius_mean']:.3f} | "
                 f"{u['growth_per_step']:.3f} | {t['growth_per_step']:.3f} | {u['ratio_T']:.2e} | "
                 f"{t['ratio_T']:.2e} | {results[m.name]['train']['test_mse']:.4f} |")
  lines += ["", "| clipping study | first non-finite step | max grad norm | final train MSE | "
            "test MSE |", "|---|---|---|---|---|"]
  for name, c in clipping.items():
    lines.append(f"| {name} | {c['first_nonfinite_step'] or '-'} | {c['max_grad_norm']:.3g} | "
                 f"{c['final_mse']:.4g} | {c['test_mse']:.4g} |")
  lines.append(f"\nmanual BPTT vs jax.grad (float64): max relative error {worst:.1e} "
               f"({'passed' if cross_ok else 'FAILED'}, tolerance {CROSS_CHECK_TOL:g})")
  md = "\n".join(lines) + "\n"
  (run_dir / "results.md").write_text(md)
  print(md)
  print(f"done in {total_s:.0f} s -> {run_dir}")
  if not cross_ok:
    raise ExperimentError(f"manual dL_T/dh_t disagrees with jax.grad: relative error {worst:.2e} "
                          f">= {CROSS_CHECK_TOL:g} (see {run_dir / 'metrics.json'})")
  return 0


if __name__ == "__main__":
  common.run_main(main)
