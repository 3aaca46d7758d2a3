"""Data-parallel training over a device mesh with `jax.sharding` (one `jax.jit`, no `pmap`).

Shape legend: `B` the global batch, `n` the devices on the mesh's data axis.

The train step of `jaxrnn.train.make_train_step` is compiled once with explicit shardings: every
batch argument is split along its leading (batch) axis over the mesh axis "data"
(`NamedSharding(mesh, P("data"))`: each device holds `B / n` rows), while params, optimiser state
and metrics are replicated (`P()`). The program is still the *global* one, the loss averaged over
all `B` rows, so results do not depend on `n` (up to float reduction order); XLA's partitioner
inserts the all-reduce of the gradients. A batch that `n` does not divide raises a `ValueError`
before anything is traced.

Example (one process, all its devices; on a CPU, simulate 4 with
`XLA_FLAGS=--xla_force_host_platform_device_count=4`, set before JAX starts)::

  spec = jaxrnn.rnn.rnn("lstm", 8, 64, output_size=8)
  loss_fn = lambda p, xs, ys, lengths: jaxrnn.rnn.loss(spec, p, xs, ys, lengths=lengths)
  mesh = make_mesh()                                    # or make_mesh(4): the first 4 devices
  step = make_sharded_train_step(loss_fn, optax.adam(1e-3), mesh)
  params, opt_state, metrics = step(params, opt_state, xs, ys, lengths)   # B divisible by 4

Multi-host: run the same program once per host (process); `jax.distributed.initialize()` first,
then `jax.devices()` lists the devices of *all* processes and `make_mesh()` spans them. Each
process passes its own rows of the batch (`B / num_processes` of them, in process order), or
global `jax.Array`s it built itself; params and optimiser state must be equal on every process
(same seed), and every process must call the step the same number of times (each call is a
collective: a process that stops early, e.g. on a wall-clock budget, hangs the others). On SLURM, Open MPI, Kubernetes and TPU pods `initialize()` finds its arguments;
elsewhere give them (`coordinator_address="host0:1234", num_processes=N, process_id=i`, or
`JAX_COORDINATOR_ADDRESS`, ...). Runnable on one machine, two CPU processes of two devices each::

  for i in 0 1; do python experiments/bench_parallel.py --worker multihost --process-id $i \\
      --num-processes 2 --coordinator localhost:12355 & done; wait

On GPUs: one process per host driving all its GPUs (`make_mesh()`), or one process per GPU with
`jax.distributed.initialize(local_device_ids=[i])`.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxrnn import train

DevicesArg = Union[None, int, Sequence[Any]]


def _cpu_hint(n: int) -> str:
  return (f" On a CPU, simulate {n} devices with XLA_FLAGS=--xla_force_host_platform_device_count"
          f"={n} (or jax.config.update('jax_num_cpu_devices', {n})), set before JAX first runs.")


def make_mesh(devices: DevicesArg = None, *, axis: str = "data") -> Mesh:
  """A one-axis device mesh for data parallelism.

  Args:
    devices: None for every device (of every process, after `jax.distributed.initialize`); an int
      `N` for the first `N` (with several processes, the first `N / num_processes` of each), what a
      `--devices N` flag maps to (see `add_devices_argument`); or an explicit list of devices.
    axis: the name of the mesh axis the batch is split over.

  Returns:
    `Mesh(devices, (axis,))` with an `Auto` axis: shardings are given at `jit` boundaries and
    XLA propagates them inside.

  Example:
    >>> mesh = make_mesh(4)        # Mesh('data': 4)
  """
  if not isinstance(axis, str) or not axis:
    raise ValueError(f"axis must be a non-empty mesh axis name such as 'data'; got {axis!r}.")
  available = jax.devices()
  if devices is None:
    chosen = list(available)
  elif isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
    n, nproc = int(devices), jax.process_count()
    if n < 1:
      raise ValueError(f"devices must be a positive number of devices; got {n}.")
    if n > len(available):
      raise ValueError(f"devices={n} but only {len(available)} device(s) are available "
                       f"({available[0].platform}: {available})." + _cpu_hint(n))
    if n % nproc:
      raise ValueError(f"devices={n} must be a multiple of the {nproc} processes (each process "
                       f"contributes the same number of its devices).")
    chosen = [d for p in range(nproc)
              for d in [d for d in available if d.process_index == p][:n // nproc]]
  elif isinstance(devices, Sequence) and devices and all(isinstance(d, jax.Device)
                                                         for d in devices):
    chosen = list(devices)
  else:
    raise TypeError("devices must be None (all devices), a positive int, or a non-empty list of "
                    f"jax.Device; got {devices!r}.")
  return Mesh(np.array(chosen), (axis,), axis_types=(AxisType.Auto,))


def add_devices_argument(parser, *, default: Optional[int] = None):
  """Add `--devices N` to an `argparse` parser; pass `args.devices` to `make_mesh`.

  Example:
    >>> parallel.add_devices_argument(parser)
    >>> mesh = parallel.make_mesh(parser.parse_args().devices)
  """
  parser.add_argument(
      "--devices", type=int, default=default, metavar="N",
      help="train data-parallel on the first N devices (default: all). On a CPU, simulate N "
           "devices with XLA_FLAGS=--xla_force_host_platform_device_count=N")
  return parser


def _check_axis(mesh, axis) -> int:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. jaxrnn.parallel.make_mesh()); got "
                    f"{type(mesh).__name__}.")
  if axis not in mesh.axis_names:
    raise ValueError(f"axis must be one of the mesh's axes {mesh.axis_names}; got {axis!r}.")
  return mesh.shape[axis]


def _local_devices(mesh) -> int:
  me = jax.process_index()
  return sum(d.process_index == me for d in mesh.devices.flat)


def _place(x, sharding):
  """`x` as a global `jax.Array` with `sharding` (a process's own rows, with several processes)."""
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x  # already global: jit reshards if needed
  return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def replicate(mesh: Mesh, tree):
  """Every leaf of `tree` (params, optimiser state) as a copy on every device of `mesh`."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: _place(x, sharding), tree)


def check_batch(mesh: Mesh, name: str, x, *, axis: str = "data") -> None:
  """Raise a ValueError unless every leaf of `x` has a leading batch axis the mesh can split.

  With one process the batch is `x`'s first axis and must be a multiple of the devices on `axis`;
  with several, `x` holds this process's rows and must be a multiple of its own devices there.
  """
  n = _check_axis(mesh, axis)
  local_rows = jax.process_count() > 1
  for path, leaf in jax.tree_util.tree_leaves_with_path(x):
    where = name + jax.tree_util.keystr(path)
    shape = np.shape(leaf)
    if not shape:
      raise ValueError(f"{where} must have a leading batch axis to split over the devices; got a "
                       f"scalar. Leave it out of batch_argnums to replicate it.")
    global_array = isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
    split = _local_devices(mesh) if local_rows and not global_array else n
    if shape[0] % split:
      scope = "this process's" if split != n else "the"
      raise ValueError(
          f"{where} has batch size {shape[0]} (axis 0), which {scope} {split} device(s) on mesh "
          f"axis {axis!r} cannot split evenly; use a batch size that is a multiple of {split} "
          f"(e.g. {split * math.ceil(shape[0] / split)}) or a mesh of fewer devices "
          f"(jaxrnn.parallel.make_mesh(devices=...)).")


def shard_batch(mesh: Mesh, *batch, axis: str = "data") -> tuple:
  """Each argument (a pytree of `[B, ...]` arrays) split along axis 0 over the mesh's `axis`."""
  sharding = NamedSharding(mesh, P(axis))
  for j, x in enumerate(batch):
    check_batch(mesh, f"batch[{j}]", x, axis=axis)
  return tuple(jax.tree.map(lambda x: _place(x, sharding), x) for x in batch)


def _arg_names(fn) -> list[str]:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return []
  return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def make_sharded_train_step(loss_fn: Callable[..., jax.Array],
                            optimizer: optax.GradientTransformation, mesh: Mesh, *,
                            value_and_grad_fn: Optional[Callable[..., tuple]] = None,
                            batch_argnums: Optional[Sequence[int]] = None, axis: str = "data",
                            skip_nonfinite: bool = True) -> Callable:
  """`jaxrnn.train.make_train_step`, compiled to run data-parallel over `mesh`.

  Builds `step(params, opt_state, *batch) -> (params, opt_state, metrics)` exactly as
  `make_train_step` does (same arguments, same `metrics`), then `jax.jit`s it with
  `in_shardings`: params and optimiser state replicated, the batch arguments split along axis 0
  over `axis`; `out_shardings`: all replicated. One compilation per number of batch arguments;
  later calls with the same shapes reuse it.

  Args:
    loss_fn: `loss_fn(params, *batch) -> scalar`, the mean over the batch (as `jaxrnn.rnn.loss`).
    optimizer: any `optax.GradientTransformation`.
    mesh: from `make_mesh`.
    value_and_grad_fn: as in `make_train_step` (e.g. a manual BPTT).
    batch_argnums: which positional arguments of `step` have a leading batch axis to split
      (counting `params` as 0 and `opt_state` as 1, so the batch starts at 2); default: all of
      them. Others (an `h0 [K, B, H]` say) are replicated.
    axis: the mesh axis to split the batch over.
    skip_nonfinite: as in `make_train_step`.

  Returns:
    The step. Arguments may be NumPy or `jax.Array`s anywhere; they are placed on the mesh first.
    With several processes each passes its own rows of every batch argument.

  Raises:
    ValueError, at call time before tracing: a batch argument whose batch size is not a multiple
    of the number of devices on `axis` (the message names the argument, its size and `n`).

  Example:
    >>> mesh = make_mesh(4)
    >>> step = make_sharded_train_step(loss_fn, optax.adam(1e-3), mesh)
    >>> params, opt_state, metrics = step(params, opt_state, xs, ys)     # xs [8, T, D]: 2 rows each
  """
  _check_axis(mesh, axis)
  if batch_argnums is not None:
    if (isinstance(batch_argnums, (str, bytes)) or not isinstance(batch_argnums, Sequence)
        or not all(isinstance(i, int) and i >= 2 for i in batch_argnums)):
      raise ValueError("batch_argnums must be a sequence of positional indices of the step's "
                       "arguments >= 2 (0 is params, 1 is opt_state); got "
                       f"{batch_argnums!r}.")
    batch_argnums = frozenset(batch_argnums)
  step = train.make_train_step(loss_fn, optimizer, value_and_grad_fn=value_and_grad_fn,
                               skip_nonfinite=skip_nonfinite, jit=False)
  names = _arg_names(value_and_grad_fn if value_and_grad_fn is not None else loss_fn)
  replicated = NamedSharding(mesh, P())
  split = NamedSharding(mesh, P(axis))
  compiled: dict[int, Callable] = {}

  def sharded_step(params, opt_state, *batch):
    argnums = frozenset(range(2, 2 + len(batch))) if batch_argnums is None else batch_argnums
    if batch_argnums is not None and max(argnums) >= 2 + len(batch):
      raise ValueError(f"batch_argnums {sorted(argnums)} names argument {max(argnums)}, but the "
                       f"step got only {2 + len(batch)} arguments (params, opt_state and "
                       f"{len(batch)} batch arguments).")
    shardings = tuple(split if 2 + j in argnums else replicated for j in range(len(batch)))
    for j, x in enumerate(batch):
      if 2 + j in argnums:
        name = names[1 + j] if 1 + j < len(names) else f"batch[{j}]"
        check_batch(mesh, f"{name} (argument {2 + j} of the train step)", x, axis=axis)
    placed = tuple(jax.tree.map(lambda leaf, s=s: _place(leaf, s), x)
                   for x, s in zip(batch, shardings))
    fn = compiled.get(len(batch))
    if fn is None:
      fn = compiled[len(batch)] = train.jit_step(
          step, in_shardings=(replicated, replicated, *shardings),
          out_shardings=(replicated, replicated, replicated))
    return fn(replicate(mesh, params), replicate(mesh, opt_state), *placed)

  return sharded_step
