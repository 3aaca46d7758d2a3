"""Two GPU questions the first GPU benchmark run left open (issue 4; results in results/gpu_*.json).

1. `unroll`: on the GPU, every `lax.scan` iteration is a round of kernel launches plus the loop's
   own bookkeeping; at B=1 (the "small" config) that, not arithmetic, sets the time. Times the
   jaxrnn step (manual and autodiff BPTT) for each `--unrolls` factor (the recorded run: 1 and 16)
   next to PyTorch's cuDNN step, in one process, interleaved, median ms.
2. First call in fresh processes (`first_call.compare_peers`, one sample each): in one process,
   XLA's GPU GEMM autotuning results are cached, so whichever implementation compiles a matmul
   shape first pays for it (in bench.py, jaxrnn always compiles first).

The recorded H100 results (results/gpu_h100_followup.json) came from this script at commit 4c31bd4,
which built the jaxrnn step and the fresh-process children with its own copies of what
`peers.build(..., loss_options=...)` and `first_call.compare_peers` now do.

Run (from the repository root, on a GPU machine):
  python experiments/bench/gpu_followup.py --json runs/gpu_followup.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import first_call  # noqa: E402
import peers  # noqa: E402


def unroll_sweep(cells, configs, unrolls, repeats, steps, device):
  """Median ms per step of jaxrnn (manual, autodiff) for each unroll, and of torch, interleaved."""
  rows = []
  for cell in cells:
    for config in configs:
      cfg = peers.CONFIGS[config]
      runners = {("torch", 1): peers.build("torch", cell, cfg, device=device)}
      first = {}
      for backward, impl in (("manual", "jaxrnn"), ("autodiff", "jaxrnn-autodiff")):
        for unroll in unrolls:
          runner = peers.build(impl, cell, cfg, device=device, loss_options={"unroll": unroll})
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
  if args.device == "cpu":
    jax.config.update("jax_platforms", "cpu")
  report = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  report["unroll"] = unroll_sweep(args.cells.split(","), args.configs.split(","),
                                  [int(u) for u in args.unrolls.split(",")], args.repeats,
                                  args.steps, args.device)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)
  report["first_call"] = first_call.compare_peers(
      args.cells.split(","), args.first_call_configs.split(","), 1,
      args.first_call_impls.split(","), args.device)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
