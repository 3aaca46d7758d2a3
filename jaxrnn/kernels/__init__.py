"""Native CPU kernels for the sequential loops, called through the XLA FFI (`jax.ffi`).

Shape legend: `T` time, `B` batch, `D` input, `H` hidden, `G = num_blocks * H` (1 for the Elman
cell, 4 for the LSTM, 3 for the GRU); time-major `[T, B, ...]`.

The cells in `jaxrnn.cells` are the definitions; `jaxrnn.scan` / `jaxrnn.backward` unroll them
with `lax.scan`. For the Elman cell, the LSTM and the GRU on CPU, the forward and manual-backward
loops also exist as one C++ loop each (`cells_cpu.cc`), which compute the same numbers
(tests/test_kernels.py) with `U` and `W` packed once per sequence, `U x_t` and `W h_{t-1}`
accumulated in one register tile, the gate arithmetic on the accumulators, and the hidden units
split between threads (each on its own CPU for the call); `jaxrnn.backward.input_recurrence`
(every manual-backward layer of `jaxrnn.rnn`) uses them where `applies`.

The source is compiled on first use with the system's C++ compiler (`$CXX`, else `c++`) for the
host CPU and cached under `$JAXRNN_CACHE_DIR` (default `~/.cache/jaxrnn`), keyed by the source,
the compiler and the jaxlib headers. Without a compiler, or with `JAXRNN_NATIVE=0`, nothing is
compiled and every path stays the `lax.scan` one.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).with_name("cells_cpu.cc")
_TARGETS = ("JaxrnnElmanForward", "JaxrnnElmanBackward", "JaxrnnLstmForward", "JaxrnnLstmBackward",
            "JaxrnnGruForward", "JaxrnnGruBackward")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
LANES = 16  # H must be a multiple of this (one vector of floats)


def _compiler() -> Optional[str]:
  return shutil.which(os.environ.get("CXX", "c++"))


def _cache_dir() -> Path:
  return Path(os.environ.get("JAXRNN_CACHE_DIR", Path.home() / ".cache" / "jaxrnn"))


def _host_cpu() -> bytes:
  """What `-march=native` compiles for: the CPU's model and feature flags where the OS says
  (a cache shared between different machines must not hand one the other's instructions)."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("model name", "flags", "Features", "CPU part"))]
    return "".join(sorted(set(lines))).encode()
  except OSError:
    return (platform.processor() or "").encode()


_lock = threading.Lock()
_loaded: list = []  # [the library or None] once tried


def library() -> Optional[ctypes.CDLL]:
  """The compiled kernels (built on the first call, then cached on disk), or None.

  None where `JAXRNN_NATIVE=0`, there is no C++ compiler, or the build failed (the reason is in
  `build_error()`). Thread-safe: the first calls from several threads build and register once.
  """
  if not _loaded:
    with _lock:
      if not _loaded:
        _loaded.append(_load())
  return _loaded[0]


def _load() -> Optional[ctypes.CDLL]:
  if os.environ.get("JAXRNN_NATIVE", "1") == "0":
    _errors.append("turned off by JAXRNN_NATIVE=0")
    return None
  if not hasattr(jax, "ffi") or not hasattr(jax.ffi, "include_dir"):
    _errors.append(f"jax {jax.__version__} has no jax.ffi (needs a newer jax)")
    return None
  cxx = _compiler()
  if cxx is None:
    _errors.append("no C++ compiler (set CXX or install one)")
    return None
  include = jax.ffi.include_dir()
  key = hashlib.sha256()
  for part in (_SOURCE.read_bytes(), cxx.encode(), " ".join(_FLAGS).encode(),
               include.encode(), jax.__version__.encode(), platform.machine().encode(),
               _host_cpu()):
    key.update(part)
  target = _cache_dir() / f"jaxrnn_kernels_{key.hexdigest()[:16]}.so"
  try:
    built_s = None
    if not target.exists():
      start = time.perf_counter()
      _build(cxx, include, target)
      built_s = time.perf_counter() - start
    lib = ctypes.cdll.LoadLibrary(str(target))
  except (OSError, subprocess.SubprocessError, RuntimeError) as e:
    _errors.append(f"{type(e).__name__}: {e}")
    return None
  _info.update(path=str(target), built_s=built_s)
  for symbol in _TARGETS:  # JaxrnnLstmForward -> jaxrnn_lstm_forward
    name = "jaxrnn" + "".join("_" + c.lower() if c.isupper() else c for c in symbol[6:])
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return lib


_errors: list[str] = []
_info: dict = {}  # where the loaded library is, and how long this process spent building it


def _build(cxx: str, include: str, target: Path) -> None:
  """Compile the source to `target`: built beside it and renamed into place, so that a concurrent
  or interrupted build never leaves a half-written library under the final name."""
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=target.parent)
  os.close(fd)
  try:
    proc = subprocess.run([cxx, *_FLAGS, f"-I{include}", str(_SOURCE), "-o", tmp],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
      raise RuntimeError(f"{cxx} failed:\n{proc.stderr[-4000:]}")
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def build_error() -> Optional[str]:
  """Why `library()` is None (None if it is not, or was not tried)."""
  return _errors[-1] if _errors else None


def library_info() -> Optional[dict]:
  """`{"path": str, "built_s": float | None}` for the library `library()` loaded: its file, and
  the seconds this process spent compiling it (None: it came from the disk cache, built by an
  earlier process). None where no library is loaded (not tried yet, or unavailable)."""
  return dict(_info) if _loaded and _loaded[0] is not None else None


def threads_for(batch: int, hidden: int) -> int:
  """Threads for one loop: 1 where a step is too small to share (the per-step barrier would cost
  more than the split saves), else the CPUs this process may use (the kernel also stops at one per
  16 hidden units and one per XLA pool worker). `JAXRNN_THREADS` overrides it (experiments)."""
  if "JAXRNN_THREADS" in os.environ:
    value = os.environ["JAXRNN_THREADS"]
    if not value.isdigit() or int(value) < 1:
      raise ValueError(f"JAXRNN_THREADS must be a positive integer; got {value!r}.")
    return int(value)
  if batch * hidden * hidden < 8 * 64 * 64:
    return 1
  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min(cpus or 1, hidden // LANES))


BLOCKS = {"elman": 1, "lstm": 4, "gru": 3}
# H must be a multiple of this for the cell's loops: 16 units per vector, and the Elman tile takes
# 16 units from each quarter of H (its one gate block alone would fill a quarter of the tile).
UNITS = {"elman": 4 * LANES, "lstm": LANES, "gru": LANES}
# The Elman loops' activation attribute (jaxrnn/kernels/cells_cpu.cc, `Activation`).
ACTIVATIONS = {"tanh": 0, "sigmoid": 1, "relu": 2}

# From this batch size on, the forward keeps its residuals gate-major, `[H, T, B]` per gate block,
# and the backward writes its gradients over them (one set of such arrays per training step
# instead of two: GRU large 317 -> 244 ms, its page faults 91k -> 39k per step). Below it a
# gate-major row of one step is shorter than a cache line and a step's rows lie `T B` floats apart
# (at B = 1 the small LSTM's loops ran 1.5-2x slower), so the residuals stay row-major,
# `[T, B, H]` per block, unaliased.
GATE_MAJOR_BATCH = 16

# XLA:CPU allocates each array on its own, and under `jaxrnn.train.COMPILER_OPTIONS` packs its
# temporaries in blocks of at most this many bytes, which glibc keeps and reuses from step to step.
# glibc maps any block of 32 MiB or more (its largest `mmap` threshold, with malloc's header)
# fresh, and faults it in page by page, at every step: XLA filled a 32 MiB limit exactly, so the
# limit is 31 MiB (LSTM char-LM 4.3k -> 0.1-0.2k faults, 35-37 -> 26-30 ms per step).
HEAP_LIMIT_BYTES = 31 * 2**20

# A readout `z_t = V h_t + c` may be fused into the backward loops (`readout=` of the backward
# functions): each step adds `dz_t V` to its state gradient (in the step's own GEMM code, `V`
# packed once) instead of reading `d_hs = dz V` from a `[T, B, H]` array written by XLA before the
# loop (26 MB on the large configs: a third of the Elman step's temporaries). Per step that GEMM
# streams all of `V` again, so only while `V` stays in cache: at most this many bytes.
READOUT_MAX_BYTES = 2**20


def pieces(family: str, batch: int, time: int, hidden: int) -> tuple[int, ...]:
  """How many gate blocks each array of the loops' residuals (and gradients) holds: the LSTM's
  i | f | g | o as one `[4H, T, B]` array and the GRU's r | z | n | rec_n as `[3H, T, B]` and
  `[H, T, B]` (the rows `W`'s gradient reads, then `U`'s n block), or, where those would pass
  `HEAP_LIMIT_BYTES`, one `[H, T, B]` array per block (the large LSTM's 105 MB of gates: 45k ->
  10-30k page faults per step). Splitting a smaller one measured slower (LSTM char-LM 30 -> 33
  ms), so it stays whole."""
  whole = (4,) if family == "lstm" else (3, 1)
  return whole if 4 * 4 * hidden * time * batch <= HEAP_LIMIT_BYTES else (1, 1, 1, 1)


def gate_major(batch: int) -> bool:
  """Whether the loops keep their residuals gate-major for this batch size (`GATE_MAJOR_BATCH`)."""
  return batch >= GATE_MAJOR_BATCH


def _piece_shape(batch: int, time: int, rows: int, major: bool) -> tuple[int, int, int]:
  return (rows, time, batch) if major else (time, batch, rows)


def _residuals(family, batch, time, hidden, major=None) -> tuple[jax.ShapeDtypeStruct, ...]:
  major = gate_major(batch) if major is None else major
  return tuple(jax.ShapeDtypeStruct(_piece_shape(batch, time, n * hidden, major), jnp.float32)
               for n in pieces(family, batch, time, hidden))


def _check_residuals(fn: str, name: str, family: str, arrays, batch: int, time: int,
                     hidden: int):
  want = [tuple(x.shape) for x in _residuals(family, batch, time, hidden)]
  got = ([tuple(x.shape) for x in arrays] if isinstance(arrays, (tuple, list))
         else f"one array of shape {tuple(arrays.shape)}")
  if got != want:
    layout = "gate-major" if gate_major(batch) else "row-major"
    raise ValueError(f"{fn}: {name} must be {len(want)} array(s) of shapes {want} ({layout} for "
                     f"batch {batch}, as the forward returns them); got {got}.")


def _aliases(batch: int, first_arg: int, first_ret: int, n: int) -> Optional[dict[int, int]]:
  """The backward's gradient pieces (results `first_ret` ..) take the residual pieces' buffers
  (arguments `first_arg` ..) where those are gate-major."""
  return {first_arg + k: first_ret + k for k in range(n)} if gate_major(batch) else None


def kernel_name(cell) -> tuple[Optional[str], Optional[str]]:
  """`(family, activation)` of one of the library's cells: ("elman", "tanh" | "sigmoid" | "relu")
  for `elman(f)` (its `kernel` is "elman_<f>"), ("lstm", None), ("gru", None); else
  (None, None)."""
  family, _, activation = (cell.kernel or "").partition("_")
  if family == "elman" and activation in ACTIVATIONS:
    return family, activation
  return (family, None) if family in ("lstm", "gru") and not activation else (None, None)


def applies(cell, params: dict, xs: jax.Array, carry0, mask, matmul_dtype) -> bool:
  """Whether `jaxrnn.backward.input_recurrence` may run this call through the native loops.

  Static (trace-time) conditions: one of the library's Elman (tanh, sigmoid or ReLU), LSTM or GRU
  cells (`cell.kernel`, with the `pointwise` function the loop implements, which carries a
  `native_kernel` mark), no mask, no `matmul_dtype`, float32 time-major `xs [T, B, D]`
  (T, B, D >= 1), `U [G, D]`, `W [G, H]`, `b [G]`, `bh [G]` (optional for the Elman cell) and
  carry `[B, H]`, with `H` a multiple of 16 (64 for the Elman cell), and the library built (see
  `library`). The platform is decided later, at lowering, by `lax.platform_dependent`: on
  anything but CPU the same call is the `lax.scan` path.
  """
  family, _ = kernel_name(cell)
  if family is None or mask is not None or matmul_dtype is not None:
    return False
  if getattr(cell.pointwise, "native_kernel", None) != cell.kernel:
    return False  # e.g. lstm()._replace(pointwise=...): the loop would not compute that cell
  carry_size = 2 if family == "lstm" else 1
  if xs.ndim != 3 or min(xs.shape) < 1 or len(carry0) != carry_size:
    return False
  W = params.get("W")
  has_bh = "bh" in params or family != "elman"
  arrays = [xs, params.get("U"), W, params.get("b"), *carry0]
  arrays += [params.get("bh")] if has_bh else []
  if any(x is None or x.dtype != jnp.float32 for x in arrays):
    return False
  T, B, D = xs.shape
  G, H = W.shape
  if H % UNITS[family] or G != BLOCKS[family] * H or params["U"].shape != (G, D):
    return False
  if params["b"].shape != (G,) or (has_bh and params["bh"].shape != (G,)):
    return False
  if any(c.shape != (B, H) for c in carry0):
    return False
  return library() is not None


def _cotangent(fn: str, d_hs, readout, T: int, B: int, H: int) -> tuple[jax.Array, ...]:
  """The `d_hs, dz, V` arguments of a backward loop: `d_hs [T, B, H]`, or with the readout fused
  (`readout = (dz [T, B, O], V [O, H])`) `d_hs` may be None (`[0]` to the kernel, no `[T, B, H]`
  array at all); no readout: empty `dz` and `V`."""
  empty = jnp.zeros((0,), jnp.float32)
  if d_hs is None and readout is None:
    raise ValueError(f"{fn}: d_hs may be None only with a readout; got d_hs=None, readout=None.")
  if d_hs is not None and tuple(d_hs.shape) != (T, B, H):
    raise ValueError(f"{fn}: d_hs must have shape {(T, B, H)} ([T, B, H]); got "
                     f"{tuple(d_hs.shape)}.")
  if readout is None:
    return d_hs, empty, empty
  dz, V = readout
  if dz.ndim != 3 or tuple(dz.shape[:2]) != (T, B) or tuple(V.shape) != (dz.shape[-1], H):
    raise ValueError(f"{fn}: readout must be (dz [T, B, O], V [O, H]) with T={T}, B={B}, "
                     f"H={H}; got dz {tuple(dz.shape)}, V {tuple(V.shape)}.")
  if dz.dtype != jnp.float32 or V.dtype != jnp.float32:
    raise ValueError(f"{fn}: readout must be float32; got dz {dz.dtype}, V {V.dtype}.")
  return (empty if d_hs is None else d_hs), dz, V


def readout_fuses(output: int, hidden: int) -> bool:
  """Whether a backward loop should take the readout's `dz [T, B, O]` and `V [O, H]` instead of
  `d_hs [T, B, H]` (`READOUT_MAX_BYTES`)."""
  return 4 * output * hidden <= READOUT_MAX_BYTES


def _require_library() -> None:
  if library() is None:
    raise RuntimeError(f"jaxrnn's native kernels are not available: {build_error()}")


def _activation(activation: str) -> np.int64:
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; got {activation!r}.")
  return np.int64(ACTIVATIONS[activation])


def elman_forward(xs: jax.Array, U: jax.Array, W: jax.Array, bias: jax.Array, h0: jax.Array,
                  activation: str = "tanh") -> jax.Array:
  """The Elman forward loop with its input projection: `xs [T, B, D]`, `U [H, D]`, `W [H, H]`,
  `bias [H]` (`b`, plus `bh` where the cell has it), `h0 [B, H]` -> `hs [T, B, H]`, with
  `h_t = f(U x_t + W h_{t-1} + bias)` and `f` the `activation` ("tanh", "sigmoid" or "relu").
  `H` a multiple of 64. CPU only. The backward needs nothing else: `f'` is written from `h_t`."""
  _require_library()
  T, B, _ = xs.shape
  H = W.shape[1]
  act = _activation(activation)
  return jax.ffi.ffi_call("jaxrnn_elman_forward", jax.ShapeDtypeStruct((T, B, H), jnp.float32),
                          vmap_method="sequential")(
      xs, U, W, bias, h0, threads=np.int64(threads_for(B, H)), activation=act)


def elman_backward(W: jax.Array, hs: jax.Array, d_hs: Optional[jax.Array], dh_T: jax.Array,
                   activation: str = "tanh", readout=None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The Elman manual-backward loop: from `elman_forward`'s `hs [T, B, H]`, the output cotangent
  `d_hs [T, B, H]` and the final state's `dh_T [B, H]` -> `e [H, T, B]`, `dh_0 [B, H]` and
  `db [H]`, the sum of `e` over `T` and `B` (the bias gradient, added up by the loop), where
  `e` holds `delta_t = dL/dz_t = (d_hs[t] + delta_{t+1} W) f'(h_t)` (which is `dL/da_t` and
  `dL/db` per step) transposed and rolled by one step: `e[:, t - 1] = delta_t`, and
  `e[:, T - 1] = delta_0`. Transposed, the weight gradients' GEMMs read it without a copy;
  rolled, `e @ hs` is `dW` but for `delta_0 (h_0 - h_{T-1})^T`, with no shifted copy of `hs`
  (`jnp.roll(e, 1, axis=1)` is `delta^T`).

  `readout = (dz [T, B, O], V [O, H])` fuses the readout `z_t = V h_t + c`: the loop adds
  `dz_t V` to `d_hs[t]` (then `d_hs` may be None: none but the readout's). The same holds for
  `lstm_backward` and `gru_backward`, which add up their gradients' rows too."""
  _require_library()
  T, B, H = hs.shape
  act = _activation(activation)
  d_hs, dz, V = _cotangent("elman_backward", d_hs, readout, T, B, H)
  out = (jax.ShapeDtypeStruct((H, T, B), jnp.float32), jax.ShapeDtypeStruct((B, H), jnp.float32),
         jax.ShapeDtypeStruct((H,), jnp.float32))
  return jax.ffi.ffi_call("jaxrnn_elman_backward", out, vmap_method="sequential")(
      W, hs, d_hs, dh_T, dz, V, threads=np.int64(threads_for(B, H)), activation=act)


def lstm_forward(xs: jax.Array, U: jax.Array, W: jax.Array, bias: jax.Array, h0: jax.Array,
                 c0: jax.Array) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
  """The LSTM forward loop with its input projection: `xs [T, B, D]`, `U [4H, D]`, `W [4H, H]`,
  `bias [4H]` (`b + bh`), `h0, c0 [B, H]` -> `(hs, cs) [T, B, H]` and the activated gates
  i | f | g | o (the g block as `sigmoid(2 z_g)`, as `jaxrnn.cells.lstm` saves them) as a tuple
  of arrays (`pieces`: one `[4H, T, B]`, or four `[H, T, B]`), gate-major (the layout of
  `lstm_backward`'s outputs, which overwrite them) where `gate_major(B)`, else `[T, B, 4H]` (or
  four `[T, B, H]`). CPU only.

  `U x_t` is accumulated with `W h_{t-1}` in the step's GEMM, so no `[T, B, 4H]` projection is
  written to memory and read back (on the char-LM step that array, freshly mapped by the
  allocator every step, cost 6.7 ms in its GEMM, most of it page faults)."""
  _require_library()
  T, B, _ = xs.shape
  G, H = W.shape
  out = (jax.ShapeDtypeStruct((T, B, H), jnp.float32),) * 2 + _residuals("lstm", B, T, H)
  hs, cs, *s = jax.ffi.ffi_call("jaxrnn_lstm_forward", out, vmap_method="sequential")(
      xs, U, W, bias, h0, c0, threads=np.int64(threads_for(B, H)),
      gate_major=np.int64(gate_major(B)))
  return hs, cs, tuple(s)


def lstm_backward(W: jax.Array, s, cs: jax.Array, c0: jax.Array, d_hs: Optional[jax.Array],
                  dh_T: jax.Array, dc_T: jax.Array, readout=None
                  ) -> tuple[tuple[jax.Array, ...], jax.Array, jax.Array, jax.Array]:
  """The LSTM manual-backward loop: from `lstm_forward`'s `s` (its tuple of arrays), `cs` and
  `c0`, the output cotangent `d_hs [T, B, H]` and the final carry's `(dh_T, dc_T) [B, H]` ->
  `d_a`, `dL/dz_t` (which is `dL/da_t` and `dL/d(b + bh)` per step) transposed, in the pieces of
  `s` but always gate-major (`[4H, T, B]`, or four `[H, T, B]`: the layout in which the weight
  gradients' GEMMs read it without a copy), `(dh_0, dc_0) [B, H]`, and `db [4H]`, the sum of
  `d_a` over `T` and `B`. Rolled by one step, as `elman_backward`'s: column `t - 1` holds step
  `t`'s, the last column step 0's.

  Where `s` is gate-major, each piece of `d_a` takes its `s` piece's buffer
  (`input_output_aliases`; XLA copies `s` first only where it is still needed afterwards): a
  training step holds one set of gate arrays, not two. `readout` as in `elman_backward`."""
  _require_library()
  T, B, H = cs.shape
  _check_residuals("lstm_backward", "s", "lstm", s, B, T, H)
  d_hs, dz, V = _cotangent("lstm_backward", d_hs, readout, T, B, H)
  out = ((jax.ShapeDtypeStruct((B, H), jnp.float32),) * 2
         + (jax.ShapeDtypeStruct((4 * H,), jnp.float32),) + _residuals("lstm", B, T, H, True))
  dh0, dc0, db, *d_a = jax.ffi.ffi_call(
      "jaxrnn_lstm_backward", out, vmap_method="sequential",
      input_output_aliases=_aliases(B, 8, 3, len(s)))(
      W, cs, c0, d_hs, dh_T, dc_T, dz, V, *s, threads=np.int64(threads_for(B, H)),
      gate_major=np.int64(gate_major(B)))
  return tuple(d_a), dh0, dc0, db


def gru_forward(xs: jax.Array, U: jax.Array, W: jax.Array, b: jax.Array, bh: jax.Array,
                h0: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """The GRU forward loop with its input projection: `xs [T, B, D]`, `U [3H, D]`, `W [3H, H]`,
  `b, bh [3H]`, `h0 [B, H]` -> `hs [T, B, H]` and the residuals r | z | n | rec_n (with
  `rec_n = W_n h_{t-1} + bh_n`) as a tuple of arrays (`pieces`: `[3H, T, B]` and `[H, T, B]`, or
  four `[H, T, B]`), gate-major (the layout of `gru_backward`'s outputs, which overwrite them)
  where `gate_major(B)`, else `[T, B, .]`. CPU only."""
  _require_library()
  T, B, _ = xs.shape
  G, H = W.shape
  out = (jax.ShapeDtypeStruct((T, B, H), jnp.float32),) + _residuals("gru", B, T, H)
  hs, *res = jax.ffi.ffi_call("jaxrnn_gru_forward", out, vmap_method="sequential")(
      xs, U, W, b, bh, h0, threads=np.int64(threads_for(B, H)),
      gate_major=np.int64(gate_major(B)))
  return hs, tuple(res)


def gru_backward(W: jax.Array, res, hs: jax.Array, h0: jax.Array, d_hs: Optional[jax.Array],
                 dh_T: jax.Array, readout=None
                 ) -> tuple[tuple[jax.Array, ...], jax.Array, jax.Array]:
  """The GRU manual-backward loop: from `gru_forward`'s `res` (its tuple of arrays) and `hs`,
  `h0`, the output cotangent `d_hs [T, B, H]` and the final state's `dh_T [B, H]` -> the
  pre-activation gradients transposed, d_r | d_z | d_n r | d_n in the pieces of `res` but always
  gate-major (`W`, `bh` and the recurrence take `d_r | d_z | d_n r`, `U` and `b` take
  `d_r | d_z | d_n`), rolled by one step as `elman_backward`'s, `dh_0 [B, H]`, and `sums [4H]`,
  each gradient row summed over `T` and `B` (`bh` takes the first 3H, `b` the first 2H and the
  last H). Where the
  residuals are gate-major, each gradient piece takes the buffer of the residual piece in its
  place (`input_output_aliases`, as in `lstm_backward`); the whole layout keeps `[3H, T, B]`
  apart so that the GEMM for `W` reads it as it is, where a slice of one `[4H, T, B]` array was a
  copy (79 MB per GRU-large step).
  `readout` as in `elman_backward`."""
  _require_library()
  T, B, H = hs.shape
  _check_residuals("gru_backward", "res", "gru", res, B, T, H)
  d_hs, dz, V = _cotangent("gru_backward", d_hs, readout, T, B, H)
  out = ((jax.ShapeDtypeStruct((B, H), jnp.float32), jax.ShapeDtypeStruct((4 * H,), jnp.float32))
         + _residuals("gru", B, T, H, True))
  dh0, sums, *d = jax.ffi.ffi_call("jaxrnn_gru_backward", out, vmap_method="sequential",
                                   input_output_aliases=_aliases(B, 7, 2, len(res)))(
      W, hs, h0, d_hs, dh_T, dz, V, *res, threads=np.int64(threads_for(B, H)),
      gate_major=np.int64(gate_major(B)))
  return tuple(d), dh0, sums
