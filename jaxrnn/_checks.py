"""Input validation shared by every public function.

Everything here runs in Python at trace time, on shapes and dtypes only, so a bad call fails with a
message naming the argument before any computation is staged.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def check_choice(name: str, value, choices: Iterable[str]) -> str:
  """Return `value` if it is one of `choices`, else raise a ValueError listing them."""
  choices = tuple(choices)
  if not isinstance(value, str) or value not in choices:
    raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")
  return value


def shape_of(x) -> tuple[int, ...]:
  return tuple(np.shape(x))


def _shape(name: str, x) -> tuple[int, ...]:
  """`shape_of(x)`, or a ValueError naming `name` for a ragged nest of lists."""
  try:
    return shape_of(x)
  except ValueError:
    raise ValueError(f"{name} must be an array; got a ragged {type(x).__name__}.") from None


def dtype_of(name: str, x):
  """`jnp.result_type(x)`, or a TypeError naming `name` for a list or a non-numeric array."""
  try:
    return jnp.result_type(x)
  except TypeError:
    what = f"dtype {x.dtype}" if hasattr(x, "dtype") else type(x).__name__
    raise TypeError(f"{name} must be a JAX or NumPy array of numbers; got {what}.") from None


def check_float(name: str, x) -> None:
  """Raise a TypeError unless `x` has a floating dtype."""
  dtype = dtype_of(name, x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name} must have a floating dtype (float32 or float64); got {dtype}. "
                    f"Cast it first, e.g. {name}.astype(jnp.float32).")


def check_int(name: str, x) -> None:
  dtype = dtype_of(name, x)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise TypeError(f"{name} must hold integer class indices; got dtype {dtype}.")


def check_shape(name: str, x, expected: Sequence[int | None], what: str = "") -> None:
  """Raise a ValueError unless shape(x) matches `expected` (None matches any size)."""
  shape = _shape(name, x)
  ok = len(shape) == len(expected) and all(e is None or e == s for s, e in zip(shape, expected))
  if not ok:
    want = "[" + ", ".join("?" if e is None else str(e) for e in expected) + "]"
    raise ValueError(f"{name} must have shape {want}{what}; got {list(shape)}.")


def check_sequence_input(name: str, xs, input_size: int | None) -> tuple[tuple[int, ...], int]:
  """Validate `xs: [T, D] or [B, T, D]`; return (batch_shape, T)."""
  shape = _shape(name, xs)
  if len(shape) not in (2, 3):
    raise ValueError(f"{name} must have shape [T, D] (one sequence) or [B, T, D] (a batch, batch "
                     f"first); got rank {len(shape)} with shape {list(shape)}.")
  check_float(name, xs)
  if shape[-2] == 0:
    raise ValueError(f"{name} must have at least one time step (T >= 1); got shape {list(shape)}.")
  if input_size is not None and shape[-1] != input_size:
    raise ValueError(f"{name} must have last axis D = {input_size} (the input size of the params); "
                     f"got shape {list(shape)}.")
  return shape[:-2], shape[-2]


def check_params(name: str, params, expected: Mapping[str, Sequence[int | None]],
                 optional: Mapping[str, Sequence[int | None]] = ()) -> None:
  """Check that `params` is a dict with exactly the expected keys and leaf shapes."""
  if not isinstance(params, Mapping):
    raise TypeError(f"{name} must be a dict of arrays with keys {sorted(expected)}; "
                    f"got {type(params).__name__}.")
  optional = dict(optional)
  missing = sorted(set(expected) - set(params))
  extra = sorted(set(params) - set(expected) - set(optional), key=str)
  if missing or extra:
    raise ValueError(f"{name} must have keys {sorted(expected)}"
                     + (f" (optionally {sorted(optional)})" if optional else "")
                     + f"; missing {missing}, unexpected {extra}.")
  for key, want in {**expected, **optional}.items():
    if key in params:
      check_shape(f"{name}[{key!r}]", params[key], want)
      check_float(f"{name}[{key!r}]", params[key])


def check_key(name: str, key) -> None:
  """Accept a new-style typed key or a legacy uint32[2] key."""
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if key.shape != ():
      raise ValueError(f"{name} must be a single PRNG key; got a key array of shape {key.shape}.")
    return
  shape = shape_of(key)
  if shape != (2,) or jnp.result_type(key) != jnp.uint32:
    raise TypeError(f"{name} must be a PRNG key from jax.random.key(seed) or "
                    f"jax.random.PRNGKey(seed); got {type(key).__name__} with shape {list(shape)}.")


def check_positive_int(name: str, value, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
  return int(value)


def check_bool(name: str, value) -> bool:
  """Return `value` if it is a bool (a truthy string such as "no" must not pass for True)."""
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be True or False; got {value!r}.")
  return bool(value)


def check_float_dtype(name: str, dtype) -> None:
  """Raise unless `dtype` names a floating dtype (what params are initialised in)."""
  try:
    ok = jnp.issubdtype(np.dtype(dtype), jnp.floating)
  except TypeError:
    raise TypeError(f"{name} must be a floating dtype such as jnp.float32; got "
                    f"{dtype!r}.") from None
  if not ok:
    raise TypeError(f"{name} must be a floating dtype such as jnp.float32; got {np.dtype(dtype)}.")


def check_unroll(name: str, value) -> None:
  """`lax.scan`'s `unroll`: a bool (True: unroll fully) or an integer factor >= 1."""
  if not isinstance(value, (bool, np.bool_)):
    check_positive_int(name, value)


def matmul_dtype(name: str, value):
  """`None`, or the floating dtype of matmul operands (e.g. `jnp.bfloat16`) as a `np.dtype`."""
  if value is None:
    return None
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be None or a floating dtype such as jnp.bfloat16; got "
                     f"{value!r}.")
  return dtype


def check_mask_dtype(name: str, mask) -> None:
  """Raise a TypeError unless `mask` holds bools or real numbers (weights)."""
  dtype = getattr(mask, "dtype", None)
  if dtype is None:
    try:
      dtype = np.asarray(mask).dtype
    except ValueError:    # a ragged list; check_shape has reported it already
      dtype = np.dtype(object)
  if not (jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.integer)
          or jnp.issubdtype(dtype, jnp.floating)):
    raise TypeError(f"{name} must hold booleans or real numbers; got dtype {dtype}.")


def concrete(x) -> bool:
  """Whether `x`'s values are known now (not a tracer inside `jit`, `grad` or `vmap`)."""
  return not isinstance(x, jax.core.Tracer)
