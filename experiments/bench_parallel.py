"""Benchmark: minGRU parallel (associative scan) vs sequential (lax.scan), and data parallelism.

Run: python experiments/bench_parallel.py [--out runs/bench_parallel] [--quick]

1. minGRU forward + backward (one `jax.value_and_grad`, jitted, compile time excluded) for
   `T` in 1e2, 1e3, 1e4, 1e5 at a small batch, `impl="parallel"` against `impl="sequential"`,
   and the crossover length where the parallel form starts to win.
2. One data-parallel train step (`jaxrnn.parallel.make_sharded_train_step`, a minGRU language-
   model-like regression, `impl="parallel"`) on 1, 2 and 4 virtual CPU devices, each in its own
   subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=N`, plus 2 processes x 2
   devices joined by `jax.distributed.initialize` (the multi-host path). The losses must agree;
   the times say little: virtual devices share the same CPU cores, so this shows correctness, not
   speed-up.

Writes `results.json`, `results.md` and `bench_parallel.png` into `--out` (files there are
replaced). The multi-host worker can be run by hand, one command per process (the same command on
every host, with its own --process-id and the first host's address)::

  for i in 0 1; do python experiments/bench_parallel.py --worker multihost --process-id $i \\
      --num-processes 2 --coordinator localhost:12355 & done; wait
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
  from experiments import common
except ImportError:  # run as a script: python experiments/bench_parallel.py
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
  from experiments import common

from jaxrnn import parallel, rnn
from jaxrnn.cells import mingru

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent

# The data-parallel step: one minGRU layer with a readout, batch split over the devices.
DP_BATCH, DP_T, DP_D, DP_H, DP_STEPS = 16, 256, 16, 64, 10


# ---------------------------------------------------------------- 1. parallel vs sequential


def time_fn(fn, *args, min_time: float, max_reps: int) -> tuple[float, int]:
  """Median wall time of `fn(*args)` (blocked until ready) after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times, start = [], time.perf_counter()
  while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < min_time):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), len(times)


def bench_scan(lengths, batch, input_size, hidden, seed, min_time, progress) -> list[dict]:
  params = mingru.mingru().init(jax.random.key(seed), input_size, hidden, jnp.float32)
  rows = []
  for t in progress(lengths, desc="minGRU T"):
    kx, kh = jax.random.split(jax.random.key(seed + t))
    xs = jax.random.normal(kx, (batch, t, input_size), jnp.float32)
    h0 = jax.random.normal(kh, (batch, hidden), jnp.float32)
    row = {"T": t}
    for impl in ("sequential", "parallel"):
      def loss(params, xs, h0, impl=impl):
        hs, h_T = mingru.forward(params, xs, h0, impl=impl)
        return jnp.mean(hs ** 2) + jnp.mean(h_T ** 2)
      fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
      seconds, reps = time_fn(fn, params, xs, h0, min_time=min_time, max_reps=20)
      row[impl] = {"ms": 1e3 * seconds, "reps": reps}
    row["speedup"] = row["sequential"]["ms"] / row["parallel"]["ms"]
    rows.append(row)
  return rows


def crossover(rows) -> str:
  """Every `T` where the faster implementation changes, interpolated linearly in
  (log T, log time ratio) between the measured lengths."""
  logs = [(math.log10(r["T"]), math.log(r["speedup"])) for r in rows]
  faster = lambda s: "parallel" if s > 0 else "sequential"
  parts = [f"{faster(logs[0][1])} faster at T = {rows[0]['T']:,}"]
  for (t0, s0), (t1, s1) in zip(logs, logs[1:]):
    if (s0 > 0) != (s1 > 0):
      t = t0 + (t1 - t0) * (-s0) / (s1 - s0)
      parts.append(f"{faster(s1)} faster from T ~ {10 ** t:,.0f} (between {10 ** t0:,.0f} and "
                   f"{10 ** t1:,.0f})")
  if len(parts) == 1:
    parts.append(f"up to T = {rows[-1]['T']:,}")
  return "; ".join(parts)


# ---------------------------------------------------------------- 2. data parallelism


def _dp_problem():
  spec = rnn.rnn("mingru", DP_D, DP_H, output_size=DP_D)
  params = rnn.init(jax.random.key(0), spec)
  kx, kl = jax.random.split(jax.random.key(1))
  xs = jax.random.normal(kx, (DP_BATCH, DP_T + 1, DP_D), jnp.float32)
  lengths = jax.random.randint(kl, (DP_BATCH,), DP_T // 2, DP_T + 1)

  def loss_fn(params, xs, ys, lengths):  # predict the next input vector
    return rnn.loss(spec, params, xs, ys, lengths=lengths, impl="parallel")
  return params, (xs[:, :-1], xs[:, 1:], lengths), loss_fn


def _dp_train(mesh, batch, min_time, fixed_reps=None):
  """Train DP_STEPS steps, then time further steps: for `min_time` seconds, or exactly
  `fixed_reps` of them with several processes, which must all run the same collectives."""
  params, _, loss_fn = _dp_problem()
  opt = optax.adam(1e-3)
  step = parallel.make_sharded_train_step(loss_fn, opt, mesh)
  state = opt.init(params)
  start = time.perf_counter()
  params, state, metrics = step(params, state, *batch)
  jax.block_until_ready(params)
  compile_s = time.perf_counter() - start
  for _ in range(DP_STEPS - 1):
    params, state, metrics = step(params, state, *batch)
  losses = float(metrics["loss"])
  times, start = [], time.perf_counter()
  while (len(times) < fixed_reps if fixed_reps else
         len(times) < 5 or (time.perf_counter() - start < min_time and len(times) < 50)):
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, state, *batch))
    times.append(time.perf_counter() - t0)
  return {"loss_after_steps": losses, "step_ms": 1e3 * statistics.median(times),
          "reps": len(times), "first_call_s": compile_s}


def worker_step(devices: int, min_time: float) -> dict:
  mesh = parallel.make_mesh(devices)
  _, batch, _ = _dp_problem()
  return {"devices": devices, "processes": 1, **_dp_train(mesh, batch, min_time)}


def worker_multihost(process_id, num_processes, coordinator, min_time) -> dict:
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)
  mesh = parallel.make_mesh()  # every device of every process
  _, batch, _ = _dp_problem()
  rows = DP_BATCH // num_processes  # this process's rows of the global batch, in process order
  local = tuple(np.asarray(x)[process_id * rows:(process_id + 1) * rows] for x in batch)
  result = {"devices": jax.device_count(), "processes": num_processes,
            **_dp_train(mesh, local, min_time, fixed_reps=20)}
  jax.distributed.shutdown()
  return result


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + f" --xla_force_host_platform_device_count={devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _json_line(text: str) -> dict:
  return json.loads(text.strip().splitlines()[-1])


def run_devices(counts, min_time, multihost: bool, progress) -> list[dict]:
  rows = []
  for n in progress(counts, desc="devices"):
    proc = subprocess.run([sys.executable, str(HERE), "--worker", "step", "--devices", str(n),
                           "--min-time", str(min_time)], env=_env(n), capture_output=True,
                          text=True, timeout=600)
    if proc.returncode:
      raise common.ExperimentError(f"the {n}-device worker failed:\n{proc.stderr[-3000:]}")
    rows.append(_json_line(proc.stdout))
  if multihost:
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, str(HERE), "--worker", "multihost", "--process-id", str(i),
         "--num-processes", "2", "--coordinator", f"localhost:{port}", "--min-time",
         str(min_time)], env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    try:
      outs = [p.communicate(timeout=300) for p in procs]
    except subprocess.TimeoutExpired:
      outs = None
    for p in procs:
      p.kill()
    if outs is None or any(p.returncode for p in procs):
      err = "timed out" if outs is None else next(e for p, (_, e) in zip(procs, outs)
                                                  if p.returncode)[-2000:]
      print(f"warning: the 2-process run failed, left out of the table: {err}", file=sys.stderr)
    else:
      rows.append(_json_line(outs[0][0]))
  return rows


# ---------------------------------------------------------------- report


def markdown(result) -> str:
  lines = [f"# minGRU parallel scan and data parallelism ({result['machine']})", "",
           f"## minGRU forward + backward, B = {result['batch']}, D = {result['input']}, "
           f"H = {result['hidden']}, float32", "",
           "| T | sequential (ms) | parallel (ms) | sequential / parallel |",
           "|---:|---:|---:|---:|"]
  for r in result["scan"]:
    lines.append(f"| {r['T']:,} | {r['sequential']['ms']:.2f} | {r['parallel']['ms']:.2f} | "
                 f"{r['speedup']:.2f}x |")
  lines += ["", f"Crossover: {result['crossover']}.", "",
            "Medians of wall times (compile excluded) on a machine shared with other jobs: ratios "
            "near 1 are within run-to-run noise. On a few CPU cores the associative scan has no "
            "idle parallel hardware to use and does more work than the loop (about twice the "
            "elementwise operations, in log2 T passes over `[T, B, H]` arrays); it wins where the "
            "sequential loop's fixed per-step cost dominates (short T). Its `O(log T)` depth pays "
            "off on wide parallel hardware (GPU/TPU), not measured here.", "",
            f"## Data-parallel train step (minGRU + readout, impl=\"parallel\", global batch "
            f"{DP_BATCH}, T = {DP_T}, H = {DP_H})", "",
            f"| devices | processes | step (ms) | loss after {DP_STEPS} Adam steps | "
            f"rel. diff. to 1 device |", "|---:|---:|---:|---:|---:|"]
  base = result["devices"][0]["loss_after_steps"]
  for r in result["devices"]:
    diff = abs(r["loss_after_steps"] - base) / abs(base)
    lines.append(f"| {r['devices']} | {r['processes']} | {r['step_ms']:.1f} | "
                 f"{r['loss_after_steps']:.6f} | {diff:.1e} |")
  lines += ["", "The devices are virtual (`--xla_force_host_platform_device_count`) and share "
            f"the same {result['cpu_count']} CPU cores, so the step times show the cost of "
            "partitioning and the all-reduce, not a speed-up; what the table demonstrates is "
            "that the result does not depend on the device or process count."]
  return "\n".join(lines) + "\n"


def plot(result, path: Path) -> None:
  plt = common.plt()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  ts = [r["T"] for r in result["scan"]]
  for impl, marker in (("sequential", "o"), ("parallel", "s")):
    ax1.loglog(ts, [r[impl]["ms"] for r in result["scan"]], marker=marker, label=impl)
  ax1.set_xlabel("sequence length T")
  ax1.set_ylabel("forward + backward (ms)")
  ax1.set_title(f"minGRU, B={result['batch']}, H={result['hidden']}")
  ax1.legend()
  ax1.grid(True, which="both", alpha=0.3)
  labels = [f"{r['devices']} dev" + (f"\n{r['processes']} proc" if r["processes"] > 1 else "")
            for r in result["devices"]]
  ax2.bar(labels, [r["step_ms"] for r in result["devices"]], color="tab:gray")
  ax2.set_ylabel("train step (ms)")
  ax2.set_title(f"data parallel, virtual devices on {result['cpu_count']} cores")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_parallel",
                 help="results folder (default runs/bench_parallel)")
  p.add_argument("--quick", action="store_true", help="T up to 1e4 only, shorter timing")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--input", type=int, default=16)
  p.add_argument("--hidden", type=int, default=64)
  p.add_argument("--lengths", default="100,1000,10000,100000")
  p.add_argument("--device-counts", default="1,2,4")
  p.add_argument("--no-multihost", action="store_true", help="skip the 2-process run")
  p.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per point")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--worker", choices=("step", "multihost"), help=argparse.SUPPRESS)
  p.add_argument("--process-id", type=int, default=0, help="multi-host worker: this process")
  p.add_argument("--num-processes", type=int, default=2, help="multi-host worker: how many")
  p.add_argument("--coordinator", default="localhost:12355",
                 help="multi-host worker: host:port of process 0")
  parallel.add_devices_argument(p)
  args = p.parse_args(argv)

  if args.worker == "step":
    print(json.dumps(worker_step(args.devices or jax.device_count(), args.min_time)))
    return 0
  if args.worker == "multihost":
    result = worker_multihost(args.process_id, args.num_processes, args.coordinator,
                              args.min_time)
    print(json.dumps(result) if args.process_id == 0 else json.dumps({"process": args.process_id}))
    return 0

  try:
    lengths = [int(float(x)) for x in args.lengths.split(",")]
    counts = [int(x) for x in args.device_counts.split(",")]
  except ValueError as err:
    raise common.ExperimentError(f"--lengths and --device-counts take comma-separated integers; "
                                 f"{err}") from err
  common.check_positive(batch=args.batch, input=args.input, hidden=args.hidden,
                        min_time=args.min_time)
  if args.quick:
    lengths = [t for t in lengths if t <= 10_000]
    args.min_time = min(args.min_time, 0.3)
  progress = lambda it, desc: common.progress(it, desc=desc, disable=args.no_progress)
  start = time.perf_counter()
  scan_rows = bench_scan(lengths, args.batch, args.input, args.hidden, args.seed, args.min_time,
                         progress)
  device_rows = run_devices(counts, args.min_time, not args.no_multihost, progress)
  result = {
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
                 f"jax {jax.__version__}",
      "cpu_count": os.cpu_count(), "batch": args.batch, "input": args.input,
      "hidden": args.hidden, "scan": scan_rows, "crossover": crossover(scan_rows),
      "devices": device_rows, "seconds": time.perf_counter() - start,
  }
  args.out.mkdir(parents=True, exist_ok=True)
  common.write_json(args.out / "results.json", result)
  (args.out / "results.md").write_text(markdown(result))
  plot(result, args.out / "bench_parallel.png")
  print(markdown(result))
  print(f"wrote {args.out}/results.json, results.md, bench_parallel.png "
        f"({result['seconds']:.0f} s)")
  return 0


if __name__ == "__main__":
  common.run_main(main)
