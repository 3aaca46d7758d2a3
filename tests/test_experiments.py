"""The experiment programs end to end: every `--quick` run in a subprocess, and bad-input errors.

The three quick runs start together (they are independent processes, so on 2 cores they overlap
compilation and Python overhead) and every test reads the run folder it left under `tmp_path`.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {name: REPO / "experiments" / f"{name}.py"
           for name in ("timeseries", "memory", "gradflow")}
OUTPUTS = {
    "timeseries": ("config.json", "metrics.json", "results.md", "curves.png", "forecasts.png",
                   "nrmse.png"),
    "memory": ("config.json", "metrics.json", "results.md", "adding_curves.png", "copy_curves.png",
               "summary.png"),
    "gradflow": ("config.json", "metrics.json", "results.md", "gradnorm.png", "spectral.png",
                 "clipping.png"),
}
QUICK_TIMEOUT_S = 240  # generous: the machine is shared; each run alone takes well under a minute


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)
  return env


def _start(name, *args):
  return subprocess.Popen([sys.executable, str(SCRIPTS[name]), *args], cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
  """`{name: run_dir}` after every experiment's `--quick` run has finished successfully."""
  out = tmp_path_factory.mktemp("experiments")
  procs = {name: _start(name, "--quick", "--no-progress", "--out", str(out / name))
           for name in SCRIPTS}
  dirs = {}
  for name, proc in procs.items():
    stdout, stderr = proc.communicate(timeout=QUICK_TIMEOUT_S)
    assert proc.returncode == 0, f"{name} --quick failed:\n{stdout}\n{stderr}"
    runs = sorted((out / name).iterdir())
    assert len(runs) == 1, runs
    dirs[name] = runs[0]
  return dirs


def _numbers(obj, path=""):
  """Every number in a JSON document, with its path."""
  if isinstance(obj, dict):
    for k, v in obj.items():
      yield from _numbers(v, f"{path}.{k}")
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      yield from _numbers(v, f"{path}[{i}]")
  elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
    yield path, obj


def _metrics(run_dir):
  return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_quick_run_writes_every_output(quick_runs, name):
  run_dir = quick_runs[name]
  for file in OUTPUTS[name]:
    assert (run_dir / file).is_file() and (run_dir / file).stat().st_size > 0, file
  assert _metrics(run_dir)["complete"] is True
  json.loads((run_dir / "config.json").read_text())


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_quick_run_metrics_are_finite(quick_runs, name):
  metrics = _metrics(quick_runs[name])
  # The unclipped SGD run of the clipping study is allowed to diverge: that is what it shows.
  bad = [p for p, v in _numbers(metrics)
         if not math.isfinite(v) and not p.startswith(".clipping.no clipping")]
  assert not bad, bad[:10]


def test_timeseries_learns_and_reports_nrmse(quick_runs):
  metrics = _metrics(quick_runs["timeseries"])
  assert {(r["dataset"], r["cell"]) for r in metrics["results"]} == {
      (d, c) for d in ("sines", "mackey") for c in ("elman", "lstm", "gru")}
  for r in metrics["results"]:
    assert r["curve"][-1][1] < r["curve"][0][1], (r["dataset"], r["cell"])
    assert len(r["closed_loop_nrmse"]) == 50      # --quick forecasts 50 steps
    assert r["one_step_nrmse"] < 1.0               # better than predicting the mean
  for name, curve in metrics["persistence_nrmse"].items():
    assert len(curve) == 50, name


def test_memory_learns_and_compares_with_baseline(quick_runs):
  metrics = _metrics(quick_runs["memory"])
  assert {r["model"] for r in metrics["results"]} == {"tanh", "irnn", "lstm", "gru"}
  assert {r["task"] for r in metrics["results"]} == {"adding", "copy"}
  for r in metrics["results"]:
    assert r["curve"][-1][1] < r["curve"][0][1], (r["task"], r["model"])
    assert r["test"] < r["test_start"], (r["task"], r["model"])
    assert not r["diverged"]
    assert r["solved"] == (r["test"] < 0.1 * r["baseline"])
    if r["task"] == "adding":
      assert r["baseline"] == pytest.approx(1 / 6)
    else:
      assert r["baseline"] == pytest.approx(10 * math.log(8) / (r["T"] + 20))


def test_gradflow_cross_check_and_learning(quick_runs):
  metrics = _metrics(quick_runs["gradflow"])
  check = metrics["cross_check"]
  assert check["passed"] and check["max_rel_err"] < 1e-8, check
  for name, entry in metrics["models"].items():
    for state in ("untrained", "trained"):
      assert entry[state]["cross_check_rel_err"] < 1e-8, (name, state)
      rel = entry[state]["relative_norm"]
      assert rel[0] == pytest.approx(1.0) and len(rel) == 31  # T - t = 0..T with --quick's T=30
    curve = entry["train"]["loss_curve"]
    assert curve[-1] < curve[0], name
  # Below, at and above 1: the tanh net's gradients vanish at s = 0.5 and grow at s = 1.5.
  assert metrics["models"]["tanh s=0.5"]["untrained"]["growth_per_step"] < 0.7
  assert metrics["models"]["tanh s=1.5"]["untrained"]["growth_per_step"] > 1.0
  clipped = metrics["clipping"]["clip_by_global_norm(1)"]["history"]
  assert clipped[-1][0] < clipped[0][0]


BAD_INPUTS = [
    ("timeseries", ["--cells", "elman,transformer"], "transformer"),
    ("timeseries", ["--steps", "-5"], "--steps"),
    ("memory", ["--models", "lstm,bogus"], "bogus"),
    ("memory", ["--adding-lengths", "50,abc"], "--adding-lengths"),
    ("gradflow", ["--cells", "rnn"], "rnn"),
    ("gradflow", ["--scales", "1.0,-2"], "--scales"),
    ("gradflow", ["--length", "ten"], "ten"),
]


def test_bad_inputs_fail_with_one_line(tmp_path):
  procs = [(name, args, word, _start(name, *args, "--out", str(tmp_path)))
           for name, args, word in BAD_INPUTS]
  for name, args, word, proc in procs:
    stdout, stderr = proc.communicate(timeout=QUICK_TIMEOUT_S)
    lines = stderr.strip().splitlines()
    assert proc.returncode != 0, (name, args)
    assert "Traceback" not in stderr, (name, args, stderr)
    assert len(lines) == 1 and lines[0].startswith("error:"), (name, args, stderr)
    assert word in lines[0], (name, args, lines[0])
  assert not any(tmp_path.iterdir()), "a failed run must not leave a run folder"


@pytest.mark.slow
def test_memory_with_the_linear_cell_on_two_devices(tmp_path):
  """minGRU in the long-range memory task, trained data-parallel over 2 virtual CPU devices."""
  env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, str(SCRIPTS["memory"]), "--quick", "--no-progress",
                         "--models", "mingru", "--devices", "2", "--out", str(tmp_path)],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (run,) = list(tmp_path.iterdir())
  results = _metrics(run)["results"]
  assert {r["model"] for r in results} == {"mingru"}
  for r in results:
    assert r["test"] < r["test_start"] and math.isfinite(r["test"]), (r["task"], r["T"])
