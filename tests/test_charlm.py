"""experiments/charlm.py: a quick training run end to end, sampling, and clean failures.

One `--quick` training run (a subprocess, as a user runs it) is shared by the whole module. Bad
inputs are checked in-process through `common.run_main` (exit status 2, one `error:` line, no
traceback: any other exception fails the test), and a few of them again as real subprocesses.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "charlm.py"
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from experiments import charlm, common  # noqa: E402
from jaxrnn import checkpoint  # noqa: E402


def run_script(*args, timeout=120):
  return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                        text=True, timeout=timeout, cwd=REPO)


def snapshot(folder: Path) -> dict:
  """{relative path: (size, mtime_ns, md5)} of every file under `folder`."""
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.md5(p.read_bytes()).hexdigest())
          for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  """The run folder of one `charlm.py --quick` training run."""
  out = tmp_path_factory.mktemp("charlm_runs")
  proc = run_script("--quick", "--no-progress", "--out", out)
  assert proc.returncode == 0, proc.stderr[-2000:]
  runs = list(out.iterdir())
  assert len(runs) == 1, runs
  return runs[0]


def vocab_of(run_dir: Path) -> str:
  return json.loads((run_dir / "config.json").read_text())["model"]["vocab"]


def checkpoints(run_dir: Path) -> list[Path]:
  return sorted((run_dir / "checkpoints").glob("ckpt-*.safetensors"))


def test_quick_run_writes_every_output(quick_run):
  for name in ("config.json", "metrics.json", "curves.png", "sample.txt"):
    assert (quick_run / name).is_file() and (quick_run / name).stat().st_size > 0, name
  assert (quick_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert checkpoints(quick_run)
  config = json.loads((quick_run / "config.json").read_text())
  assert config["model"]["model"] == charlm.MODEL_TAG
  assert config["model"]["vocab"] == "".join(sorted(set(charlm.DEFAULT_CORPUS.read_text())))


def test_quick_run_learns(quick_run):
  metrics = json.loads((quick_run / "metrics.json").read_text())
  train = metrics["train"]
  losses = np.asarray(train["loss"])
  assert len(losses) == metrics["summary"]["steps"] > 0
  assert np.all(np.isfinite(losses)) and np.all(np.isfinite(train["lr"]))
  assert train["chars_seen"] == sorted(train["chars_seen"])
  assert losses[-10:].mean() < losses[:10].mean() - 0.3
  evals = metrics["evals"]
  assert len(evals) >= 2
  for e in evals:
    assert math.isfinite(e["val_loss"]) and math.isclose(e["val_bpc"], e["val_loss"] / math.log(2))
    assert e["wall_s"] >= 0 and e["chars_seen"] >= 0
  assert evals[-1]["val_loss"] < evals[0]["val_loss"]
  summary = metrics["summary"]
  for name in ("final_val_loss", "best_val_loss", "train_s", "chars_per_s"):
    assert math.isfinite(summary[name]), name
  assert summary["best_val_loss"] <= summary["final_val_loss"]
  assert (quick_run / summary["best_checkpoint"]).is_file()
  assert (quick_run / summary["last_checkpoint"]).is_file()


def test_quick_run_sample_uses_vocabulary(quick_run):
  text = (quick_run / "sample.txt").read_text(encoding="utf-8").rstrip("\n")
  assert len(text) > 100
  assert set(text) <= set(vocab_of(quick_run))


def test_sample_subcommand(quick_run, tmp_path):
  out = tmp_path / "sample.txt"
  proc = run_script("sample", "--checkpoint", quick_run, "--length", 80, "--prompt", "ROMEO:",
                    "--top-k", 5, "--output", out)
  assert proc.returncode == 0, proc.stderr
  text = out.read_text(encoding="utf-8").rstrip("\n")
  assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 80
  assert set(text) <= set(vocab_of(quick_run))
  assert text in proc.stdout


def test_sampler_in_process(quick_run):
  """Greedy decoding is deterministic; a checkpoint file works as well as a run folder."""
  model, config, params, file = charlm.load_model(checkpoints(quick_run)[-1])
  assert file == checkpoints(quick_run)[-1]
  sampler = charlm.make_sampler(model)
  gen = lambda seed, t, k: charlm.generate(sampler, params, config["vocab"], "", length=40,
                                           temperature=t, top_k=k,
                                           key=charlm.jax.random.key(seed))
  assert gen(0, 0.0, 0) == gen(1, 0.0, 0)          # greedy ignores the key
  assert gen(0, 1.0, 1) == gen(0, 0.0, 0)          # top-1 is greedy
  assert len(gen(0, 1.0, 0)) == 40 and set(gen(0, 1.0, 0)) <= set(config["vocab"])


# ------------------------------------------------------------------------------------------------
# Bad inputs.


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, quick_run):
  d = tmp_path_factory.mktemp("bad")
  (d / "empty.txt").write_bytes(b"")
  (d / "nul.txt").write_bytes(b"hello\x00world\n" * 100)
  (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 100)
  source = checkpoints(quick_run)[-1]
  data = bytearray(source.read_bytes())
  data[-5] ^= 0xFF                                   # a flipped bit in the array data
  (d / "corrupt.safetensors").write_bytes(bytes(data))
  (d / "truncated.safetensors").write_bytes(source.read_bytes()[:1000])
  other = {"w": np.zeros((3, 2), np.float32)}
  checkpoint.save(d / "other.safetensors", checkpoint.Checkpoint(
      other, {"m": np.zeros(2, np.float32)}, step=1, config={"model": "sine", "hidden": 8}))
  charlm_config = checkpoint.verify(source).config
  checkpoint.save(d / "mismatch.safetensors", checkpoint.Checkpoint(
      other, {"m": np.zeros(2, np.float32)}, step=1, config=charlm_config))
  (d / "existing.txt").write_text("keep me\n")
  return d


TRAIN_ERRORS = {
    "missing corpus": (["--corpus", "{d}/nope.txt"], "not found"),
    "empty corpus": (["--corpus", "{d}/empty.txt"], "empty"),
    "binary corpus": (["--corpus", "{d}/nul.txt"], "binary"),
    "non-UTF-8 corpus": (["--corpus", "{d}/latin1.txt"], "UTF-8"),
    "corpus is a folder": (["--corpus", "{d}"], "not a regular file"),
    "unknown cell": (["--cell", "transformer"], "--cell"),
    "unknown mode": (["--mode", "bptt"], "--mode"),
    "zero steps": (["--steps", "0"], "--steps"),
    "negative steps": (["--steps", "-5"], "--steps"),
    "zero minutes": (["--minutes", "0"], "--minutes"),
    "negative minutes": (["--minutes", "-1"], "--minutes"),
    "steps not a number": (["--steps", "many"], "--steps"),
    "bad dropout": (["--dropout", "1.5"], "--dropout"),
    "devices do not divide batch": (["--devices", "3"], "--batch 16 must be a multiple"),
    "devices with tbptt": (["--devices", "1", "--mode", "tbptt"], "--devices needs --mode windows"),
    "unknown host malloc": (["--host-malloc", "jemalloc"], "--host-malloc"),
    "unknown matmul dtype": (["--matmul-dtype", "float8"], "--matmul-dtype"),
}
SAMPLE_ERRORS = {
    "missing checkpoint": (["--checkpoint", "{d}/nope.safetensors"], "not found"),
    "corrupt checkpoint": (["--checkpoint", "{d}/corrupt.safetensors"], "corrupted"),
    "truncated checkpoint": (["--checkpoint", "{d}/truncated.safetensors"], "truncated"),
    "other model's checkpoint": (["--checkpoint", "{d}/other.safetensors"], "not a charlm"),
    "params do not match config": (["--checkpoint", "{d}/mismatch.safetensors"], "match"),
    "empty run folder": (["--checkpoint", "{d}"], "no intact checkpoint"),
    "prompt outside vocabulary": (["--checkpoint", "{run}", "--prompt", "\u00e9t\u00e9"],
                                  "vocabulary"),
    "negative temperature": (["--checkpoint", "{run}", "--temperature", "-1"], "--temperature"),
    "output exists": (["--checkpoint", "{run}", "--output", "{d}/existing.txt"], "exists"),
}


def fill(args, d, run):
  return [a.format(d=d, run=run) for a in args]


def assert_one_line_error(status, err: str, expected: str):
  assert status == 2
  assert "Traceback" not in err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert expected in lines[0], lines[0]


def run_in_process(argv, capsys):
  with pytest.raises(SystemExit) as exc:
    common.run_main(lambda: charlm.main(argv))
  return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(TRAIN_ERRORS))
def test_train_bad_input(case, bad_files, quick_run, tmp_path, capsys):
  args, expected = TRAIN_ERRORS[case]
  out = tmp_path / "runs"
  before = snapshot(quick_run)
  status, err = run_in_process(["train", *fill(args, bad_files, quick_run), "--quick",
                                "--no-progress", "--out", str(out)], capsys)
  assert_one_line_error(status, err, expected)
  assert not out.exists()                    # no run folder is created for a bad input
  assert snapshot(quick_run) == before


@pytest.mark.parametrize("case", sorted(SAMPLE_ERRORS))
def test_sample_bad_input(case, bad_files, quick_run, capsys):
  args, expected = SAMPLE_ERRORS[case]
  before = snapshot(quick_run), snapshot(bad_files)
  status, err = run_in_process(["sample", *fill(args, bad_files, quick_run), "--length", "5"],
                               capsys)
  assert_one_line_error(status, err, expected)
  assert (snapshot(quick_run), snapshot(bad_files)) == before
  assert (bad_files / "existing.txt").read_text() == "keep me\n"


@pytest.mark.parametrize("args, expected", [
    (["--corpus", "{d}/nul.txt"], "binary"),
    (["--cell", "transformer"], "--cell"),
    (["sample", "--checkpoint", "{d}/corrupt.safetensors"], "corrupted"),
], ids=["binary corpus", "unknown cell", "corrupt checkpoint"])
def test_bad_input_subprocess(args, expected, bad_files, quick_run, tmp_path):
  """The same failures as a user sees them: exit status 2, one line, no traceback."""
  before = snapshot(quick_run)
  proc = run_script(*fill(args, bad_files, quick_run), "--out", tmp_path / "runs") \
      if args[0] != "sample" else run_script(*fill(args, bad_files, quick_run))
  assert_one_line_error(proc.returncode, proc.stderr, expected)
  assert proc.stdout == ""
  assert not (tmp_path / "runs").exists()
  assert snapshot(quick_run) == before


@pytest.mark.slow
def test_quick_run_on_two_devices(tmp_path):
  """`--devices 2` trains data-parallel over 2 (virtual CPU) devices and still learns."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-progress", "--devices", "2",
                         "--cell", "mingru", "--out", str(tmp_path)], capture_output=True,
                        text=True, timeout=180, cwd=REPO, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (run,) = list(tmp_path.iterdir())
  metrics = json.loads((run / "metrics.json").read_text())
  losses = metrics["train"]["loss"]
  assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5])


def test_host_malloc_hugepages_relaunches_the_script(tmp_path):
  """As a script, `--host-malloc hugepages` re-executes itself with the glibc tunable (train()
  refuses to run without it, so a run that finishes had it) and records the setting."""
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-progress", "--steps", "3",
                         "--sample-length", "5", "--host-malloc", "hugepages", "--out",
                         str(tmp_path)], capture_output=True, text=True, timeout=180, cwd=REPO,
                        env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (run,) = list(tmp_path.iterdir())
  assert json.loads((run / "config.json").read_text())["training"]["host_malloc"] == "hugepages"


def test_host_malloc_hugepages_in_process_without_the_tunable(monkeypatch, tmp_path, capsys):
  """Called as a function (no relaunch possible), the option fails clearly before any work."""
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  out = tmp_path / "runs"
  status, err = run_in_process(["--quick", "--no-progress", "--host-malloc", "hugepages",
                                "--out", str(out)], capsys)
  assert_one_line_error(status, err, "GLIBC_TUNABLES=glibc.malloc.hugetlb=1")
  assert not out.exists()
  status, err = run_in_process(["--quick", "--no-progress", "--host-malloc", "keep",
                                "--out", str(out)], capsys)
  assert_one_line_error(status, err, "--host-malloc keep needs the process started with "
                        "GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:")
  assert not out.exists()


@pytest.mark.parametrize("argv, expected", [
    ([], "default"), (["--host-malloc", "hugepages"], "hugepages"),
    (["train", "--cell", "gru", "--host-malloc=hugepages"], "hugepages"),
    (["sample", "--checkpoint", "x", "--host-malloc", "hugepages"], "default"),
    (["--host-malloc", "default", "--quick"], "default"),
    (["--quick", "--host-malloc", "keep"], "keep"),
])
def test_host_malloc_of(argv, expected):
  assert charlm.host_malloc_of(argv) == expected


def test_bfloat16_matmuls_train(tmp_path):
  """`--matmul-dtype bfloat16` trains (finite, falling loss), evaluates, and is recorded."""
  proc = run_script("--quick", "--no-progress", "--steps", "30", "--sample-length", "5",
                    "--matmul-dtype", "bfloat16", "--out", tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (run,) = list(tmp_path.iterdir())
  assert json.loads((run / "config.json").read_text())["training"]["matmul_dtype"] == "bfloat16"
  losses = json.loads((run / "metrics.json").read_text())["train"]["loss"]
  assert np.isfinite(losses).all() and np.mean(losses[-5:]) < np.mean(losses[:5])
