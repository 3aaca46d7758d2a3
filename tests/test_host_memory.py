"""jaxrnn.host_memory: with huge pages, XLA's big buffers fault in 2 MB at a time; with kept heaps,
not again at every call."""
import os
import subprocess
import sys
import textwrap

import pytest

from jaxrnn import host_memory

# A jitted function with 64 MB temporary buffers (the sorted copy of a 16M-element array), called
# 6 times; prints the minor page faults of the last 5 calls. With argv[1] == "relaunch" it first
# calls relaunch_with_huge_pages() (which re-executes this same command with the tunable).
_CHILD = textwrap.dedent("""
    import os, resource, sys
    import jaxrnn.host_memory as hm
    if sys.argv[1] == "relaunch":
      hm.relaunch_with_huge_pages()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda a: jnp.sort(a * 2.0)[::1024].sum())
    a = jnp.linspace(0.0, 1.0, 16 << 20, dtype=jnp.float32)
    f(a).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
      f(a).block_until_ready()
    print(hm.huge_pages_requested(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _run_child(mode: str) -> tuple[bool, int]:
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True,
                       timeout=300, check=True, env=env)
  requested, faults = out.stdout.strip().splitlines()[-1].split()
  return requested == "True", int(faults)


def _thp_mode() -> str:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return f.read().split("[")[1].split("]")[0]
  except (OSError, IndexError):
    return "unavailable"


@pytest.mark.skipif(not sys.platform.startswith("linux") or _thp_mode() == "never",
                    reason="needs glibc and transparent huge pages (a documented no-op otherwise)")
def test_relaunched_process_faults_its_buffers_in_with_huge_pages():
  pages_per_call = (64 << 20) // 4096
  requested_default, default = _run_child("default")
  requested, relaunched = _run_child("relaunch")
  assert not requested_default and requested
  # glibc's defaults: the sort's 64 MB buffers are mmapped and unmapped on every call, so they are
  # faulted in again, 4 KB at a time, in each of the 5 calls; with huge pages, 2 MB at a time.
  assert default > 5 * pages_per_call, default
  assert relaunched * 20 < default, (relaunched, default)


def test_huge_pages_tunable_is_added_to_existing_tunables():
  assert not host_memory.huge_pages_requested({})
  env = host_memory.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0", "X": "1"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=1"
  assert env["X"] == "1" and host_memory.huge_pages_requested(env)
  # An explicit other hugetlb value is replaced, not duplicated; a request is left as it is.
  env = host_memory.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  assert host_memory.with_huge_pages(env) == env


# The gradient of three [24576, 256] x [256, 256] layers, compiled as the library compiles its
# steps (`jit_step`: XLA's temporaries in blocks under 32 MiB, 96 MB in all): glibc serves them
# from its arenas' heaps, and with its defaults deletes the extra heaps whenever a call frees them.
# Prints the median minor page faults per call over the last 10 of 16 calls (a median: a loaded
# machine may fault one block again now and then); argv[1] == "keep" relaunches first.
_KEEP_CHILD = textwrap.dedent("""
    import resource, sys
    import jaxrnn.host_memory as hm
    if sys.argv[1] == "keep":
      hm.relaunch("keep")
    import jax, jax.numpy as jnp
    from jaxrnn import train
    def f(a, w):
      b = jnp.tanh(a @ w); c = jnp.tanh(b @ w); d = jnp.tanh(c @ w)
      return (b[:, :8] * c[:, :8] * d[:, :8]).sum()
    g = train.jit_step(jax.grad(f))
    a = jnp.full((24576, 256), 0.01, jnp.float32); w = jnp.eye(256, dtype=jnp.float32)
    faults = []
    for _ in range(16):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      g(a, w).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(hm.requested("keep"), sorted(faults[-10:])[5])
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables (Linux only)")
def test_keep_mode_stops_the_heaps_from_being_faulted_in_again():
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  results = {}
  for mode in ("default", "keep"):
    out = subprocess.run([sys.executable, "-c", _KEEP_CHILD, mode], capture_output=True,
                         text=True, timeout=300, check=True, env=env).stdout
    requested, faults = out.strip().splitlines()[-1].split()
    results[mode] = (requested == "True", int(faults))
  assert results["default"][0] is False and results["keep"][0] is True
  # glibc's defaults: a deleted heap's 64 MB mapped again and faulted in 4 KB at a time, in call
  # after call (7k-47k faults per call measured); kept heaps: none in most calls once they exist.
  assert results["default"][1] > 4096, results
  assert results["keep"][1] * 20 < results["default"][1], results


def test_modes_add_their_tunables_and_reject_unknown_ones():
  env = host_memory.with_mode(
      "keep", {"GLIBC_TUNABLES": "glibc.malloc.top_pad=1:glibc.malloc.hugetlb=1"})
  assert env["GLIBC_TUNABLES"].split(":") == ["glibc.malloc.hugetlb=1",
                                              *host_memory.KEEP_HEAPS_TUNABLES]
  assert host_memory.requested("keep", env) and host_memory.requested("hugepages", env)
  assert not host_memory.requested("keep", {"GLIBC_TUNABLES": host_memory.KEEP_HEAPS_TUNABLES[0]})
  with pytest.raises(ValueError, match=r"mode must be one of \['hugepages', 'keep'\]; got 'big'"):
    host_memory.with_mode("big")
  with pytest.raises(ValueError, match="mode must be one of"):
    host_memory.relaunch("big")
