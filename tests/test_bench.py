"""The benchmark script's contract (issue 4): its JSON schema, subsets, devices, missing peers."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "experiments", "bench", "bench.py")
sys.path.insert(0, os.path.join(ROOT, "experiments", "bench"))
import peers  # noqa: E402


def _run(*args, timeout=300):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, BENCH, *args], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=ROOT)


def test_tiny_run_writes_the_documented_json(tmp_path):
  out = tmp_path / "bench.json"
  md = tmp_path / "bench.md"
  done = _run("--cells", "elman,lstm", "--configs", "tiny", "--impls", "jaxrnn,jaxrnn-autodiff",
              "--repeats", "2", "--target-s", "0.01", "--warmup", "2", "--json", str(out),
              "--markdown", str(md))
  assert done.returncode == 0, done.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report["complete"] is True
  assert report["machine"]["device"] == "cpu" and report["machine"]["jax_backend"] == "cpu"
  # The matmul rate at the start and after each of the two cases; the reported one their median.
  samples = report["matmul_gflops_samples"]
  assert len(samples) == 3 and min(samples) > 0
  assert report["matmul_gflops"] == sorted(samples)[1]
  assert (f"matmul: {sorted(samples)[1]:.1f} GFLOP/s (median of 3 measurements, at the start and "
          f"after each case: {min(samples):.1f}-{max(samples):.1f}; at the start "
          f"{samples[0]:.1f})") in md.read_text()
  rows = report["results"]
  assert sorted((r["cell"], r["impl"]) for r in rows) == [
      ("elman", "jaxrnn"), ("elman", "jaxrnn-autodiff"), ("lstm", "jaxrnn"),
      ("lstm", "jaxrnn-autodiff")]
  for r in rows:
    assert r["status"] == "ok" and r["config"] == "tiny"
    assert {"ms_per_step", "tokens_per_s", "first_call_s", "peak_rss_mb"} <= set(r)
    assert r["ms_per_step"] > 0 and r["first_call_s"] > 0
    # tokens/s is B T per step over the measured time (tiny: B=2, T=8).
    assert r["tokens_per_s"] == pytest.approx(16 / (r["ms_per_step"] / 1e3), rel=1e-9)
    assert len(r["ms_per_step_repeats"]) == 2
    assert r["loss_check"] == "ok"
  assert "| elman | tiny |" in md.read_text()
  # The native kernels are loaded (or built) before the first case, and that is reported apart.
  native = report["machine"]["native_kernels"]
  assert native["available"] is True and native["error"] is None
  assert os.path.isfile(native["path"]) and native["load_s"] >= 0
  assert native["built_s"] is None or native["built_s"] > 0
  assert "- native kernels: " in md.read_text() and "before the first case" in md.read_text()
  if os.path.exists("/proc/stat"):  # each case's steal time, a column of the ms table
    assert all(0 <= s["steal_pct"] <= 100 for s in report["summary"])
    assert "| fastest peer | ratio | steal % |" in md.read_text()
  if os.path.exists("/proc/cpuinfo"):  # the CPU's generation, which a VM's model name may hide
    with open("/proc/cpuinfo") as f:
      family = next(line.split(":")[1].strip() for line in f if line.startswith("cpu family"))
    assert report["machine"]["cpu_id"]["family"] == family
    assert f"family {family} model" in md.read_text()


def test_device_cuda_needs_a_gpu_backend():
  import jax
  done = _run("--device", "cuda", "--cells", "elman", "--configs", "tiny", "--impls", "jaxrnn",
              "--repeats", "1", "--target-s", "0.01", "--warmup", "1")
  if jax.default_backend() == "gpu":  # a developer's GPU machine: the run goes through
    assert done.returncode == 0, done.stderr[-2000:]
  else:  # CI and this project's machines: a clear error before any work
    assert done.returncode != 0
    assert "--device cuda: JAX's default backend is 'cpu'" in done.stderr + done.stdout
    assert "matmul" not in done.stdout


def test_device_and_subset_arguments_are_checked():
  done = _run("--device", "tpu")
  assert done.returncode != 0 and "--device" in done.stderr
  done = _run("--cells", "elman,transformer")
  assert done.returncode != 0 and "unknown ['transformer']" in done.stderr + done.stdout
  with pytest.raises(ValueError, match="device must be one of"):
    peers.build("jaxrnn", "elman", peers.CONFIGS["tiny"], device="tpu")


def test_a_missing_framework_is_reported_not_raised(monkeypatch):
  monkeypatch.setitem(peers.REQUIREMENTS, "haiku", ("a_module_that_is_not_installed",))
  with pytest.raises(peers.Missing, match="a_module_that_is_not_installed is not installed"):
    peers.build("haiku", "elman", peers.CONFIGS["tiny"])


def test_loss_options_reach_the_jaxrnn_step_only():
  runner = peers.build("jaxrnn", "gru", peers.CONFIGS["tiny"], loss_options={"unroll": 2})
  assert "unroll=2" in runner.note
  first, second = float(runner.run(1)), float(runner.run(3))
  assert second < first                      # it trains
  with pytest.raises(ValueError, match="loss_options apply to"):
    peers.build("haiku", "gru", peers.CONFIGS["tiny"], loss_options={"unroll": 2})


def test_first_call_comparison_in_fresh_processes():
  import first_call
  rows = first_call.compare_peers(["elman"], ["tiny"], 1, ["jaxrnn", "flax-nnx"])
  assert sorted(r["impl"] for r in rows) == ["flax-nnx", "jaxrnn"]
  assert all(r["first_call_s"] > 0 and r["device"] == "cpu" for r in rows)


def test_each_repeat_times_its_steps_after_the_untimed_settle_steps():
  """`--settle`: the untimed steps run first and are not in the timed seconds (the first step
  after another implementation pays for the switch)."""
  import time
  import bench

  class Runner:
    def __init__(self):
      self.calls = []

    def run(self, n):
      self.calls.append(n)
      time.sleep(0.2 if len(self.calls) == 1 else 0.001 * n)  # a slow first call

  runner = Runner()
  seconds = bench._timed_run(runner, 5, settle=1)
  assert runner.calls == [1, 5]
  assert seconds < 0.15
  runner = Runner()
  assert bench._timed_run(runner, 5) >= 0.2 and runner.calls == [5]  # settle=0: timed as is


def test_jax_is_warmed_up_before_the_first_implementation_is_built(monkeypatch, tmp_path):
  """JAX's process-wide first-use costs must fall on no implementation's first call: `warm_jax`
  runs (and compiles a scan's gradient) before the first case."""
  import bench
  events = []
  real_warm = bench.warm_jax
  monkeypatch.setattr(bench, "matmul_gflops", lambda n: 1.0)
  monkeypatch.setattr(bench, "warm_jax", lambda: (real_warm(), events.append("warm")))
  real_native = bench.warm_native
  monkeypatch.setattr(bench, "warm_native", lambda: events.append("native") or real_native())
  monkeypatch.setattr(bench, "bench_case",
                      lambda cell, config, args, log=print: events.append((cell, config)) or [])
  bench.main(["--cells", "elman,gru", "--configs", "tiny", "--impls", "jaxrnn",
              "--json", str(tmp_path / "b.json")])
  # The native kernels too: their once-per-machine build is reported apart, in no first call.
  assert events == ["warm", "native", ("elman", "tiny"), ("gru", "tiny")]
  events.clear()
  bench.main(["--cells", "elman", "--configs", "tiny", "--impls", "haiku",
              "--json", str(tmp_path / "c.json")])
  assert events == ["warm", ("elman", "tiny")]  # no jaxrnn implementation: nothing to load


def test_steal_time_is_the_hypervisors_share_of_the_cpus_time_between_two_readings(tmp_path):
  import bench
  assert bench.steal_pct({"total": 1000, "steal": 10}, {"total": 1400, "steal": 30}) == 5.0
  assert bench.steal_pct({"total": 1000, "steal": 10}, {"total": 1000, "steal": 10}) is None
  assert bench.steal_pct(None, {"total": 1, "steal": 0}) is None
  # /proc/stat's first line: user nice system idle iowait irq softirq steal guest guest_nice,
  # where guest time is already counted in user.
  stat = tmp_path / "stat"
  stat.write_text("cpu  100 1 20 300 4 0 5 7 50 0\ncpu0 50 0 10 150 2 0 3 4 25 0\n")
  assert bench.cpu_times(str(stat)) == {"total": 437, "steal": 7}
  assert bench.cpu_times(str(tmp_path / "missing")) is None


def test_first_calls_run_after_a_collection_with_the_collector_off(monkeypatch):
  """A garbage collection owed by every implementation's build must not land in one first call:
  each first call runs right after `gc.collect()`, with the collector disabled."""
  import gc
  import bench
  seen = []

  class Runner:
    note = None

    def __init__(self):
      self.losses = iter(range(100, 0, -1))
      self.calls = 0

    def run(self, n):
      if self.calls == 0:  # the first call
        seen.append((self, gc.isenabled(), gc.get_count()[0]))
      self.calls += 1
      return float(next(self.losses))

  runners = {}
  monkeypatch.setattr(bench.peers, "build",
                      lambda impl, *a, **k: runners.setdefault(impl, Runner()))
  args = bench.parse_args(["--impls", "jaxrnn,haiku", "--configs", "tiny", "--repeats", "1",
                           "--target-s", "0.001", "--warmup", "1"])
  bench.bench_case("elman", "tiny", args, log=lambda s: None)
  assert [r for r, _, _ in seen] == [runners["jaxrnn"], runners["haiku"]]
  assert all(not enabled and young < 50 for _, enabled, young in seen), seen
  assert gc.isenabled()


def test_the_report_names_the_host_malloc_mode(monkeypatch):
  import bench
  from jaxrnn import host_memory
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  assert bench._host_malloc_text() == "glibc defaults"
  monkeypatch.setenv("GLIBC_TUNABLES", ":".join(host_memory.KEEP_HEAPS_TUNABLES))
  assert bench._host_malloc_text().startswith("kept heaps (GLIBC_TUNABLES=glibc.malloc.mmap_")
  monkeypatch.setenv("GLIBC_TUNABLES", host_memory.HUGE_PAGES_TUNABLE)
  assert bench._host_malloc_text() == "huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)"
  assert bench.parse_args(["--host-malloc", "keep"]).host_malloc == "keep"
