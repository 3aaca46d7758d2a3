"""Host (CPU) memory: keep the memory XLA frees for the next training step instead of returning it.

On CPU, every execution of a jitted step allocates its temporary buffer (all residuals and
gradients: ~400 MB for the benchmark's large LSTM) with `malloc` and frees it at the end. With
glibc's defaults a block that large gets a fresh `mmap` and is handed back with `munmap` (blocks
from XLA's worker threads come from per-thread arenas, which cannot hold it at all), so every step
page-faults the whole buffer in again: measured on the project's 2-core box, 400 MB and ~150 ms of
kernel time per LSTM-large step, 64 MB and ~25 ms per GRU char-LM step.

`KEPT_MEMORY_ENV` is the glibc configuration that keeps freed memory in the process for reuse: one
arena (worker threads share the main heap, which can grow to any size), no `mmap` below 1 GiB, no
trimming of the heap's top below 2 GiB, 256 MB of padding when the heap grows. Measured
(experiments/PERF_NOTES.md): LSTM large 410 -> 317 ms per step and 100k -> 0 page faults, GRU
char-LM 50 -> 32 ms and 16k -> ~1-2k faults. The costs: the process keeps its peak heap size
between steps (which a training loop needs again at the next step anyway), and with one arena the
threads' small allocations contend: small shapes ran up to ~25% slower (LSTM B=1: 3.1 -> 3.9 ms).

glibc reads these settings when a process starts (threads pick their arena at their first
allocation, and NumPy's and XLA's thread pools allocate at import and start-up), so they cannot be
switched on reliably from inside a running program. Either start Python with them::

  MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647 \\
  MALLOC_TOP_PAD_=268435456 python train.py

or call `relaunch_with_kept_memory()` first thing in the script, which re-executes the same command
line with them set (a no-op when they already are, or off Linux). They change process-wide
allocator behaviour, so nothing in jaxrnn applies them unasked.
"""
from __future__ import annotations

import os
import sys

KEPT_MEMORY_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
    "MALLOC_TOP_PAD_": str(256 << 20),
}


def memory_is_kept(environ=None) -> bool:
  """Whether `environ` (default: this process's environment) has every `KEPT_MEMORY_ENV` setting."""
  environ = os.environ if environ is None else environ
  return all(environ.get(k) == v for k, v in KEPT_MEMORY_ENV.items())


def relaunch_with_kept_memory() -> None:
  """Re-execute this program's exact command line with `KEPT_MEMORY_ENV` added to its environment.

  Call it first thing in a script (it does not return when it relaunches). It returns at once when
  the settings are already in place or the platform is not Linux (glibc); the relaunched process
  sees them and returns at once too, so it never loops.
  """
  if memory_is_kept() or not sys.platform.startswith("linux"):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:],
            {**os.environ, **KEPT_MEMORY_ENV})
