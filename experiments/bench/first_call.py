"""First-call time (trace + compile + one training step) against sequence length T.

Run: python experiments/bench/first_call.py [--lengths 100,10000] [--cells elman,lstm,gru]

Each measurement runs in a fresh subprocess (no warm caches), for the benchmark's "small" shape
(B=1, D=16, H=64, O=16), jaxrnn's default manual-BPTT Adam step. `lax.scan` compiles one loop body
whatever T is, so only the step itself should grow with T.
"""
from __future__ import annotations

import argparse
import json
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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="100,10000")
  parser.add_argument("--cells", default="elman,lstm,gru")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
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
