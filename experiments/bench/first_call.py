"""First-call time (trace + compile + one training step), each measurement in a fresh process.

Two studies:
- against sequence length T (default): the benchmark's "small" shape (B=1, D=16, H=64, O=16),
  jaxrnn's default manual-BPTT Adam step. `lax.scan` compiles one loop body whatever T is, so only
  the step itself should grow with T.
- `--peers`: jaxrnn against every JAX peer on the benchmark's configs, each built by
  `peers.build` exactly as in `bench.py`, the first `runner.run(1)` timed. In `bench.py` all
  implementations share one process, so whichever compiles second reuses what the first warmed
  (JAX's tracing caches; on a GPU, XLA's GEMM autotuning) and jaxrnn always goes first; here none
  has a head start.

Run: python experiments/bench/first_call.py [--lengths 100,10000] [--cells elman,lstm,gru]
     python experiments/bench/first_call.py --peers [--configs small,medium,large,charlm]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import sys, time
t0 = time.perf_counter()
import jax, jax.numpy as jnp, optax
import jaxrnn
from jaxrnn import rnn
cell, t = sys.argv[1], int(sys.argv[2])
spec = rnn.rnn(cell, 16, 64, output_size=16)
params = rnn.init(jax.random.key(0), spec)
xs = jax.random.normal(jax.random.key(1), (1, t, 16)); ys = jax.random.normal(jax.random.key(2), (1, t, 16))
opt = optax.adam(1e-3)
state = opt.init(params)
jax.block_until_ready((params, state, xs, ys))
step = jaxrnn.make_train_step(lambda p, x, y: rnn.loss(spec, p, x, y), opt)
start = time.perf_counter()
out = step(params, state, xs, ys)
jax.block_until_ready(out)
first = time.perf_counter() - start
start = time.perf_counter()
jax.block_until_ready(step(*out[:2], xs, ys))
print(first, time.perf_counter() - start)
"""


PEER_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[4])
import peers
impl, cell, config = sys.argv[1:4]
peers.import_framework(impl)
runner = peers.build(impl, cell, peers.CONFIGS[config], device=sys.argv[5])
start = time.perf_counter()
float(runner.run(1))
print(time.perf_counter() - start)
"""

JAX_IMPLS = ("jaxrnn", "flax-linen", "flax-linen-optlstm", "flax-nnx", "flax-nnx-optlstm", "haiku",
             "equinox")


def compare_peers(cells, configs, repeats, impls=JAX_IMPLS, device="cpu"):
  """Median first call of each JAX implementation, fresh process each; rows and a markdown table.

  `device` "cpu" pins JAX to the CPU in the children; "cuda" leaves JAX's default backend (a GPU).
  """
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ)
  if device == "cpu":
    env["JAX_PLATFORMS"] = "cpu"
  rows = []
  print("| cell | config | " + " | ".join(impls) + " | fastest peer / jaxrnn |")
  print("|---|---|" + "---:|" * (len(impls) + 1))
  for cell in cells:
    for config in configs:
      medians = {}
      for r in range(repeats):
        for impl in impls:  # interleaved: repeat r of every impl, then repeat r + 1
          if impl.endswith("-optlstm") and cell != "lstm":
            continue
          done = subprocess.run([sys.executable, "-c", PEER_CHILD, impl, cell, config, here,
                                 device],
                                capture_output=True, text=True, env=env, timeout=600)
          if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["?"])[-1]
            print(f"  {cell}/{config} {impl}: failed: {tail[:200]}", file=sys.stderr)
            continue
          medians.setdefault(impl, []).append(float(done.stdout.split()[-1]))
      medians = {impl: statistics.median(v) for impl, v in medians.items()}
      peer = min(((v, k) for k, v in medians.items() if k != "jaxrnn"), default=None)
      for impl, value in medians.items():
        rows.append({"cell": cell, "config": config, "impl": impl, "first_call_s": value,
                     "device": device})
      cells_md = [f"{medians[i]:.3f}" if i in medians else "—" for i in impls]
      ratio = (f"{peer[0] / medians['jaxrnn']:.2f} ({peer[1]})"
               if peer and "jaxrnn" in medians else "—")
      print(f"| {cell} | {config} | " + " | ".join(cells_md) + f" | {ratio} |", flush=True)
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="100,10000")
  parser.add_argument("--cells", default="elman,lstm,gru")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", default=None)
  parser.add_argument("--peers", action="store_true",
                      help="compare jaxrnn's first call with every JAX peer's (see above)")
  parser.add_argument("--configs", default="small,medium,large,charlm",
                      help="with --peers: the benchmark configs")
  parser.add_argument("--impls", default=",".join(JAX_IMPLS),
                      help="with --peers: the JAX implementations (jaxrnn first)")
  args = parser.parse_args(argv)
  if args.peers:
    rows = compare_peers(args.cells.split(","), args.configs.split(","), args.repeats,
                         args.impls.split(","))
    if args.json:
      with open(args.json, "w") as fh:
        json.dump(rows, fh, indent=2)
    return 0
  rows = []
  print("| cell | T | first call s (median) | later step s |")
  print("|---|---:|---:|---:|")
  for cell in args.cells.split(","):
    for t in [int(v) for v in args.lengths.split(",")]:
      runs = []
      for _ in range(args.repeats):
        done = subprocess.run([sys.executable, "-c", CHILD, cell, str(t)], capture_output=True,
                              text=True, check=True)
        runs.append([float(v) for v in done.stdout.split()])
      runs.sort()
      first, later = runs[len(runs) // 2]
      rows.append({"cell": cell, "T": t, "first_call_s": first, "step_s": later})
      print(f"| {cell} | {t} | {first:.3f} | {later:.4f} |", flush=True)
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(rows, fh, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
