"""Two GPU questions the first GPU benchmark run left open (issue 4; results in results/gpu_*.json).

1. `unroll`: on the GPU, every `lax.scan` iteration is a round of kernel launches plus the loop's
   own bookkeeping; at B=1 (the "small" config) that, not arithmetic, sets the time. Times the
   jaxrnn step (manual and autodiff BPTT) for unroll 1 / 8 / 32 next to PyTorch's cuDNN step, in
   one process, interleaved, median ms.
2. First call in fresh processes: in one process, XLA's GPU GEMM autotuning results are cached, so
   whichever implementation compiles a matmul shape first pays for it (in bench.py, jaxrnn always
   compiles first). Here every (implementation, config) runs in its own process.

Run (from the repository root, on a GPU machine):
  python experiments/bench/gpu_followup.py --json runs/gpu_followup.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402

FIRST_CALL_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[4])
import peers
impl, cell, config = sys.argv[1:4]
runner = peers.build(impl, cell, peers.CONFIGS[config], device=sys.argv[5])
start = time.perf_counter()
float(runner.run(1))
print(time.perf_counter() - start)
"""


def jaxrnn_runner(cell, cfg, backward, unroll):
  """The benchmark's jaxrnn step with a chosen `backward` and `unroll`."""
  import jax
  import optax
  import jaxrnn
  from jaxrnn import rnn
  spec = rnn.rnn(cell, cfg.input, cfg.hidden, output_size=cfg.output)
  params = rnn.init(jax.random.key(0), spec)
  loss_fn = lambda p, x, y: rnn.loss(spec, p, x, y, loss=cfg.loss, backward=backward,
                                     unroll=unroll)
  step = jaxrnn.make_train_step(loss_fn, optax.adam(peers.LEARNING_RATE), skip_nonfinite=False,
                                jit=False)

  def train_step(params, opt_state, xs, ys):
    params, opt_state, metrics = step(params, opt_state, xs, ys)
    return params, opt_state, metrics["loss"]

  xs, ys = peers.make_data(cfg)
  return peers._jax_runner("jaxrnn", "", train_step, params, xs, ys, donate=True)


def unroll_sweep(cells, configs, unrolls, repeats, steps, device):
  rows = []
  for cell in cells:
    for config in configs:
      cfg = peers.CONFIGS[config]
      runners = {("torch", 1): peers.build("torch", cell, cfg, device=device)}
      first = {}
      for backward in ("manual", "autodiff"):
        for unroll in unrolls:
          runner = jaxrnn_runner(cell, cfg, backward, unroll)
          start = time.perf_counter()
          float(runner.run(1))
          first[(backward, unroll)] = time.perf_counter() - start
          runners[(backward, unroll)] = runner
      times = {k: [] for k in runners}
      for r in range(repeats):
        for k, runner in runners.items():
          runner.run(2)
          start = time.perf_counter()
          runner.run(steps)
          times[k].append(1e3 * (time.perf_counter() - start) / steps)
      for (impl, unroll), ts in times.items():
        row = {"cell": cell, "config": config, "impl": impl, "unroll": unroll,
               "ms_per_step": statistics.median(ts), "first_call_s": first.get((impl, unroll))}
        rows.append(row)
        print(f"{cell}/{config} {impl:8s} unroll {unroll:3d}: {row['ms_per_step']:8.2f} ms",
              flush=True)
  return rows


def first_calls(cells, configs, impls, device):
  rows = []
  here = os.path.dirname(os.path.abspath(__file__))
  for cell in cells:
    for config in configs:
      for impl in impls:
        done = subprocess.run([sys.executable, "-c", FIRST_CALL_CHILD, impl, cell, config, here, device],
                              capture_output=True, text=True, timeout=120)
        value = float(done.stdout.split()[-1]) if done.returncode == 0 else None
        rows.append({"cell": cell, "config": config, "impl": impl, "first_call_s": value})
        print(f"first call {cell}/{config} {impl:10s} "
              f"{value if value is None else round(value, 2)} s", flush=True)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cells", default="elman,lstm,gru")
  p.add_argument("--configs", default="small,medium")
  p.add_argument("--unrolls", default="1,8,32")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--first-call-configs", default="medium")
  p.add_argument("--first-call-impls", default="jaxrnn,flax-nnx,haiku")
  p.add_argument("--device", default="cuda", help="cuda (the point), or cpu for a smoke test")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  import jax
  report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  report["unroll"] = unroll_sweep(args.cells.split(","), args.configs.split(","),
                                  [int(u) for u in args.unrolls.split(",")], args.repeats,
                                  args.steps, args.device)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
  report["first_call"] = first_calls(args.cells.split(","), args.first_call_configs.split(","),
                                     args.first_call_impls.split(","), args.device)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
