"""Host (CPU) memory: back XLA's large per-step buffers with transparent huge pages.

On CPU, every execution of a jitted step allocates its temporary buffer (all residuals and
gradients: ~400 MB for the benchmark's large LSTM) with `malloc` and frees it at the end. With
glibc's defaults a block that large gets a fresh `mmap` and is handed back with `munmap`, so every
step page-faults the whole buffer in again, 4 KB at a time: measured on the project's 2-core box,
100k faults and ~150 ms of kernel time per LSTM-large step (a third of the step), 16k faults and
~25 ms per GRU char-LM step.

`HUGE_PAGES_TUNABLE` asks glibc (2.35 or later) to `madvise` its memory for transparent huge pages
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`; `with_huge_pages` adds it to an environment), so the
same buffers fault in 2 MB at a time, 512 times fewer faults. Measured (experiments/PERF_NOTES.md): LSTM large 410 -> 339 ms per step and
100k -> 650 faults, GRU char-LM 50 -> 32 ms, small shapes unchanged, in a process training one
model; in the benchmark's long process, where nine frameworks' buffers come and go, it was erratic
on the large shapes, so measure it on your own job. It needs the kernel's
transparent huge pages in `always` or `madvise` mode (`/sys/kernel/mm/transparent_hugepage/enabled`;
`madvise` is the usual default) and does nothing otherwise.

(Keeping the freed memory in the process instead — `MALLOC_ARENA_MAX=1` with large mmap and trim
thresholds — removed the faults as well, but one malloc arena made small shapes up to 25% slower;
see the notes.)

glibc reads tunables when a process starts, so this cannot be switched on from inside a running
program. Either start Python with it::

  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py

or call `relaunch_with_huge_pages()` first thing in the script, which re-executes the same command
line with it set (a no-op when it already is, or off Linux). It changes process-wide allocator
behaviour, so nothing in jaxrnn applies it unasked.
"""
from __future__ import annotations

import os
import sys

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def huge_pages_requested(environ=None) -> bool:
  """Whether `environ` (default: this process's environment) sets `HUGE_PAGES_TUNABLE`."""
  environ = os.environ if environ is None else environ
  return HUGE_PAGES_TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")


def with_huge_pages(environ=None) -> dict:
  """A copy of `environ` (default: `os.environ`) with `HUGE_PAGES_TUNABLE` added to any
  `GLIBC_TUNABLES` already there (e.g. for a subprocess)."""
  env = dict(os.environ if environ is None else environ)
  if not huge_pages_requested(env):
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":")
                if t and not t.startswith("glibc.malloc.hugetlb=")]
    env["GLIBC_TUNABLES"] = ":".join(tunables + [HUGE_PAGES_TUNABLE])
  return env


def relaunch_with_huge_pages() -> None:
  """Re-execute this program's exact command line with `HUGE_PAGES_TUNABLE` in its environment.

  Call it first thing in a script (it does not return when it relaunches). It returns at once when
  the tunable is already set or the platform is not Linux (glibc); the relaunched process sees it
  and returns at once too, so it never loops.
  """
  if huge_pages_requested() or not sys.platform.startswith("linux"):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], with_huge_pages())
