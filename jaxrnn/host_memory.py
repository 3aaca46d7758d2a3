"""Host (CPU) memory: opt-in glibc settings for XLA's large per-step CPU buffers.

On CPU, every execution of a jitted step allocates its temporary buffer (all residuals and
gradients: ~400 MB for the benchmark's large LSTM) with `malloc` and frees it at the end. With
glibc's defaults a block that large gets a fresh `mmap` and is handed back with `munmap`, so every
step page-faults the whole buffer in again, 4 KB at a time: measured on the project's 2-core box,
100k faults and ~150 ms of kernel time per LSTM-large step (a third of the step), 16k faults and
~25 ms per GRU char-LM step.

`HUGE_PAGES_TUNABLE` asks glibc (2.35 or later) to `madvise` its memory for transparent huge pages
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`; `with_huge_pages` adds it to an environment), so the
same buffers fault in 2 MB at a time, 512 times fewer faults. Measured
(experiments/PERF_NOTES.md): LSTM large 410 -> 339 ms per step and 100k -> 650 faults, GRU
char-LM 50 -> 32 ms, small shapes unchanged, in a process training one model; in the benchmark's
long process, where nine frameworks' buffers come and go, it was erratic on the large shapes, so
measure it on your own job. It needs the kernel's transparent huge pages in `always` or `madvise`
mode (`/sys/kernel/mm/transparent_hugepage/enabled`; `madvise` is the usual default) and does
nothing otherwise.

`KEEP_HEAPS_TUNABLES` (mode "keep") keeps the freed memory in the process instead. Under
`jaxrnn.train.COMPILER_OPTIONS` XLA packs a step's temporaries in blocks under 32 MiB, which glibc
serves from its arenas' 64 MB heaps; but it deletes an arena's extra heaps as soon as they are
empty, and XLA allocates each step from the arena of whichever of its threads starts it, so some
steps map those heaps again and fault them in (a GRU large step: 21-33k faults, 251-334 ms against
217-245). The tunables fix the mmap threshold at 32 MiB (what glibc's dynamic threshold reaches
anyway; setting any of these turns the dynamic one off), keep 64 MB of top pad, which stops an
empty heap from being deleted, and trim only above 1 GiB: the faults stop after the first steps
(measured: experiments/PERF_NOTES.md). The process then holds on to its peak heap memory, as
caching allocators do. (The seventh session's `MALLOC_ARENA_MAX=1` variant removed the faults too,
but one malloc arena made small shapes up to 25% slower.)

glibc reads tunables when a process starts, so this cannot be switched on from inside a running
program (the "keep" settings made with `mallopt` in a running JAX process held only in part: the
faults came back in 2-3 of the 7 calls after the heaps first existed). Either start Python with
it::

  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python train.py

or call `relaunch_with_huge_pages()` (or `relaunch("keep")`) first thing in the script, which
re-executes the same command line with it set (a no-op when it already is, or off Linux). Both
change process-wide allocator behaviour, so nothing in jaxrnn applies them unasked.
"""
from __future__ import annotations

import os
import sys

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
KEEP_HEAPS_TUNABLES = ("glibc.malloc.mmap_threshold=33554432", "glibc.malloc.top_pad=67108864",
                       "glibc.malloc.trim_threshold=1073741824")
# The opt-in modes and the glibc tunables each sets.
MODES = {"hugepages": (HUGE_PAGES_TUNABLE,), "keep": KEEP_HEAPS_TUNABLES}


def _tunables(mode: str) -> tuple[str, ...]:
  if mode not in MODES:
    raise ValueError(f"mode must be one of {sorted(MODES)}; got {mode!r}.")
  return MODES[mode]


def requested(mode: str, environ=None) -> bool:
  """Whether `environ` (default: this process's environment) sets every tunable of `mode`
  ("hugepages" or "keep") in `GLIBC_TUNABLES`."""
  environ = os.environ if environ is None else environ
  present = environ.get("GLIBC_TUNABLES", "").split(":")
  return all(t in present for t in _tunables(mode))


def with_mode(mode: str, environ=None) -> dict:
  """A copy of `environ` (default: `os.environ`) with the tunables of `mode` added to any
  `GLIBC_TUNABLES` already there (a tunable of the same name is replaced), e.g. for a
  subprocess."""
  wanted = _tunables(mode)
  env = dict(os.environ if environ is None else environ)
  if not requested(mode, env):
    names = {t.split("=")[0] for t in wanted}
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":")
                if t and t.split("=")[0] not in names]
    env["GLIBC_TUNABLES"] = ":".join(tunables + list(wanted))
  return env


def relaunch(mode: str) -> None:
  """Re-execute this program's exact command line with the tunables of `mode` in its
  environment.

  Call it first thing in a script (it does not return when it relaunches). It returns at once when
  they are already set or the platform is not Linux (glibc); the relaunched process sees them and
  returns at once too, so it never loops.
  """
  if requested(mode) or not sys.platform.startswith("linux"):  # (requested checks `mode`)
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], with_mode(mode))


def huge_pages_requested(environ=None) -> bool:
  """`requested("hugepages", environ)`."""
  return requested("hugepages", environ)


def with_huge_pages(environ=None) -> dict:
  """`with_mode("hugepages", environ)`."""
  return with_mode("hugepages", environ)


def relaunch_with_huge_pages() -> None:
  """`relaunch("hugepages")`."""
  relaunch("hugepages")
