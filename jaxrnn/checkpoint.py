"""Checkpoints of a training state: safetensors arrays, a JSON record, a checksum, no pickle.

A checkpoint is one file, a standard safetensors container (an 8-byte little-endian header length
`N`, `N` bytes of JSON header, then the raw array bytes). Its `__metadata__["jaxrnn"]` entry holds
a JSON record:

  {"format": "jaxrnn.checkpoint", "version": 1, "step": 120, "config": {...}, "metrics": {...},
   "data_position": ..., "sha256": "<hex>",
   "trees": {"params": [leaf, ...], "opt_state": [leaf, ...], "key": [leaf]}}

with one `leaf = {"path": "['U']", "name": "params/0", "dtype": "float32", "shape": [8, 3],
"storage": "native"}` per array, `path` being `jax.tree_util.keystr` of the leaf in its tree. The
checksum is the sha256 of the record (without `sha256`, as canonical JSON) followed by every
array's bytes, so a flipped bit anywhere is detected. Nothing is ever unpickled: the header is
parsed as JSON and the arrays as raw bytes, so a hostile file can at worst fail to load.

Loading restores each tree into a *template* (the params you initialised, `optimizer.init(params)`)
and refuses any difference with a `CheckpointError` naming the first one: a missing or extra leaf,
a shape, a dtype, the version, a truncated or corrupted file. Nothing partial is returned.

Writes are atomic: a temporary file in the same directory is written, flushed and `fsync`ed, then
linked (or, with `overwrite=True`, `os.replace`d) to its name, and the directory is `fsync`ed. A
crash at any moment leaves the old checkpoint or the new one, never a torn file.

PRNG keys: new-style typed keys (`jax.random.key`) are stored as `jax.random.key_data` with their
implementation name and restored with `jax.random.wrap_key_data`; legacy `uint32[2]` keys
(`jax.random.PRNGKey`) are stored as plain arrays.

Example:
  >>> from jaxrnn import checkpoint
  >>> ckpt = checkpoint.Checkpoint(params, opt_state, step=100, key=jax.random.key(0),
  ...                              config={"hidden_size": 8}, metrics={"loss": 0.12})
  >>> checkpoint.save("run/ckpt.safetensors", ckpt)
  >>> back = checkpoint.load("run/ckpt.safetensors", params=params,
  ...                        opt_state=optimizer.init(params))
  >>> manager = checkpoint.CheckpointManager("run", keep=3, best_metric="loss")
  >>> manager.save(ckpt)                      # run/ckpt-0000000100.safetensors, old ones pruned
  >>> latest, skipped = manager.restore_latest(params=params, opt_state=optimizer.init(params))
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn import _checks

FORMAT = "jaxrnn.checkpoint"
VERSION = 1
TREES = ("params", "opt_state", "key")
TEMP_SUFFIX = ".tmp"
# What a file's integrity failure is called; the manager skips (and can quarantine) such files at
# resume, whereas any other error (a template mismatch, a newer version) is the caller's to fix.
INTEGRITY_KINDS = ("truncated", "corrupted", "not_checkpoint")

_META_KEY = "jaxrnn"
_MAX_HEADER = 100 * 1024 * 1024     # safetensors' own limit on the JSON header
def _safetensors():
  """`safetensors.numpy`, imported on first use: the core install needs only jax, jaxlib, optax."""
  try:
    import safetensors.numpy
  except ImportError as err:
    raise ImportError("jaxrnn.checkpoint needs the safetensors package: "
                      "pip install 'jaxrnn[checkpoint]' (or pip install safetensors).") from err
  return safetensors.numpy


# Dtypes `safetensors.numpy` stores natively; others (bfloat16, ...) are stored as their raw bytes.
_NATIVE = frozenset({"bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64",
                     "int64", "float16", "float32", "float64"})


class CheckpointError(ValueError):
  """A checkpoint file cannot be loaded or written as asked.

  Attributes:
    kind: which problem: "truncated", "corrupted" or "not_checkpoint" (the file's integrity, see
      `INTEGRITY_KINDS`), "version", "missing" / "extra" (a leaf in only one of the template and
      the file), "shape", "dtype", "config", or "exists" (a write that would overwrite a file).
    path: the file concerned (None for in-memory bytes).
  """

  def __init__(self, message: str, *, kind: str, path: Optional[str] = None):
    super().__init__(message)
    self.kind = kind
    self.path = path


class Checkpoint(NamedTuple):
  """A training state, what `save` writes and `load` returns.

  Attributes:
    params: a pytree of arrays.
    opt_state: a pytree of arrays, e.g. `optimizer.init(params)` (optax NamedTuples are fine).
    step: the number of training steps done, an int >= 0.
    key: a PRNG key (typed `jax.random.key` or legacy `uint32[2]`), or None.
    data_position: where the data stream stands, any JSON value (e.g. `{"epoch": 2, "batch": 7}`).
    config: a JSON-able dict, e.g. the model's sizes and hyper-parameters.
    metrics: `{name: float}`, e.g. `{"loss": 0.12}`; non-finite values are kept (as "nan" / "inf"
      strings in the JSON) and never count as best.
  """
  params: Any
  opt_state: Any
  step: int
  key: Optional[jax.Array] = None
  data_position: Any = None
  config: Optional[dict] = None
  metrics: Optional[dict] = None


# ----------------------------------------------------------------------------------------------
# Encoding.


def _is_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _signature(leaf) -> tuple[tuple[int, ...], str]:
  """`(shape, dtype name)` of an array, a `jax.ShapeDtypeStruct` or a Python scalar."""
  if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
    return tuple(leaf.shape), str(leaf.dtype)
  arr = np.asarray(leaf)
  return arr.shape, str(arr.dtype)


def _encode_leaf(tree: str, path: str, leaf, name: str) -> tuple[dict, np.ndarray]:
  entry = {"path": path, "name": name}
  if _is_key(leaf):
    entry["key_impl"] = str(jax.random.key_impl(leaf))
    data = np.asarray(jax.random.key_data(leaf))
    entry["dtype"], entry["shape"] = str(leaf.dtype), list(leaf.shape)
  else:
    data = np.asarray(leaf)
    if data.dtype.kind in "OSUMm":
      raise TypeError(f"{tree}{path} must be an array of numbers to be checkpointed; got "
                      f"{type(leaf).__name__} with dtype {data.dtype}.")
    entry["dtype"], entry["shape"] = str(data.dtype), list(data.shape)
  data = np.require(data, requirements="C")   # (np.ascontiguousarray would make a scalar 1-D)
  if data.dtype.name in _NATIVE:
    entry["storage"] = "native"
  else:
    entry["storage"] = "bytes"
    data = np.frombuffer(data.tobytes(), np.uint8)
  return entry, data


def _jsonable(name: str, value) -> Any:
  try:
    return json.loads(json.dumps(value, allow_nan=False))
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be JSON-able (dicts, lists, str, int, finite float, bool, None); "
                    f"got {value!r} ({e}).") from None


def _encode_metrics(metrics) -> dict:
  if metrics is None:
    return {}
  if not isinstance(metrics, dict):
    raise TypeError(f"metrics must be a dict of floats, e.g. {{'loss': 0.1}}; got "
                    f"{type(metrics).__name__}.")
  out = {}
  for k, v in metrics.items():
    try:
      v = float(v)
    except (TypeError, ValueError):
      raise TypeError(f"metrics[{k!r}] must be a float; got {v!r}.") from None
    out[str(k)] = v if math.isfinite(v) else repr(v)    # "nan", "inf", "-inf"
  return out


def _decode_metrics(metrics: dict) -> dict:
  return {k: float(v) for k, v in metrics.items()}


def _canonical(record: dict) -> bytes:
  return json.dumps({k: v for k, v in record.items() if k != "sha256"}, sort_keys=True,
                    separators=(",", ":"), allow_nan=False).encode()


def _digest(record: dict, arrays: dict[str, np.ndarray]) -> str:
  h = hashlib.sha256(_canonical(record))
  for tree in TREES:
    for entry in record["trees"][tree]:
      h.update(entry["name"].encode())
      h.update(arrays[entry["name"]].tobytes())
  return h.hexdigest()


def to_bytes(ckpt: Checkpoint) -> bytes:
  """Serialise `ckpt` to the bytes of a checkpoint file (see the module docstring)."""
  if not isinstance(ckpt, Checkpoint):
    raise TypeError(f"ckpt must be a jaxrnn.checkpoint.Checkpoint; got {type(ckpt).__name__}.")
  step = _checks.check_positive_int("ckpt.step", ckpt.step, minimum=0)
  if ckpt.key is not None:
    _checks.check_key("ckpt.key", ckpt.key)
  if ckpt.config is not None and not isinstance(ckpt.config, dict):
    raise TypeError(f"ckpt.config must be a JSON-able dict or None; got "
                    f"{type(ckpt.config).__name__}.")
  record = {
      "format": FORMAT, "version": VERSION, "step": step,
      "config": _jsonable("ckpt.config", ckpt.config or {}),
      "data_position": _jsonable("ckpt.data_position", ckpt.data_position),
      "metrics": _encode_metrics(ckpt.metrics),
      "trees": {},
  }
  arrays = {}
  for tree, value in (("params", ckpt.params), ("opt_state", ckpt.opt_state), ("key", ckpt.key)):
    leaves = jax.tree_util.tree_flatten_with_path(value)[0] if value is not None else []
    entries = []
    for i, (path, leaf) in enumerate(leaves):
      entry, data = _encode_leaf(tree, jax.tree_util.keystr(path), leaf, f"{tree}/{i}")
      entries.append(entry)
      arrays[entry["name"]] = data
    record["trees"][tree] = entries
  record["sha256"] = _digest(record, arrays)
  return _safetensors().save(arrays, metadata={_META_KEY: json.dumps(record, allow_nan=False)})


# ----------------------------------------------------------------------------------------------
# Decoding.


def _parse(data: bytes, source: Optional[str]) -> tuple[dict, dict[str, np.ndarray]]:
  """Check a file's integrity; return its record and stored arrays, or raise CheckpointError."""
  where = source if source is not None else "<bytes>"

  def fail(kind, message):
    return CheckpointError(f"{where}: {message}", kind=kind, path=source)

  size = len(data)
  if size < 8:
    raise fail("truncated", f"truncated file: {size} bytes, fewer than the 8-byte header length.")
  header_len = int.from_bytes(data[:8], "little")
  if header_len > _MAX_HEADER:
    raise fail("not_checkpoint", f"not a safetensors checkpoint (header length field reads "
               f"{header_len} bytes); the file is corrupted or of another format (e.g. pickle), "
               "and it was not executed.")
  if 8 + header_len > size:
    raise fail("truncated", f"truncated file: {size} bytes, but its header alone needs "
               f"{8 + header_len}.")
  try:
    header = json.loads(data[8:8 + header_len])
  except (UnicodeDecodeError, ValueError):
    raise fail("corrupted", "corrupted header: it is not valid JSON.") from None
  if not isinstance(header, dict):
    raise fail("corrupted", "corrupted header: it is not a JSON object.")
  meta = header.get("__metadata__")
  if not isinstance(meta, dict) or _META_KEY not in meta:
    raise fail("not_checkpoint", "not a jaxrnn checkpoint: the safetensors metadata has no "
               f"{_META_KEY!r} record (a plain safetensors file?).")
  try:
    record = json.loads(meta[_META_KEY])
  except (TypeError, ValueError):
    raise fail("corrupted", "corrupted header: the jaxrnn record is not valid JSON.") from None
  if not isinstance(record, dict) or record.get("format") != FORMAT:
    raise fail("not_checkpoint", f"not a jaxrnn checkpoint: format is "
               f"{record.get('format') if isinstance(record, dict) else record!r}, expected "
               f"{FORMAT!r}.")
  if record.get("version") != VERSION:
    raise CheckpointError(f"{where}: unsupported checkpoint format version "
                          f"{record.get('version')!r}; this jaxrnn reads version {VERSION}. "
                          "Load it with the jaxrnn that wrote it.", kind="version", path=source)
  try:
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
  except (TypeError, KeyError, IndexError, ValueError):
    raise fail("corrupted", "corrupted header: bad tensor table.") from None
  expected = 8 + header_len + max(ends, default=0)
  if size < expected:
    raise fail("truncated", f"truncated file: {size} bytes, expected {expected}.")
  if size > expected:
    raise fail("corrupted", f"corrupted file: {size} bytes, expected {expected} (trailing data).")
  try:
    arrays = _safetensors().load(data)
  except Exception as e:    # safetensors raises its own error types on malformed input.
    raise fail("corrupted", f"corrupted data: safetensors cannot read it ({e}).") from None
  try:
    names = [e["name"] for tree in TREES for e in record["trees"][tree]]
    paths_ok = all(len({e["path"] for e in record["trees"][t]}) == len(record["trees"][t])
                   for t in TREES)
    digest_ok = (sorted(names) == sorted(arrays) and paths_ok
                 and all(_stored_matches(e, arrays[e["name"]]) for t in TREES
                         for e in record["trees"][t])
                 and record.get("sha256") == _digest(record, arrays))
  except (TypeError, KeyError, AttributeError, ValueError):
    digest_ok = False
  if not digest_ok:
    raise fail("corrupted", "corrupted file: checksum mismatch (sha256 of the record and arrays "
               "differs from the one stored when it was written).")
  return record, arrays


def _stored_matches(entry: dict, stored: np.ndarray) -> bool:
  """Whether a stored array is what its record entry says (a key's data has extra trailing axes)."""
  if entry.get("key_impl") is not None:
    return (stored.dtype == np.uint32
            and list(stored.shape[:len(entry["shape"])]) == list(entry["shape"]))
  if entry["storage"] == "bytes":
    return (stored.dtype == np.uint8 and stored.ndim == 1 and stored.size
            == math.prod(entry["shape"]) * jnp.dtype(entry["dtype"]).itemsize)
  return str(stored.dtype) == entry["dtype"] and list(stored.shape) == list(entry["shape"])


def _decode_leaf(entry: dict, arrays: dict) -> jax.Array:
  stored = arrays[entry["name"]]
  if entry.get("key_impl") is not None:
    return jax.random.wrap_key_data(jnp.asarray(stored), impl=entry["key_impl"])
  if entry["storage"] == "bytes":
    stored = np.frombuffer(stored.tobytes(), jnp.dtype(entry["dtype"])).reshape(entry["shape"])
  return jnp.asarray(stored)


def _restore_tree(tree: str, entries: list, arrays: dict, template, where: str, path):
  """Unflatten `entries` into `template`'s structure, raising on the first difference."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(template)
  stored = {e["path"]: e for e in entries}
  wanted = []
  for p, leaf in flat:
    name = jax.tree_util.keystr(p)
    entry = stored.get(name)
    label = f"{tree}{name}"
    if entry is None:
      raise CheckpointError(f"{where}: missing leaf {label}: the template has it, the checkpoint "
                            "does not. Was it written for another model or optimiser?",
                            kind="missing", path=path)
    shape, dtype = _signature(leaf)
    if tuple(entry["shape"]) != shape:
      raise CheckpointError(f"{where}: shape mismatch at {label}: the template expects "
                            f"{list(shape)}, the checkpoint has {entry['shape']}.",
                            kind="shape", path=path)
    if entry["dtype"] != dtype:
      raise CheckpointError(f"{where}: dtype mismatch at {label}: the template expects {dtype}, "
                            f"the checkpoint has {entry['dtype']}.", kind="dtype", path=path)
    wanted.append(entry)
  names = {jax.tree_util.keystr(p) for p, _ in flat}
  extra = [e["path"] for e in entries if e["path"] not in names]
  if extra:
    raise CheckpointError(f"{where}: extra leaf {tree}{extra[0]}: the checkpoint has it, the "
                          f"template does not ({len(extra)} extra in all).", kind="extra",
                          path=path)
  return jax.tree_util.tree_unflatten(treedef, [_decode_leaf(e, arrays) for e in wanted])


def from_bytes(data: bytes, *, params, opt_state, key=None, source: Optional[str] = None
               ) -> Checkpoint:
  """Deserialise checkpoint bytes into the structure of the templates; see `load`."""
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f"data must be the bytes of a checkpoint file; got {type(data).__name__}.")
  record, arrays = _parse(bytes(data), source)
  where = source if source is not None else "<bytes>"
  trees = record["trees"]
  restored_params = _restore_tree("params", trees["params"], arrays, params, where, source)
  restored_opt = _restore_tree("opt_state", trees["opt_state"], arrays, opt_state, where, source)
  if key is not None:
    restored_key = _restore_tree("key", trees["key"], arrays, key, where, source)
  elif len(trees["key"]) == 1 and trees["key"][0]["path"] == "":
    restored_key = _decode_leaf(trees["key"][0], arrays)
  else:
    restored_key = None
  return Checkpoint(restored_params, restored_opt, int(record["step"]), restored_key,
                    record["data_position"], record["config"],
                    _decode_metrics(record["metrics"]))


def _check_path(path) -> None:
  # open() would take an int as a file descriptor, read whatever it is and close it.
  if not isinstance(path, (str, bytes, os.PathLike)):
    raise TypeError(f"path must be a file path (str or os.PathLike); got {type(path).__name__}.")


def load(path: str, *, params, opt_state, key=None) -> Checkpoint:
  """Load a checkpoint, checked leaf by leaf against templates of the expected state.

  Args:
    path: the file.
    params: a template of the params: a pytree of arrays (or `jax.ShapeDtypeStruct`s) with the
      structure, shapes and dtypes expected, e.g. freshly initialised params.
    opt_state: a template of the optimiser state, e.g. `optimizer.init(params)`.
    key: a template PRNG key, to check the stored key is of the same kind; if None, the stored
      key is returned whatever it is (or None if the checkpoint has none).

  Returns:
    A `Checkpoint` whose `params` and `opt_state` have the templates' tree structure.

  Raises:
    CheckpointError: the file is truncated, corrupted (checksum), not a checkpoint, of another
      format version, or differs from a template (the first missing or extra leaf, shape or
      dtype is named). Nothing partial is ever returned.
    FileNotFoundError: there is no such file.
    TypeError: `path` is not a str or `os.PathLike` (an int would be read as a file descriptor).
  """
  _check_path(path)
  with open(path, "rb") as f:
    data = f.read()
  return from_bytes(data, params=params, opt_state=opt_state, key=key, source=os.fspath(path))


class Info(NamedTuple):
  """What `verify` reads from an intact checkpoint, without any template."""
  step: int
  metrics: dict
  config: dict
  data_position: Any
  paths: dict      # {"params": [keystr, ...], "opt_state": [...], "key": [...]}


def verify(path: str) -> Info:
  """Check a file's integrity (header, version, size, checksum); return its record.

  Raises:
    CheckpointError: as `load`, except for template mismatches, which need `load`.
  """
  _check_path(path)
  with open(path, "rb") as f:
    data = f.read()
  record, _ = _parse(data, os.fspath(path))
  return Info(int(record["step"]), _decode_metrics(record["metrics"]), record["config"],
              record["data_position"],
              {t: [e["path"] for e in record["trees"][t]] for t in TREES})


# ----------------------------------------------------------------------------------------------
# Atomic files.


def _fsync_dir(directory: str) -> None:
  """Make a rename in `directory` durable (a no-op where directories cannot be opened)."""
  try:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:   # some filesystems refuse fsync on a directory; the rename is then best effort.
    pass
  finally:
    os.close(fd)


def _link_no_overwrite(src: str, dst: str) -> None:
  """Give `src` the name `dst`, failing with FileExistsError if `dst` exists (atomic via link)."""
  try:
    os.link(src, dst)
  except FileExistsError:
    raise
  except OSError:
    # No hard links here (some network / FUSE filesystems): check, then rename.
    if os.path.lexists(dst):
      raise FileExistsError(dst) from None
    os.replace(src, dst)
    return
  os.unlink(src)


def write_atomic(path: str, data: bytes, *, overwrite: bool = False) -> None:
  """Write `data` to `path` so that a crash leaves the old file or the new one, never a mix.

  The bytes go to a temporary file in the same directory (named `.<name>.<random>.tmp`), which is
  flushed and fsynced, then given its name (`os.link`, or `os.replace` with `overwrite=True`);
  then the directory is fsynced. On any error the temporary file is removed.

  Raises:
    CheckpointError: (kind "exists") `path` exists and `overwrite` is False.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  if not overwrite and os.path.lexists(path):
    raise CheckpointError(f"{path} exists; pass overwrite=True to replace it, or pick another "
                          "name.", kind="exists", path=path)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    if overwrite:
      os.replace(tmp, path)
    else:
      try:
        _link_no_overwrite(tmp, path)
      except FileExistsError:
        raise CheckpointError(f"{path} exists (it appeared while writing); pass overwrite=True "
                              "to replace it.", kind="exists", path=path) from None
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  _fsync_dir(directory)


def save(path: str, ckpt: Checkpoint, *, overwrite: bool = False) -> str:
  """Write `ckpt` to `path` atomically (see `write_atomic`); return `path`.

  Raises:
    CheckpointError: (kind "exists") `path` exists and `overwrite` is False.
    TypeError: a leaf is not numeric, or `config` / `data_position` / `metrics` is not JSON-able.
  """
  write_atomic(path, to_bytes(ckpt), overwrite=overwrite)
  return os.fspath(path)


# ----------------------------------------------------------------------------------------------
# A directory of checkpoints.


class Entry(NamedTuple):
  """One checkpoint file of a `CheckpointManager`: its info, or the error that makes it unusable."""
  step: int
  path: str
  info: Optional[Info]
  error: Optional[CheckpointError]


class Skipped(NamedTuple):
  """A file `restore_latest` passed over: why, and where it was moved (None if left in place)."""
  step: int
  path: str
  error: CheckpointError
  moved_to: Optional[str]


class CheckpointManager:
  """The checkpoints of one run in one directory: the newest `keep`, plus the best.

  Files are named `<prefix>-<step:010d>.safetensors`. After each `save` the manager deletes the
  intact checkpoints that are neither among the `keep` newest intact ones nor the best one (lowest
  `metrics[best_metric]`, finite values only). It never deletes a damaged file (it is not counted
  either), never deletes anything before the new checkpoint is written and re-read intact, so the
  newest good checkpoint always survives, and never overwrites a file unless asked.

  One process writes a directory; any number may read it.

  Args:
    directory: created if missing.
    keep: how many of the newest checkpoints to keep, >= 1.
    best_metric: the `Checkpoint.metrics` entry (lower is better) whose best checkpoint is kept
      too; None to keep only the newest.
    prefix: the file name prefix.
  """

  def __init__(self, directory: str, *, keep: int = 3, best_metric: Optional[str] = None,
               prefix: str = "ckpt"):
    self.keep = _checks.check_positive_int("keep", keep)
    if best_metric is not None and not isinstance(best_metric, str):
      raise TypeError(f"best_metric must be a metric name (str) or None; got {best_metric!r}.")
    if not isinstance(prefix, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
      raise ValueError(f"prefix must be a non-empty file-name-safe string; got {prefix!r}.")
    self.directory = os.fspath(directory)
    self.best_metric = best_metric
    self.prefix = prefix
    self._pattern = re.compile(rf"{re.escape(prefix)}-(\d{{10,}})\.safetensors")
    self._temp_pattern = re.compile(
        rf"\.{re.escape(prefix)}-\d{{10,}}\.safetensors\.[0-9a-f]+{re.escape(TEMP_SUFFIX)}")
    self._cache: dict[str, tuple[tuple, Entry]] = {}
    self._cleaned = False
    os.makedirs(self.directory, exist_ok=True)

  def path(self, step: int) -> str:
    """The file of checkpoint `step`."""
    step = _checks.check_positive_int("step", step, minimum=0)
    return os.path.join(self.directory, f"{self.prefix}-{step:010d}.safetensors")

  def steps(self) -> list[int]:
    """The steps that have a checkpoint file (intact or not), ascending."""
    found = (self._pattern.fullmatch(n) for n in os.listdir(self.directory))
    return sorted(int(m.group(1)) for m in found if m)

  def entry(self, step: int) -> Entry:
    """Check checkpoint `step`'s integrity (cached while the file is unchanged)."""
    path = self.path(step)
    st = os.stat(path)
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    cached = self._cache.get(path)
    if cached is not None and cached[0] == stamp:
      return cached[1]
    try:
      entry = Entry(step, path, verify(path), None)
    except CheckpointError as e:
      if e.kind not in INTEGRITY_KINDS:
        raise
      entry = Entry(step, path, None, e)
    self._cache[path] = (stamp, entry)
    return entry

  def entries(self) -> list[Entry]:
    """Every checkpoint file, ascending by step, each intact (`info`) or not (`error`)."""
    out = []
    for step in self.steps():
      try:
        out.append(self.entry(step))
      except FileNotFoundError:    # deleted meanwhile by the writer
        continue
    return out

  def best_step(self) -> Optional[int]:
    """The intact checkpoint with the lowest finite `best_metric` (the earliest on ties)."""
    if self.best_metric is None:
      return None
    best = None
    for e in self.entries():
      value = e.info.metrics.get(self.best_metric) if e.info is not None else None
      if value is not None and math.isfinite(value) and (best is None or value < best[0]):
        best = (value, e.step)
    return None if best is None else best[1]

  def cleanup(self) -> list[str]:
    """Delete the temporary files that writes interrupted by a crash left; return their paths."""
    removed = []
    for name in os.listdir(self.directory):
      if self._temp_pattern.fullmatch(name):
        with contextlib.suppress(FileNotFoundError):
          os.unlink(os.path.join(self.directory, name))
          removed.append(os.path.join(self.directory, name))
    return removed

  def save(self, ckpt: Checkpoint, *, overwrite: bool = False) -> str:
    """Write `ckpt` as checkpoint `ckpt.step`, re-read it, then prune old ones; return its path.

    Raises:
      CheckpointError: (kind "exists") that step has a file already and `overwrite` is False;
        or the file just written does not read back intact (nothing is pruned then).
    """
    if not isinstance(ckpt, Checkpoint):
      raise TypeError(f"ckpt must be a jaxrnn.checkpoint.Checkpoint; got {type(ckpt).__name__}.")
    if not self._cleaned:
      self.cleanup()
      self._cleaned = True
    path = save(self.path(ckpt.step), ckpt, overwrite=overwrite)
    written = self.entry(ckpt.step)
    if written.error is not None:
      raise written.error
    self._prune()
    return path

  def _prune(self) -> None:
    intact = [e for e in self.entries() if e.error is None]
    keep = {e.step for e in intact[-self.keep:]}
    best = self.best_step()
    if best is not None:
      keep.add(best)
    for e in intact:
      if e.step not in keep:
        with contextlib.suppress(FileNotFoundError):
          os.unlink(e.path)
        self._cache.pop(e.path, None)

  def _quarantine(self, path: str) -> Optional[str]:
    """Rename a damaged file to `<name>.corrupt[.n]` (never over another file)."""
    for n in range(1000):
      target = f"{path}.corrupt" + (f".{n}" if n else "")
      try:
        _link_no_overwrite(path, target)
      except FileExistsError:
        continue
      except OSError:
        return None
      self._cache.pop(path, None)
      _fsync_dir(self.directory)
      return target
    return None

  def load(self, step: int, *, params, opt_state, key=None) -> Checkpoint:
    """`load(self.path(step), ...)`."""
    return load(self.path(step), params=params, opt_state=opt_state, key=key)

  def restore_latest(self, *, params, opt_state, key=None, quarantine: bool = False
                     ) -> tuple[Optional[Checkpoint], list[Skipped]]:
    """Load the newest intact checkpoint, passing over damaged ones.

    Args:
      params, opt_state, key: templates, as in `load`.
      quarantine: rename each damaged file passed over to `<name>.corrupt` so that a resumed run
        can write that step again (only the directory's writer should do this).

    Returns:
      `(checkpoint or None if there is no intact one, [Skipped(step, path, error, moved_to), ...])`,
      the skipped files newest first.

    Raises:
      CheckpointError: the newest intact checkpoint does not match the templates, or is of
        another version: resuming from an older one would silently lose work.
    """
    skipped = []
    for step in reversed(self.steps()):
      path = self.path(step)
      try:
        return self.load(step, params=params, opt_state=opt_state, key=key), skipped
      except FileNotFoundError:
        continue
      except CheckpointError as e:
        if e.kind not in INTEGRITY_KINDS:
          raise
        skipped.append(Skipped(step, path, e, self._quarantine(path) if quarantine else None))
    return None, skipped
