"""Peak memory of a training gradient on long sequences: storing everything vs `remat` chunks.

Run: python experiments/bench/memory.py [--cell lstm] [--lengths 10000,100000] [--json PATH]

For each T it compiles `jax.value_and_grad(rnn.loss)` with `remat=None` (store every step's
residuals) and `remat=round(sqrt(T))` (keep only chunk-boundary carries, recompute each chunk's
forward in the backward pass), and reports XLA's own accounting of the compiled program's
temporary buffers (`compiled.memory_analysis()`: exact, independent of the allocator), and, with
--run, the peak resident memory of a subprocess that actually runs it once (VmHWM minus the RSS
before the run) and its time.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time, resource
import jax, jax.numpy as jnp
from jaxrnn import rnn
cell, b, t, d, h, remat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
remat = None if remat == "none" else int(remat)
spec = rnn.rnn(cell, d, h, output_size=d)
params = rnn.init(jax.random.key(0), spec)
xs = jax.random.normal(jax.random.key(1), (b, t, d)); ys = jax.random.normal(jax.random.key(2), (b, t, d))
f = jax.jit(jax.value_and_grad(lambda p, x, y: rnn.loss(spec, p, x, y, remat=remat)))
compiled = f.lower(params, xs, ys).compile()
m = compiled.memory_analysis()
out = {"temp_mb": m.temp_size_in_bytes / 2**20, "args_mb": m.argument_size_in_bytes / 2**20,
       "out_mb": m.output_size_in_bytes / 2**20}
if sys.argv[7] == "run":
  def rss():
    for line in open("/proc/self/status"):
      if line.startswith("VmRSS"): return int(line.split()[1]) / 1024
  def hwm():
    for line in open("/proc/self/status"):
      if line.startswith("VmHWM"): return int(line.split()[1]) / 1024
  before = rss()
  start = time.perf_counter()
  jax.block_until_ready(compiled(params, xs, ys))
  out["run_s"] = time.perf_counter() - start
  out["peak_rss_increase_mb"] = hwm() - before
print(json.dumps(out))
"""


def measure(cell, b, t, d, h, remat, run):
  cmd = [sys.executable, "-c", CHILD, cell, str(b), str(t), str(d), str(h),
         "none" if remat is None else str(remat), "run" if run else "compile"]
  done = subprocess.run(cmd, capture_output=True, text=True, check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cell", default="lstm")
  parser.add_argument("--lengths", default="10000,100000")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--input", type=int, default=32)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--run", action="store_true", help="also run once and measure peak RSS")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  rows = []
  print(f"{args.cell}, B={args.batch}, D=O={args.input}, H={args.hidden}")
  print("| T | remat | XLA temp MB | peak RSS increase MB | run s |")
  print("|---:|---:|---:|---:|---:|")
  for t in [int(v) for v in args.lengths.split(",")]:
    for remat in (None, round(math.sqrt(t))):
      r = measure(args.cell, args.batch, t, args.input, args.hidden, remat, args.run)
      r.update(T=t, remat=remat)
      rows.append(r)
      print(f"| {t} | {remat or 'none'} | {r['temp_mb']:.1f} | "
            f"{r.get('peak_rss_increase_mb', float('nan')):.1f} | {r.get('run_s', float('nan')):.2f} |",
            flush=True)
  for t in sorted({r["T"] for r in rows}):
    full, chunked = [r for r in rows if r["T"] == t]
    print(f"T={t}: remat uses {chunked['temp_mb'] / full['temp_mb']:.3f}x the temporary memory")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump({"config": vars(args), "results": rows}, fh, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
