"""Benchmark one RNN training step (forward, loss, BPTT, Adam; float32) of jaxrnn against its peers.

For each (cell, config) every implementation in `peers.py` is built on the same fixed data, then:

1. first call: the time of the first step (trace + compile + run for JAX; one step for PyTorch).
   Before the first case the process traces, compiles and runs, untimed, one training step of a
   tiny RNN written in plain JAX and Optax (`warm_jax`): JAX's and XLA's first use in a process
   would otherwise be counted in whichever implementation comes first, jaxrnn's in the first case
   (in fresh processes, each implementation first: jaxrnn's Elman small first call 0.50 s, Haiku's
   0.72, Flax nnx's 0.71; after this warm-up 0.40, 0.55 and 0.73). Each first call runs right
   after a garbage collection, with the collector off, as the timed steps do (below);
2. warm-up: a few more steps, one at a time; the losses must be finite and decrease (checked and
   reported; an implementation that fails the check is still timed, and flagged);
3. `N` steps per repeat, `N` chosen from the warm-up so that one repeat takes about `--target-s`;
4. `--repeats` interleaved repeats: each repeat times `N` steps of every implementation in turn
   (the order rotates by one each repeat), blocking on the results at the end of the `N` steps;
   the reported ms/step is the median over repeats. Before its `N` timed steps each
   implementation runs `--settle` untimed ones (default 1): the first step after another
   implementation ran is slower (measured: jaxrnn's LSTM char-LM step 28.9-31.2 ms right after
   Haiku or PyTorch, 24.2 for the steps after it; presumably the caches and allocator state the
   other one left), a cost of the interleaving, not of the step.

Reported per implementation: ms/step, tokens/s (`B T` per step), first-call seconds, achieved
GFLOP/s from the analytic count of `peers.step_flops` (matmuls only: forward
`F = 2 B T (G H (D + H) + H O)` with `G` = 1 / 4 / 3 gate blocks for elman / lstm / gru, and the
step counted as `3 F`), and, with `--measure-memory`, peak RSS. Per (cell, config): the ratio
`ms(fastest peer) / ms(jaxrnn)`, so > 1 means jaxrnn's default (manual BPTT) path is faster.
Also measured: the JAX float32 2048^3 matmul rate, the machine's practical peak, at the start and
again after each (cell, config), reported as the median of those measurements (`matmul_gflops`,
with each of them in `matmul_gflops_samples`): measured once at the start, it caught whatever
phase the machine was in for that second (258 and 315 GFLOP/s in two runs of the same code an hour
apart on the eleventh session's Intel Xeon, whose step times agreed within 3-8%).

Memory (`--measure-memory`): each implementation runs alone in a fresh subprocess that imports its
framework, builds, makes the first call and 3 more steps; `peak_rss_mb` is that process's peak
RSS, `VmHWM` of /proc/self/status (whole process: interpreter, framework, compiled code, data,
activations; not `ru_maxrss`, which Linux carries over from the parent across fork + exec) and
`peak_rss_delta_mb` is the peak minus the RSS measured just after the imports, i.e. what building,
compiling and training added. The timing process itself is not used for memory: its high-water mark
is shared by every implementation.

Usage (from the repository root):
  python experiments/bench/bench.py --quick                      # < 2 minutes on 2 cores
  python experiments/bench/bench.py --json runs/bench.json --markdown runs/bench.md
  python experiments/bench/bench.py --cells lstm --configs large --impls jaxrnn,torch,flax-linen
  python experiments/bench/bench.py --measure-memory --json runs/bench.json
  python experiments/bench/bench.py --device cuda --json runs/gpu.json   # JAX GPU vs torch+cuDNN

`--device cuda` runs PyTorch on the GPU (cuDNN's RNN kernels, fused Adam) and requires JAX's
default backend to be a GPU; `--device cpu` (the default) pins JAX to the CPU. Each framework keeps
its own default float32 matmul precision (on the GPU both allow TF32 for the recurrent matmuls by
default: JAX's `DEFAULT` precision, PyTorch's `cudnn.allow_tf32`); the report records the settings.
The JSON file is rewritten after every (cell, config), so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from jaxrnn import host_memory

try:
  from . import peers
except ImportError:  # run as a script: python experiments/bench/bench.py
  import peers

QUICK = {"configs": "small,medium", "repeats": 3, "target_s": 0.1, "warmup": 2}
DEFAULTS = {"configs": "small,medium,large,charlm", "repeats": 7, "target_s": 0.3, "warmup": 3}


def parse_args(argv=None) -> argparse.Namespace:
  """Command-line options; `--quick` fills in whatever was not given explicitly."""
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--cells", default=",".join(peers.CELLS), help="comma list of elman,lstm,gru")
  p.add_argument("--configs", default=None,
                 help=f"comma list of {','.join(peers.CONFIGS)} (default {DEFAULTS['configs']})")
  p.add_argument("--impls", default=",".join(peers.IMPLS), help="comma list of implementations")
  p.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 7)")
  p.add_argument("--target-s", type=float, default=None,
                 help="seconds per implementation per repeat, sets N (default 0.3)")
  p.add_argument("--warmup", type=int, default=None, help="warm-up steps after the first (3)")
  p.add_argument("--settle", type=int, default=1,
                 help="untimed steps before each implementation's timed steps in a repeat (1)")
  p.add_argument("--quick", action="store_true",
                 help="a tiny run: configs small,medium, 3 repeats of ~0.1 s, 2 warm-up steps")
  p.add_argument("--measure-memory", action="store_true",
                 help="also measure peak RSS, one subprocess per implementation")
  p.add_argument("--no-donate", dest="donate", action="store_false",
                 help="do not donate params / optimiser state to the jitted JAX steps")
  p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads (2)")
  p.add_argument("--device", choices=peers.DEVICES, default="cpu",
                 help="where every implementation runs: 'cpu' (JAX pinned to the CPU) or 'cuda' "
                      "(JAX's default backend must be a GPU; PyTorch on CUDA with cuDNN)")
  p.add_argument("--host-malloc", choices=("default", *host_memory.MODES), default="default",
                 help="'default': glibc's defaults. 'hugepages': relaunch with GLIBC_TUNABLES="
                      "glibc.malloc.hugetlb=1 (jaxrnn.host_memory), so every step's big buffers "
                      "fault in 2 MB rather than 4 KB at a time (measured erratic on the large "
                      "shapes in this long multi-framework process). 'keep': relaunch with "
                      "glibc's mmap threshold, top pad and trim threshold set so that freed heaps "
                      "stay in the process (jaxrnn.host_memory.KEEP_HEAPS_TUNABLES). Either "
                      "applies to every implementation alike; see experiments/PERF_NOTES.md")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="write the results as JSON here")
  p.add_argument("--markdown", default=None, help="write the tables as markdown here")
  p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  preset = QUICK if args.quick else DEFAULTS
  for name in ("configs", "repeats", "target_s", "warmup"):
    if getattr(args, name) is None:
      setattr(args, name, preset[name])
  args.cells = _comma_list("cells", args.cells, peers.CELLS)
  args.configs = _comma_list("configs", args.configs, peers.CONFIGS)
  args.impls = _comma_list("impls", args.impls, peers.IMPLS)
  if args.repeats < 1 or args.warmup < 1 or args.target_s <= 0 or args.settle < 0:
    p.error("--repeats and --warmup must be >= 1, --settle >= 0 and --target-s > 0.")
  if args.device == "cuda" and (args.measure_memory or args.host_malloc != "default"):
    p.error("--measure-memory and --host-malloc measure host memory: --device cpu only.")
  return args


def _comma_list(name, value, valid):
  items = [v.strip() for v in value.split(",") if v.strip()]
  bad = [v for v in items if v not in valid]
  if bad or not items:
    raise SystemExit(f"--{name}: unknown {bad or 'empty list'}; choose from {','.join(valid)}.")
  return items


# ----------------------------------------------------------------------------------------------
# Machine and reference measurements.


def _cpu_id_text(cpu_id) -> str:
  """" (AuthenticAMD family 26 model 2, AVX-512)" from `machine_info`'s `cpu_id`, or ""."""
  if not cpu_id or not cpu_id.get("family"):
    return ""
  return (f" ({cpu_id.get('vendor')} family {cpu_id['family']} model {cpu_id.get('model')}"
          f"{', AVX-512' if cpu_id.get('avx512f') else ''})")


def machine_info() -> dict:
  """CPU, cores, load, library versions and thread settings: what a reader needs to compare runs."""
  cpu = platform.processor() or "unknown"
  cpu_id = {}
  try:
    with open("/proc/cpuinfo") as f:
      fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines()
                    if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    cpu = fields.get("model name", cpu)
    # A virtual machine may hide the model name ("AMD EPYC"); family and model still tell the
    # generation (AMD family 25: Zen 3/4, 26: Zen 5).
    cpu_id = {"vendor": fields.get("vendor_id"), "family": fields.get("cpu family"),
              "model": fields.get("model"),
              "avx512f": "avx512f" in fields.get("flags", "").split()}
  except (OSError, ValueError):
    pass
  versions = {}
  for dist in ("jax", "jaxlib", "optax", "flax", "dm-haiku", "equinox", "torch", "numpy",
               "jaxrnn"):
    try:
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      versions[dist] = None
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                            timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    commit = None
  return {
      "cpu": cpu,
      "cpu_id": cpu_id,
      "cores": os.cpu_count(),
      "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "platform": platform.platform(),
      "python": platform.python_version(),
      "versions": versions,
      "git_commit": commit,
      "torch_threads": None,
      "xla_flags": os.environ.get("XLA_FLAGS"),
      "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
      "host_malloc": _host_malloc_text(),
      "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def use_device(device: str) -> dict:
  """Put JAX on `device` ("cpu" pins it; "cuda" requires a GPU default backend); describe it."""
  import jax
  if device == "cpu":
    jax.config.update("jax_platforms", "cpu")  # no effect if a backend is already up
    if jax.default_backend() != "cpu":
      raise SystemExit(f"--device cpu: JAX already runs on {jax.default_backend()!r}; set "
                       "JAX_PLATFORMS=cpu.")
  elif jax.default_backend() != "gpu":
    raise SystemExit(f"--device cuda: JAX's default backend is {jax.default_backend()!r}, not a "
                     "GPU; install a CUDA jaxlib or run with --device cpu.")
  info = {"device": device, "jax_backend": jax.default_backend(),
          "jax_device": jax.devices()[0].device_kind,
          "jax_default_matmul_precision": jax.config.jax_default_matmul_precision}
  if device == "cuda":
    try:
      import torch
      info.update(torch_cuda=torch.version.cuda, torch_cudnn=torch.backends.cudnn.version(),
                  torch_device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  torch_cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                  torch_matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    except ImportError:
      pass
  return info


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Median float32 `[n, n] @ [n, n]` rate in GFLOP/s with jitted JAX on the default device."""
  import jax
  import jax.numpy as jnp
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2.0 * n ** 3 / statistics.median(times) / 1e9


def warm_jax() -> None:
  """Trace, compile and run one training step of a tiny RNN in plain JAX and Optax (`lax.scan`,
  readout, mean squared error, `value_and_grad`, Adam; no jaxrnn, no peer), so that JAX's and
  XLA's process-wide first-use costs fall on no implementation's first call."""
  import jax
  import jax.numpy as jnp
  import optax

  def loss(params, xs, ys):
    def body(h, x):
      h = jnp.tanh(x @ params["U"] + h @ params["W"] + params["b"][None])
      return h, h
    hs = jax.lax.scan(body, jnp.zeros((2, 4)), xs)[1]
    return jnp.mean((hs @ params["V"] - ys) ** 2)

  opt = optax.adam(1e-3)

  @jax.jit
  def step(params, state, xs, ys):
    value, grads = jax.value_and_grad(loss)(params, xs, ys)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  params = {"U": jnp.ones((3, 4)), "W": jnp.eye(4), "b": jnp.zeros(4), "V": jnp.ones((4, 2))}
  jax.block_until_ready(step(params, opt.init(params), jnp.ones((5, 2, 3)), jnp.ones((5, 2, 2))))


def _host_malloc_text() -> str:
  """How glibc's malloc is set in this process, for the report."""
  names = {"hugepages": "huge pages", "keep": "kept heaps"}
  modes = [names[m] for m in host_memory.MODES if host_memory.requested(m)]
  if not modes:
    return "glibc defaults"
  return f"{' and '.join(modes)} (GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES')})"


def warm_native() -> dict:
  """Load jaxrnn's native CPU kernels before the first case, compiling them first where the disk
  cache has no build for this machine (`python -m jaxrnn.kernels`), and say what that took.

  The build is once per machine (about 14 s on the 2-core AMD EPYC of the fourteenth session),
  not per shape or process: left to the first call, it would land on whichever case runs first
  (jaxrnn's Elman small: 16.9 s instead of 0.4). It is reported on its own instead:
  `{"available", "path", "built_s" (None: from the cache), "load_s", "error"}`."""
  from jaxrnn import kernels
  start = time.perf_counter()
  available = kernels.library() is not None
  info = kernels.library_info() or {}
  return {"available": available, "path": info.get("path"), "built_s": info.get("built_s"),
          "load_s": time.perf_counter() - start,
          "error": None if available else kernels.build_error()}


def _native_line(native: dict) -> str:
  """The markdown header's line on the native kernels' build."""
  if not native.get("available"):
    return f"- native kernels: not available ({native.get('error')}); jaxrnn ran through lax.scan"
  how = ("loaded from the disk cache" if native.get("built_s") is None
         else f"compiled for this machine in {native['built_s']:.1f} s (once per machine, then "
              "cached on disk)")
  return (f"- native kernels: {how}, before the first case, so that no first call includes it "
          f"({native['load_s']:.1f} s in all)")


# ----------------------------------------------------------------------------------------------
# One (cell, config).


def cpu_times(path: str = "/proc/stat") -> dict | None:
  """The machine's CPU time so far, in clock ticks, from the first line of /proc/stat: `total`
  and `steal` (time the hypervisor ran something else while this guest's CPUs had work; 0 on bare
  metal). None where there is no /proc/stat."""
  try:
    with open(path) as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  # user nice system idle iowait irq softirq steal guest guest_nice; guest time is inside user.
  return {"total": sum(fields[:8]), "steal": fields[7] if len(fields) > 7 else 0}


def steal_pct(before: dict | None, after: dict | None) -> float | None:
  """The share of the CPUs' time between two `cpu_times` that the hypervisor took, in %. On the
  project's KVM guest the native loops' calls are bimodal: in the slow ones one thread's step
  stalls for ~7 ms, a stall the guest's scheduler never sees (experiments/PERF_NOTES.md), so a
  case that ran in such a phase says so here."""
  if not before or not after or after["total"] <= before["total"]:
    return None
  return 100.0 * (after["steal"] - before["steal"]) / (after["total"] - before["total"])


def _short_error(exc: BaseException) -> str:
  text = f"{type(exc).__name__}: {exc}".strip().splitlines()
  return text[0][:300] if text else type(exc).__name__


def _timed_run(runner, n: int, settle: int = 0) -> float:
  """Seconds for `n` steps (blocked), with the garbage collector held off while timing, after
  `settle` untimed steps (blocked too)."""
  if settle:
    runner.run(settle)
  gc.collect()
  gc.disable()
  try:
    start = time.perf_counter()
    runner.run(n)
    return time.perf_counter() - start
  finally:
    gc.enable()


def bench_case(cell: str, config: str, args, log=print) -> list[dict]:
  """Build, check and time every requested implementation for one (cell, config)."""
  cfg = peers.CONFIGS[config]
  flops = peers.step_flops(cell, cfg)
  tokens = cfg.batch * cfg.time
  rows, runners = {}, {}

  def fail(impl, status, exc):
    rows[impl].update(status=status, error=_short_error(exc))
    runners.pop(impl, None)
    log(f"  {impl:20s} {status}: {_short_error(exc)}")

  for impl in args.impls:
    row = {"cell": cell, "config": config, "impl": impl, "status": "ok", "error": None,
           "note": None, "ms_per_step": None, "tokens_per_s": None, "first_call_s": None,
           "peak_rss_mb": None, "peak_rss_delta_mb": None, "gflops": None,
           "flops_per_step": flops, "steps_per_repeat": None, "ms_per_step_repeats": [],
           "loss_initial": None, "loss_after_warmup": None, "loss_check": None}
    try:
      runner = peers.build(impl, cell, cfg, seed=args.seed, donate=args.donate,
                           threads=args.threads, device=args.device)
    except peers.NotApplicable:
      continue
    except peers.Missing as exc:
      rows[impl] = row
      fail(impl, "missing", exc)
      continue
    except Exception as exc:  # noqa: BLE001 - report and carry on with the others
      rows[impl] = row
      fail(impl, "error", exc)
      continue
    rows[impl], runners[impl] = row, runner
    row["note"] = runner.note

  # First calls, then warm-up with the loss check, one implementation at a time.
  step_s = {}
  for impl in list(runners):
    row, runner = rows[impl], runners[impl]
    try:
      # As for the timed steps (`_timed_run`): a collection left owing by the objects every
      # implementation's build made would land in the first call that happens to trigger it
      # (measured: jaxrnn's Elman small first call 0.29 s built alone, 0.43-0.44 s after all the
      # peers had been built, the peers' own 0.40-0.49).
      gc.collect()
      gc.disable()
      try:
        start = time.perf_counter()
        first_loss = float(runner.run(1))
        row["first_call_s"] = time.perf_counter() - start
      finally:
        gc.enable()
      losses, times = [first_loss], []
      for _ in range(args.warmup):
        start = time.perf_counter()
        losses.append(float(runner.run(1)))
        times.append(time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001
      fail(impl, "error", exc)
      continue
    row["loss_initial"], row["loss_after_warmup"] = losses[0], losses[-1]
    if not all(math.isfinite(v) for v in losses):
      row["loss_check"] = "non-finite"
    elif losses[-1] >= losses[0]:
      row["loss_check"] = "not decreasing"
    else:
      row["loss_check"] = "ok"
    step_s[impl] = min(times)
    log(f"  {impl:20s} first call {row['first_call_s']:7.2f} s   loss {losses[0]:11.4f} -> "
        f"{losses[-1]:11.4f} ({len(losses) - 1} steps) {row['loss_check']}")

  # Interleaved repeats.
  n_steps = {impl: max(1, round(args.target_s / max(step_s[impl], 1e-6))) for impl in runners}
  for impl in runners:
    rows[impl]["steps_per_repeat"] = n_steps[impl]
  for r in range(args.repeats):
    order = list(runners)
    order = order[r % len(order):] + order[:r % len(order)] if order else order
    for impl in order:
      try:
        seconds = _timed_run(runners[impl], n_steps[impl], args.settle)
      except Exception as exc:  # noqa: BLE001
        fail(impl, "error", exc)
        continue
      rows[impl]["ms_per_step_repeats"].append(1e3 * seconds / n_steps[impl])

  for impl in list(runners):
    row = rows[impl]
    ms = statistics.median(row["ms_per_step_repeats"])
    row.update(ms_per_step=ms, tokens_per_s=tokens / (ms / 1e3), gflops=flops / (ms / 1e3) / 1e9)
  runners.clear()
  gc.collect()

  if args.measure_memory:
    for impl, row in rows.items():
      if row["status"] == "ok":
        mem = measure_memory(cell, config, impl, args)
        row.update(peak_rss_mb=mem.get("peak_rss_mb"),
                   peak_rss_delta_mb=mem.get("peak_rss_delta_mb"))
        if "error" in mem:
          log(f"  {impl:20s} memory: {mem['error']}")
  return list(rows.values())


def summarize(rows: list[dict]) -> dict:
  """`ratio = ms(fastest peer) / ms(jaxrnn)` for one (cell, config)'s rows."""
  ok = {r["impl"]: r["ms_per_step"] for r in rows if r["status"] == "ok"}
  peer_ms = {impl: ms for impl, ms in ok.items() if impl in peers.PEERS}
  fastest = min(peer_ms, key=peer_ms.get) if peer_ms else None
  jaxrnn_ms = ok.get("jaxrnn")
  ratio = peer_ms[fastest] / jaxrnn_ms if fastest and jaxrnn_ms else None
  return {"cell": rows[0]["cell"] if rows else None, "config": rows[0]["config"] if rows else None,
          "jaxrnn_ms": jaxrnn_ms, "fastest_peer": fastest,
          "fastest_peer_ms": peer_ms.get(fastest), "ratio": ratio}


# ----------------------------------------------------------------------------------------------
# Memory: one subprocess per implementation.


def _proc_status_mb(field: str) -> float:
  """`VmRSS` (current) or `VmHWM` (peak) resident set size in MB from /proc; NaN elsewhere."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return float("nan")


def memory_child(spec: str) -> None:
  """Entry point of the subprocess: import, build, first call + 3 steps, print peak RSS as JSON."""
  job = json.loads(spec)
  use_device("cpu")
  cfg = peers.CONFIGS[job["config"]]
  peers.import_framework(job["impl"])
  baseline = _proc_status_mb("VmRSS")
  runner = peers.build(job["impl"], job["cell"], cfg, seed=job["seed"], donate=job["donate"],
                       threads=job["threads"])
  runner.run(1)
  runner.run(3)
  # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across
  # fork + exec, so a child of a large benchmark process would report the parent's peak.
  peak = _proc_status_mb("VmHWM")
  if math.isnan(peak):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KB on Linux
  print(json.dumps({"peak_rss_mb": peak, "peak_rss_delta_mb": peak - baseline,
                    "baseline_rss_mb": baseline}))


def measure_memory(cell: str, config: str, impl: str, args) -> dict:
  """Peak RSS of `impl` alone, from a fresh subprocess (see the module docstring)."""
  job = json.dumps({"cell": cell, "config": config, "impl": impl, "seed": args.seed,
                    "donate": args.donate, "threads": args.threads})
  try:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", job],
                          capture_output=True, text=True, timeout=900)
  except subprocess.TimeoutExpired:
    return {"error": "memory subprocess timed out"}
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode != 0 or not lines:
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"memory subprocess failed: {tail[:300]}"}
  return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------
# Reports.


def _cell_text(row, key, fmt):
  """One table cell: the formatted `row[key]`, or the row's status ("missing", "error", "—")."""
  if row is None:
    return "—"
  if row["status"] != "ok":
    return row["status"]
  value = row.get(key)
  if value is None:
    return "—"
  text = fmt.format(value)
  if key == "ms_per_step" and row.get("loss_check") not in (None, "ok"):
    text += " (!)"
  if key == "peak_rss_mb" and row.get("peak_rss_delta_mb") is not None:
    text += f" ({row['peak_rss_delta_mb']:.0f})"
  return text


def _device_lines(machine: dict) -> list[str]:
  """The accelerator lines of the report (none for a CPU run)."""
  if machine.get("device") != "cuda":
    return []
  return [f"- device: {machine.get('jax_device')} (JAX backend {machine.get('jax_backend')}); "
          f"PyTorch sees {machine.get('torch_device')}, CUDA {machine.get('torch_cuda')}, cuDNN "
          f"{machine.get('torch_cudnn')}",
          f"- float32 matmul precision: JAX default_matmul_precision="
          f"{machine.get('jax_default_matmul_precision')} (None = XLA's DEFAULT); PyTorch "
          f"cudnn.allow_tf32={machine.get('torch_cudnn_allow_tf32')}, "
          f"cuda.matmul.allow_tf32={machine.get('torch_matmul_allow_tf32')}"]


def markdown(report: dict, impls: list[str]) -> str:
  """The report as markdown: ms/step with the ratio, then GFLOP/s, tokens/s, first call, memory."""
  machine = report["machine"]
  results = report["results"]
  cases = []
  for row in results:
    if (row["cell"], row["config"]) not in cases:
      cases.append((row["cell"], row["config"]))
  by_key = {(r["cell"], r["config"], r["impl"]): r for r in results}
  summaries = {(s["cell"], s["config"]): s for s in report["summary"]}
  lines = [
      "# RNN training-step benchmark",
      "",
      f"- machine: {machine['cpu']}{_cpu_id_text(machine.get('cpu_id'))}, {machine['cores']} "
      f"cores; {machine['platform']}; "
      f"load average {machine.get('loadavg_start')} at start, {machine.get('loadavg_end')} at end",
      *_device_lines(machine),
      "- versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v),
      f"- JAX float32 {machine.get('matmul_n', 2048)}^3 matmul: {report['matmul_gflops']:.1f} "
      f"GFLOP/s{_peak_spread(report.get('matmul_gflops_samples', []))}",
      f"- protocol: {report['protocol']}",
      f"- host malloc (every implementation, same process): {machine.get('host_malloc')}",
      *([_native_line(machine["native_kernels"])] if "native_kernels" in machine else []),
      "- step = forward over the sequence + per-step readout + loss + BPTT + Adam(1e-3), float32.",
      "- GFLOP/s count matmul FLOPs only: 3 x 2 B T (G H (D + H) + H O), G = 1/4/3 for "
      "elman/lstm/gru.",
      "- ratio = ms(fastest peer) / ms(jaxrnn): > 1 means jaxrnn (manual BPTT) is faster.",
      "- steal % (Linux guests): the share of the CPUs' time the hypervisor took during the case "
      "(/proc/stat), every implementation's.",
      "- '(!)' marks an implementation whose loss did not decrease over the warm-up steps; "
      "'—' an implementation that does not exist for the cell.",
      "",
  ]

  steal = any(s.get("steal_pct") is not None for s in report["summary"])

  def table(title, key, fmt, with_ratio=False):
    header = ["cell", "config", *impls]
    if with_ratio:
      header += ["fastest peer", "ratio"] + (["steal %"] if steal else [])
    out = [f"## {title}", "", "| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for cell, config in cases:
      cells = [_cell_text(by_key.get((cell, config, impl)), key, fmt) for impl in impls]
      if with_ratio:
        s = summaries.get((cell, config), {})
        cells += [s.get("fastest_peer") or "—",
                  f"{s['ratio']:.2f}" if s.get("ratio") is not None else "—"]
        if steal:
          cells.append(f"{s['steal_pct']:.1f}" if s.get("steal_pct") is not None else "—")
      out.append("| " + " | ".join([cell, config, *cells]) + " |")
    return out + [""]

  lines += table("ms per step (median; lower is better)", "ms_per_step", "{:.2f}", True)
  lines += table("achieved GFLOP/s (matmul FLOPs)", "gflops", "{:.1f}")
  lines += table("tokens per second", "tokens_per_s", "{:,.0f}")
  lines += table("first call, s (trace + compile + first step)", "first_call_s", "{:.2f}")
  if any(r.get("peak_rss_mb") is not None for r in results):
    lines += table("peak RSS, MB, each alone in a subprocess (in parentheses: above the RSS "
                   "right after importing the framework)", "peak_rss_mb", "{:.0f}")
  problems = [r for r in results if r["status"] == "error" or r["loss_check"] not in (None, "ok")]
  if problems:
    lines += ["## problems", ""]
    lines += [f"- {r['cell']}/{r['config']} {r['impl']}: "
              f"{r['error'] or 'loss ' + str(r['loss_check'])}" for r in problems]
    lines.append("")
  lines += ["## implementations", ""]
  for impl in impls:
    notes = dict.fromkeys(r["note"] for r in results if r["impl"] == impl and r.get("note"))
    if notes:
      lines.append(f"- {impl}: " + "; ".join(notes))
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.host_malloc != "default" and argv is None:
    # Re-executes this command with the tunables (glibc reads them at start-up only); the
    # relaunched process and the memory subprocesses inherit them.
    host_memory.relaunch(args.host_malloc)
  if args.memory_child:
    memory_child(args.memory_child)
    return
  start = time.perf_counter()
  machine = machine_info()
  print(f"machine: {machine['cpu']}, {machine['cores']} cores, load {machine['loadavg_start']}",
        flush=True)
  load = machine["loadavg_start"]
  if load and load[0] > 0.5:
    print(f"warning: load average {load[0]:.1f} on {machine['cores']} cores before starting: other "
          "processes compete for the CPUs and the timings will be noisy (PyTorch's OpenMP threads "
          "suffer most: a 2-thread barrier waits for a descheduled thread).", flush=True)
  machine.update(use_device(args.device))
  print(f"device: {args.device}; JAX on {machine['jax_device']} ({machine['jax_backend']})",
        flush=True)
  # A GPU needs a bigger product to reach its rate; the CPU's 2048^3 is kept for comparability.
  matmul_n = 8192 if args.device == "cuda" else 2048
  machine["matmul_n"] = matmul_n
  peaks = []  # the matmul rate at the start and after each case

  def measure_peak():
    try:
      peaks.append(matmul_gflops(matmul_n))
      print(f"JAX float32 {matmul_n}^3 matmul: {peaks[-1]:.1f} GFLOP/s", flush=True)
    except Exception as exc:  # noqa: BLE001
      print(f"matmul benchmark failed: {_short_error(exc)}")

  measure_peak()
  warm_jax()
  if any(impl.startswith("jaxrnn") for impl in args.impls) and args.device == "cpu":
    machine["native_kernels"] = warm_native()
    print(_native_line(machine["native_kernels"])[2:], flush=True)
  if "torch" in args.impls:
    try:
      import torch
      torch.set_num_threads(args.threads)
      machine["torch_threads"] = torch.get_num_threads()
    except ImportError:
      pass

  results, summary = [], []

  def make_report(complete=False):
    return {
        "machine": machine,
        "matmul_gflops": statistics.median(peaks) if peaks else float("nan"),
        "matmul_gflops_samples": peaks,
        "protocol": (f"JAX warmed up first (warm_jax); {args.repeats} interleaved repeats of "
                     f"~{args.target_s} s per impl, each after {args.settle} untimed step(s), "
                     "median; "
                     f"{args.warmup} warm-up steps; donate={args.donate}; seed={args.seed}"),
        "complete": complete,
        "wall_s": time.perf_counter() - start,
        "results": results,
        "summary": summary,
    }

  for cell in args.cells:
    for config in args.configs:
      cfg = peers.CONFIGS[config]
      print(f"{cell}/{config} (B={cfg.batch} T={cfg.time} D={cfg.input} H={cfg.hidden} "
            f"O={cfg.output} {cfg.loss}; {peers.step_flops(cell, cfg) / 1e9:.2f} GFLOP/step)",
            flush=True)
      before = cpu_times()
      rows = bench_case(cell, config, args, log=lambda s: print(s, flush=True))
      results += rows
      if rows:
        s = summarize(rows)
        s["steal_pct"] = steal_pct(before, cpu_times())
        summary.append(s)
        if s["ratio"] is not None:
          steal = "" if s["steal_pct"] is None else f"; steal {s['steal_pct']:.1f}%"
          print(f"  jaxrnn {s['jaxrnn_ms']:.2f} ms/step; fastest peer {s['fastest_peer']} "
                f"{s['fastest_peer_ms']:.2f} ms/step; ratio {s['ratio']:.2f}{steal}", flush=True)
      measure_peak()
      if args.json:  # what is measured so far, in case the run is cut short
        _write(args.json, json.dumps(make_report(), indent=2))

  machine["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
  report = make_report(complete=True)
  text = markdown(report, args.impls)
  print()
  print(text)
  print(f"total {report['wall_s']:.0f} s")
  for path, content in ((args.json, json.dumps(report, indent=2)), (args.markdown, text)):
    if path:
      _write(path, content)


def _peak_spread(samples: list[float]) -> str:
  """How the matmul rate was measured through the run, for the markdown's header."""
  if len(samples) < 2:
    return ""
  return (f" (median of {len(samples)} measurements, at the start and after each case: "
          f"{min(samples):.1f}-{max(samples):.1f}; at the start {samples[0]:.1f})")


def _write(path: str, content: str) -> None:
  """Write `content` to `path` through a temporary file, so a reader never sees half of it."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(content if content.endswith("\n") else content + "\n")
  os.replace(tmp, path)


if __name__ == "__main__":
  main()
