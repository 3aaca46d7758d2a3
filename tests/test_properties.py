"""Property-based tests of the public API (hypothesis): invariants over random valid inputs, and a
clear ValueError / TypeError naming the argument for every kind of malformed input.

Every property is bounded and derandomized (`bounded`), so a run tests the same examples on every
machine. JAX compiles once per new shape, so shapes come from small ranges, each valid-input example
is one `jax.jit` call, and the malformed-input properties never compute anything: their base inputs
are NumPy arrays, and a `lax.scan` started before the error counts as a failure.

The number of malformed cases run, per public function, goes to `malformed_counts.json` in
`$JAXRNN_PROPERTY_REPORT` (default: pytest's temporary directory); `test_malformed_case_count`
prints it and checks there were enough.
"""
import collections
import contextlib
import functools
import json
import math
import os
import pickle
import re
import string
import traceback
from typing import NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import jaxrnn
from jaxrnn import checkpoint, elman, rnn, tbptt
from conftest import rel_err


def bounded(max_examples: int):
  """Deterministic, deadline-free, database-free settings with `max_examples` examples."""
  return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.filter_too_much])


FS = ("tanh", "sigmoid", "relu")
GS = ("identity", "sigmoid", "softmax")
LOSSES = ("mse", "xent", "bce")
CELLS = ("elman", "elman_relu", "lstm", "gru")
BATCH = st.sampled_from([(), (1,), (2,), (3,)])   # () is one unbatched sequence
SIZE = st.integers(1, 5)
TIME = st.integers(1, 6)
SEED = st.integers(0, 2 ** 16)
TOL64 = 1e-10


def _targets(rng, loss, batch_time, o, dtype=np.float32):
  if loss == "xent":
    return np.asarray(rng.integers(0, o, size=batch_time), np.int32)
  if loss == "bce":
    return rng.uniform(size=(*batch_time, o)).astype(dtype)
  return rng.normal(size=(*batch_time, o)).astype(dtype)


def _carry(spec, batch, rng, dtype=np.float32):
  """A random initial carry in PyTorch's layout, `[K, *batch, H]` (a tuple (h, c) for LSTM)."""
  k = spec.num_layers * spec.num_directions
  parts = tuple(0.5 * rng.normal(size=(k, *batch, spec.hidden_size)).astype(dtype)
                for _ in range(spec.cell.carry_size))
  return parts[0] if spec.cell.carry_size == 1 else parts


def _max_rel_err(got, want):
  """The largest per-leaf `rel_err` over two pytrees of the same structure."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  return max((rel_err(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))),
             default=0.0)


# ================================================================================================
# 1. Valid inputs: invariants.


class RnnProblem(NamedTuple):
  spec: rnn.RNN
  batch: tuple
  t: int
  loss: str
  seed: int
  with_carry: bool
  with_lengths: bool
  with_key: bool
  unroll: int


@st.composite
def rnn_problems(draw):
  layers = draw(st.integers(1, 2))
  spec = rnn.rnn(draw(st.sampled_from(CELLS)), draw(SIZE), draw(SIZE), num_layers=layers,
                 bidirectional=draw(st.booleans()), output_size=draw(SIZE),
                 dropout=draw(st.sampled_from([0.0, 0.5])) if layers == 2 else 0.0,
                 learn_initial_state=draw(st.booleans()))
  return RnnProblem(spec, draw(BATCH), draw(TIME), draw(st.sampled_from(LOSSES)), draw(SEED),
                    draw(st.booleans()), draw(st.booleans()),
                    spec.dropout > 0 and draw(st.booleans()), draw(st.sampled_from([1, 2])))


@functools.partial(jax.jit, static_argnames=("spec", "loss", "unroll"))
def _rnn_both_grads(spec, params, xs, targets, carry0, lengths, key, *, loss, unroll):
  out = {}
  for backward in ("manual", "autodiff"):
    fn = lambda p, x, c: rnn.loss(spec, p, x, targets, c, loss=loss, lengths=lengths, key=key,
                                  backward=backward, unroll=unroll)
    out[backward] = jax.value_and_grad(fn, argnums=(0, 1, 2))(params, xs, carry0)
  return out


@bounded(12)
@given(problem=rnn_problems())
def test_rnn_manual_grads_equal_autodiff(problem):
  """rnn.loss: backward="manual" == "autodiff" in float64, for params, xs and carry0."""
  spec, batch, t = problem.spec, problem.batch, problem.t
  rng = np.random.default_rng(problem.seed)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda v: v.astype(jnp.float64),
                          rnn.init(jax.random.key(problem.seed), spec))
    if spec.learn_initial_state:   # nonzero, so its gradient path is exercised
      params["carry0"] = params["carry0"] + rng.normal(size=params["carry0"].shape)
    xs = jnp.asarray(rng.normal(size=(*batch, t, spec.input_size)))
    targets = jnp.asarray(_targets(rng, problem.loss, (*batch, t), spec.output_size, np.float64))
    carry0 = jax.tree.map(jnp.asarray, _carry(spec, batch, rng, np.float64)) \
        if problem.with_carry else None
    lengths = jnp.asarray(rng.integers(1, t + 1, size=batch), jnp.int32) \
        if problem.with_lengths else None
    key = jax.random.key(problem.seed + 1) if problem.with_key else None
    out = _rnn_both_grads(spec, params, xs, targets, carry0, lengths, key, loss=problem.loss,
                          unroll=problem.unroll)
    (v_m, g_m), (v_a, g_a) = out["manual"], out["autodiff"]
    assert rel_err(v_m, v_a) <= TOL64, (rel_err(v_m, v_a), problem)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(g_m), jax.tree.leaves(g_a)):
      assert got.dtype == jnp.float64
      assert rel_err(got, want) <= TOL64, (jax.tree_util.keystr(path), rel_err(got, want), problem)


class ElmanProblem(NamedTuple):
  batch: tuple
  t: int
  d: int
  h: int
  o: int
  f: str
  loss: str
  seed: int
  with_h0: bool
  mask: str
  unroll: int


elman_problems = st.builds(ElmanProblem, BATCH, TIME, SIZE, SIZE, SIZE, st.sampled_from(FS),
                           st.sampled_from(LOSSES), SEED, st.booleans(),
                           st.sampled_from(["none", "bool", "weights"]), st.sampled_from([1, 2]))


@functools.partial(jax.jit, static_argnames=("f", "loss", "unroll"))
def _elman_manual_and_autodiff(params, xs, targets, h0, mask, *, f, loss, unroll):
  manual = elman.manual_value_and_grad(params, xs, targets, h0, f=f, loss=loss, mask=mask,
                                       wrt_inputs=True, unroll=unroll)
  auto = jax.value_and_grad(
      lambda p, x, h: elman.loss(p, x, targets, h, f=f, loss=loss, mask=mask,
                                 backward="autodiff", unroll=unroll),
      argnums=(0, 1, 2))(params, xs, h0)
  return manual, auto


@bounded(15)
@given(problem=elman_problems)
def test_elman_manual_value_and_grad_equals_autodiff(problem):
  """elman.manual_value_and_grad == jax.value_and_grad(elman.loss, backward="autodiff"), float64."""
  p = problem
  rng = np.random.default_rng(p.seed)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda v: v.astype(jnp.float64),
                          elman.init(jax.random.key(p.seed), p.d, p.h, p.o))
    xs = jnp.asarray(rng.normal(size=(*p.batch, p.t, p.d)))
    targets = jnp.asarray(_targets(rng, p.loss, (*p.batch, p.t), p.o, np.float64))
    h0 = jnp.asarray(0.5 * rng.normal(size=(*p.batch, p.h))) if p.with_h0 else None
    mask = {"none": None,
            "bool": jnp.asarray(rng.uniform(size=(*p.batch, p.t)) < 0.7),
            "weights": jnp.asarray(rng.uniform(size=(*p.batch, p.t)))}[p.mask]
    (v_m, g_m, gin_m), (v_a, (g_a, gx_a, gh0_a)) = _elman_manual_and_autodiff(
        params, xs, targets, h0, mask, f=p.f, loss=p.loss, unroll=p.unroll)
    assert rel_err(v_m, v_a) <= TOL64, (rel_err(v_m, v_a), p)
    assert g_m.keys() == params.keys()
    for k in params:
      assert g_m[k].shape == params[k].shape and g_m[k].dtype == jnp.float64
      assert rel_err(g_m[k], g_a[k]) <= TOL64, (k, rel_err(g_m[k], g_a[k]), p)
    assert rel_err(gin_m["xs"], gx_a) <= TOL64, (rel_err(gin_m["xs"], gx_a), p)
    if p.with_h0:
      assert rel_err(gin_m["h0"], gh0_a) <= TOL64, (rel_err(gin_m["h0"], gh0_a), p)


@functools.partial(jax.jit, static_argnames=("spec", "lens"))
def _padded_masked_and_alone(spec, params, xs, carry0, *, lens):
  lengths = jnp.asarray(lens, jnp.int32)
  prefix = jnp.arange(xs.shape[1])[None, :] < lengths[:, None]
  padded = rnn.apply(spec, params, xs, carry0, lengths=lengths)
  masked = rnn.apply(spec, params, xs, carry0, mask=prefix)
  alone = [rnn.apply(spec, params, xs[b, :n],
                     None if carry0 is None else jax.tree.map(lambda c: c[:, b], carry0))
           for b, n in enumerate(lens)]
  return padded, masked, alone


@bounded(10)
@given(cell=st.sampled_from(CELLS), layers=st.integers(1, 2), bidirectional=st.booleans(),
       b=st.integers(1, 3), t=TIME, d=SIZE, h=SIZE, with_carry=st.booleans(),
       fill=st.sampled_from([0.0, 1e3, np.nan]), dtype=st.sampled_from(["float32", "float64"]),
       seed=SEED, data=st.data())
def test_padded_batch_equals_each_sequence_alone(cell, layers, bidirectional, b, t, d, h,
                                                 with_carry, fill, dtype, seed, data):
  """rnn.apply on a padded batch with `lengths` (or the same prefix `mask`) gives, per sequence,
  the outputs and final carry of that sequence run alone, in the params' dtype; padded steps
  output exact zeros, and whatever fills the padding (even NaN) leaks nowhere."""
  lens = tuple(data.draw(st.lists(st.integers(1, t), min_size=b, max_size=b), label="lengths"))
  spec = rnn.rnn(cell, d, h, num_layers=layers, bidirectional=bidirectional)
  rng = np.random.default_rng(seed)
  tol = dict(rtol=1e-10, atol=1e-12) if dtype == "float64" else dict(rtol=2e-5, atol=2e-6)
  with jax.enable_x64(dtype == "float64"):
    params = jax.tree.map(lambda v: v.astype(dtype), rnn.init(jax.random.key(seed), spec))
    xs = rng.normal(size=(b, t, d)).astype(dtype)
    xs[np.arange(t)[None, :] >= np.asarray(lens)[:, None]] = fill
    carry0 = jax.tree.map(jnp.asarray, _carry(spec, (b,), rng, dtype)) if with_carry else None
    (hs, carry_T), (hs_m, carry_m), alone = _padded_masked_and_alone(
        spec, params, jnp.asarray(xs), carry0, lens=lens)
    assert np.isfinite(np.asarray(hs)).all()
    assert all(x.dtype == dtype for x in jax.tree.leaves((hs, carry_T, alone)))
    assert _max_rel_err((hs_m, carry_m), (hs, carry_T)) <= tol["rtol"]
    for i, (n, (hs_i, carry_i)) in enumerate(zip(lens, alone)):
      assert hs_i.shape == (n, spec.num_directions * h)
      np.testing.assert_allclose(hs[i, :n], hs_i, **tol)
      assert not np.asarray(hs[i, n:]).any(), "padded steps must output zeros"
      for got, want in zip(jax.tree.leaves(carry_T), jax.tree.leaves(carry_i)):
        np.testing.assert_allclose(got[:, i], want, **tol)


# ------------------------------------------------------------------------------ round trips
LEAF_DTYPES = ("float32", "float64", "float16", "bfloat16", "int8", "int32", "int64", "uint8",
               "uint32", "bool")


@st.composite
def leaves(draw):
  dtype = jnp.dtype(draw(st.sampled_from(LEAF_DTYPES)))
  shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
  rng = np.random.default_rng(draw(SEED))
  if dtype == np.bool_:
    return np.asarray(rng.uniform(size=shape) < 0.5)
  if jnp.issubdtype(dtype, jnp.integer):
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
  x = (rng.normal(size=shape) * 10.0 ** rng.integers(-3, 4)).astype(dtype)
  if x.size and draw(st.booleans()):   # non-finite values and -0.0 must survive bit for bit
    x.reshape(-1)[rng.integers(x.size)] = rng.choice([np.nan, np.inf, -np.inf, -0.0])
  return x


NAMES = st.text(string.ascii_lowercase + "_", min_size=1, max_size=4)
pytrees = st.recursive(
    leaves(),
    lambda children: st.one_of(st.dictionaries(NAMES, children, min_size=1, max_size=3),
                               st.lists(children, min_size=1, max_size=3),
                               st.tuples(children, children)),
    max_leaves=6)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 60, 2 ** 60)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children,
                                                                      max_size=3),
    max_leaves=5)


def _assert_bitwise_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    a, b = np.asarray(a), np.asarray(b)
    assert (a.dtype, a.shape) == (b.dtype, b.shape), jax.tree_util.keystr(path)
    assert a.tobytes() == b.tobytes(), jax.tree_util.keystr(path)


def _float_leaves(tree):
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def _fill_like(tree, rng):
  """Random values with the structure, shapes and dtypes of `tree` (of ShapeDtypeStructs)."""
  return jax.tree.map(lambda s: np.asarray(rng.normal(size=s.shape) * 3).astype(s.dtype), tree)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
  return tmp_path_factory.mktemp("properties")


@bounded(40)
@given(params=pytrees, step=st.integers(0, 2 ** 62), key=st.sampled_from([None, "key", "rbg",
                                                                          "legacy"]),
       seed=SEED, metrics=st.dictionaries(NAMES, st.floats() | st.integers(-99, 99), max_size=3),
       config=st.dictionaries(st.text(max_size=6), JSON, max_size=3), data_position=JSON,
       via_file=st.booleans())
def test_checkpoint_round_trip_is_exact(scratch, params, step, key, seed, metrics, config,
                                        data_position, via_file):
  """checkpoint.save/load and to_bytes/from_bytes restore any pytree of arrays (every dtype, NaN,
  -0.0, empty shapes), an Adam state, a PRNG key of any kind and the record, bit for bit."""
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    opt_state = _fill_like(jax.eval_shape(optax.adam(1e-3).init, _float_leaves(params)), rng)
    prng = {None: None, "key": jax.random.key(seed), "rbg": jax.random.key(seed, impl="rbg"),
            "legacy": jax.random.PRNGKey(seed)}[key]
    ckpt = checkpoint.Checkpoint(params, opt_state, step, prng, data_position, config, metrics)
    if via_file:
      path = checkpoint.save(os.path.join(scratch, f"ckpt-{seed}.safetensors"), ckpt,
                             overwrite=True)
      back = checkpoint.load(path, params=params, opt_state=opt_state, key=prng)
    else:
      back = checkpoint.from_bytes(checkpoint.to_bytes(ckpt), params=params, opt_state=opt_state)
    _assert_bitwise_equal(back.params, params)
    _assert_bitwise_equal(back.opt_state, opt_state)
    assert type(back.opt_state[0]) is type(opt_state[0])
    if prng is None:
      assert back.key is None
    elif key == "legacy":
      _assert_bitwise_equal(back.key, prng)
    else:
      assert str(jax.random.key_impl(back.key)) == str(jax.random.key_impl(prng))
      _assert_bitwise_equal(jax.random.key_data(back.key), jax.random.key_data(prng))
    assert (back.step, back.config, back.data_position) == (step, config, data_position)
    assert back.metrics.keys() == metrics.keys()
    for name, value in metrics.items():
      assert back.metrics[name] == value or (math.isnan(value) and math.isnan(back.metrics[name]))


@bounded(25)
@given(kind=st.sampled_from(["rnn_tanh", "rnn_relu", "lstm", "gru"]), d=SIZE, h=SIZE,
       layers=st.integers(1, 3), bidirectional=st.booleans(), bias=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), prefix=st.sampled_from(["", "rnn."]),
       seed=SEED)
def test_torch_state_dict_round_trip_is_exact(kind, d, h, layers, bidirectional, bias, dtype,
                                              prefix, seed):
  """interop: state dict -> from_torch -> to_torch is the identity (keys, order, dtypes, bits),
  and so is params -> to_torch -> params_from_torch."""
  interop = pytest.importorskip("jaxrnn.interop")
  spec = rnn.rnn(interop.torch_cell(kind), d, h, num_layers=layers, bidirectional=bidirectional)
  rng = np.random.default_rng(seed)
  state_dict = {prefix + k: rng.normal(size=s).astype(dtype)
                for k, s in interop.torch_shapes(spec, bias=bias).items()}
  with jax.enable_x64(dtype == np.float64):
    spec_back, params = interop.from_torch(state_dict, kind, prefix=prefix)
    assert spec_back == spec
    back = interop.to_torch(spec_back, params, bias=bias, prefix=prefix)
    assert list(back) == list(state_dict)
    _assert_bitwise_equal(back, state_dict)
    _assert_bitwise_equal(interop.params_from_torch(spec, back, prefix=prefix), params)


# ================================================================================================
# 2. Malformed calls: a ValueError or TypeError raised by jaxrnn's own checks, naming the argument.

JAXRNN_DIR = os.path.dirname(os.path.abspath(jaxrnn.__file__))
COUNTS = collections.Counter()        # public function -> malformed cases run
RAN = set()                           # the parametrized malformed-input tests that ran
KIND_COUNTS = collections.Counter()   # kind of malformation -> cases run


class _ComputationStarted(AssertionError):
  pass


@contextlib.contextmanager
def _no_computation():
  """A `lax.scan` (every recurrence runs in one) before the error means validation came late."""
  def forbidden(*args, **kwargs):
    raise _ComputationStarted("computation started before the malformed input was rejected")
  with mock.patch.object(jax.lax, "scan", forbidden), \
       mock.patch.object(jax.lax, "associative_scan", forbidden):
    yield


def _mentions(message: str, name: str) -> bool:
  return re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message) is not None


def expect_clear_error(target: str, kind: str, names, call, *, guard: bool = True):
  """`call()` must raise a ValueError / TypeError from jaxrnn that mentions one of `names`."""
  COUNTS[target] += 1
  KIND_COUNTS[kind] += 1
  where = f"{target} [{kind}]"
  try:
    with _no_computation() if guard else contextlib.nullcontext():
      result = call()
  except _ComputationStarted:
    pytest.fail(f"{where}: computation started before the malformed input was rejected")
  except (ValueError, TypeError) as err:
    message = str(err)
    origin = traceback.extract_tb(err.__traceback__)[-1].filename
    assert os.path.abspath(origin).startswith(JAXRNN_DIR), (
        f"{where}: {type(err).__name__} came from {origin}, not from jaxrnn's checks: {message}")
    assert any(_mentions(message, n) for n in names), (
        f"{where}: the {type(err).__name__} does not name {' or '.join(names)}: {message}")
    return
  except Exception as err:  # noqa: BLE001 - any other type is the failure being tested for
    pytest.fail(f"{where}: raised {type(err).__name__} instead of ValueError/TypeError: {err}")
  pytest.fail(f"{where}: malformed input accepted silently (returned {type(result).__name__})")


# Values that are wrong in every position of their kind.
BAD_FLOAT_DTYPES = (np.int8, np.int32, np.uint8, np.bool_, np.complex64)
BAD_INT_DTYPES = (np.float32, np.float16, np.bool_, np.complex64)
BAD_SIZES = (0, -1, -7, 2.5, True, False, "3", None, np.float64(3.0))
BAD_UNROLL = (0, -1, 1.5, "2", None, np.float32(2.0))
BAD_BOOLS = ("no", "False", 1, 0, None, 0.0, [True])
BAD_PARAMS = (None, 3, "params", [1.0, 2.0], (), np.zeros(3, np.float32))
BAD_OPTION = st.one_of(st.text(max_size=8), st.sampled_from([None, 0, 1.5, ["tanh"], b"mse"]))
BAD_DROPOUT = (-0.1, 1.0, 1.5, float("nan"), float("inf"), "0.1", True, None, [0.1])


def _bad_keys():
  return (0, 7, 1.5, None, "key", np.zeros(2, np.float32), np.zeros(3, np.uint32),
          np.zeros((2, 2), np.uint32), np.zeros(2, np.int32), jax.random.split(jax.random.key(0)))


@st.composite
def wrong_shapes(draw, shape):
  """A shape other than `shape`: one axis resized, one dropped or inserted, or any other."""
  shape = tuple(shape)
  how = draw(st.sampled_from(("resize", "drop", "insert", "any") if shape else ("insert", "any")))
  if how == "resize":
    i = draw(st.integers(0, len(shape) - 1))
    out = shape[:i] + (draw(st.integers(0, 7).filter(lambda n: n != shape[i])),) + shape[i + 1:]
  elif how == "drop":
    i = draw(st.integers(0, len(shape) - 1))
    out = shape[:i] + shape[i + 1:]
  elif how == "insert":
    i = draw(st.integers(0, len(shape)))
    out = shape[:i] + (draw(st.integers(1, 3)),) + shape[i:]
  else:
    out = tuple(draw(st.lists(st.integers(0, 6), max_size=4)))
  assume(out != shape)
  return out


def _not_an_array(draw, x):
  """Something in place of the float array `x` that is not one."""
  return draw(st.sampled_from([
      np.asarray(x).tolist(), np.full(np.shape(x), "a"), None, "x", {"x": x},
      np.asarray(x).astype(object)]))


def _replace_leaf(tree, index, value):
  leaves_, treedef = jax.tree.flatten(tree)
  leaves_[index] = value
  return jax.tree.unflatten(treedef, leaves_)


def _mutate_leaf(draw, tree, how):
  """`tree` with one leaf given a wrong shape ("shape") or a non-float dtype ("dtype")."""
  leaves_ = jax.tree.leaves(tree)
  i = draw(st.integers(0, len(leaves_) - 1))
  if how == "shape":
    value = np.zeros(draw(wrong_shapes(np.shape(leaves_[i]))), np.float32)
  else:
    value = np.asarray(leaves_[i]).astype(draw(st.sampled_from(BAD_FLOAT_DTYPES)))
  return _replace_leaf(tree, i, value)


def _must_not_run(*args, **kwargs):
  raise AssertionError("a step ran before the malformed input was rejected")


# ------------------------------------------------------------------------------ elman
class ElmanBase(NamedTuple):
  params: dict
  xs: np.ndarray
  targets: np.ndarray
  h0: object
  mask: object
  f: str
  loss: str
  batch: tuple
  t: int
  d: int
  h: int
  o: int
  rng: np.random.Generator


@st.composite
def elman_bases(draw):
  batch, t, d, h, o = draw(BATCH), draw(TIME), draw(SIZE), draw(SIZE), draw(SIZE)
  loss = draw(st.sampled_from(LOSSES))
  rng = np.random.default_rng(draw(SEED))
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  params = {"U": normal(h, d), "W": normal(h, h), "b": normal(h), "V": normal(o, h), "c": normal(o)}
  h0 = normal(*batch, h) if draw(st.booleans()) else None
  mask = (rng.uniform(size=(*batch, t)) < 0.7).astype(np.float32) if draw(st.booleans()) else None
  return ElmanBase(params, normal(*batch, t, d), _targets(rng, loss, (*batch, t), o), h0, mask,
                   draw(st.sampled_from(FS)), loss, batch, t, d, h, o, rng)


ELMAN_FNS = ("elman.forward", "elman.loss", "elman.manual_value_and_grad")


def elman_call(target, base, **change):
  """A thunk calling `target` on `base` with some arguments changed."""
  a = {"params": base.params, "xs": base.xs, "targets": base.targets, "h0": base.h0,
       "f": base.f, "loss": base.loss, "mask": base.mask}
  a.update({k: v for k, v in change.items() if k in a})
  extra = {k: v for k, v in change.items() if k not in a}
  if target == "elman.forward":
    return lambda: elman.forward(a["params"], a["xs"], a["h0"], f=a["f"], **extra)
  fn = elman.loss if target == "elman.loss" else elman.manual_value_and_grad
  return lambda: fn(a["params"], a["xs"], a["targets"], a["h0"], f=a["f"], loss=a["loss"],
                    mask=a["mask"], **extra)


ELMAN_BAD = {}


def elman_bad(fn):
  ELMAN_BAD[fn.__name__] = fn
  return fn


@elman_bad
def xs_rank(draw, b):
  rank = draw(st.sampled_from([0, 1, 4, 5]))
  return ELMAN_FNS, ("xs",), dict(xs=np.zeros((2,) * rank, np.float32))


@elman_bad
def xs_last_axis(draw, b):
  d = draw(st.integers(0, 6).filter(lambda n: n != b.d))
  return ELMAN_FNS, ("xs",), dict(xs=np.zeros((*b.batch, b.t, d), np.float32))


@elman_bad
def xs_dtype(draw, b):
  return ELMAN_FNS, ("xs",), dict(xs=b.xs.astype(draw(st.sampled_from(BAD_FLOAT_DTYPES))))


@elman_bad
def xs_no_steps(draw, b):
  return ELMAN_FNS, ("xs",), dict(xs=np.zeros((*b.batch, 0, b.d), np.float32))


@elman_bad
def xs_not_array(draw, b):
  return ELMAN_FNS, ("xs",), dict(xs=_not_an_array(draw, b.xs))


@elman_bad
def h0_shape(draw, b):
  return ELMAN_FNS, ("h0",), dict(h0=np.zeros(draw(wrong_shapes((*b.batch, b.h))), np.float32))


@elman_bad
def h0_dtype(draw, b):
  h0 = np.zeros((*b.batch, b.h), draw(st.sampled_from(BAD_FLOAT_DTYPES)))
  return ELMAN_FNS, ("h0",), dict(h0=h0)


@elman_bad
def h0_structure(draw, b):
  h0 = np.zeros((*b.batch, b.h), np.float32)
  return ELMAN_FNS, ("h0",), dict(h0=draw(st.sampled_from([(h0,), [h0, h0], {"h": h0}])))


@elman_bad
def params_missing_keys(draw, b):
  drop = draw(st.sets(st.sampled_from(sorted(b.params)), min_size=1))
  return ELMAN_FNS, ("params",), dict(params={k: v for k, v in b.params.items() if k not in drop})


@elman_bad
def params_extra_keys(draw, b):
  extra = draw(st.sets(st.sampled_from(["bh", "d", "W2", "u", 0, ("U",)]), min_size=1))
  return ELMAN_FNS, ("params",), dict(params={**b.params, **{k: b.params["c"] for k in extra}})


@elman_bad
def params_leaf_shape(draw, b):
  return ELMAN_FNS, ("params",), dict(params=_mutate_leaf(draw, b.params, "shape"))


@elman_bad
def params_leaf_dtype(draw, b):
  return ELMAN_FNS, ("params",), dict(params=_mutate_leaf(draw, b.params, "dtype"))


@elman_bad
def params_not_a_dict(draw, b):
  return ELMAN_FNS, ("params",), dict(params=draw(st.sampled_from(BAD_PARAMS)))


@elman_bad
def unknown_f(draw, b):
  return ELMAN_FNS, ("f",), dict(f=draw(BAD_OPTION.filter(lambda v: v not in FS)))


@elman_bad
def unknown_g(draw, b):
  return ("elman.forward",), ("g",), dict(g=draw(BAD_OPTION.filter(lambda v: v not in GS)))


@elman_bad
def unknown_loss(draw, b):
  bad = draw(BAD_OPTION.filter(lambda v: v not in LOSSES))
  return ("elman.loss", "elman.manual_value_and_grad"), ("loss",), dict(loss=bad)


@elman_bad
def unknown_backward(draw, b):
  bad = draw(BAD_OPTION.filter(lambda v: v not in ("manual", "autodiff")))
  return ("elman.forward", "elman.loss"), ("backward",), dict(backward=bad)


@elman_bad
def bad_unroll(draw, b):
  return ELMAN_FNS, ("unroll",), dict(unroll=draw(st.sampled_from(BAD_UNROLL)))


@elman_bad
def bad_wrt_inputs(draw, b):
  return (("elman.manual_value_and_grad",), ("wrt_inputs",),
          dict(wrt_inputs=draw(st.sampled_from(BAD_BOOLS))))


LOSS_FNS = ("elman.loss", "elman.manual_value_and_grad")


@elman_bad
def float_class_targets(draw, b):
  shape = draw(st.sampled_from([(*b.batch, b.t), (*b.batch, b.t, b.o)]))
  return LOSS_FNS, ("targets",), dict(loss="xent", targets=np.zeros(shape, np.float32))


@elman_bad
def targets_shape(draw, b):
  want = (*b.batch, b.t) if b.loss == "xent" else (*b.batch, b.t, b.o)
  dtype = np.int32 if b.loss == "xent" else np.float32
  return LOSS_FNS, ("targets",), dict(targets=np.zeros(draw(wrong_shapes(want)), dtype))


@elman_bad
def class_targets_out_of_range(draw, b):
  classes = np.asarray(b.rng.integers(0, b.o, size=(*b.batch, b.t)), np.int32)
  classes.reshape(-1)[draw(st.integers(0, classes.size - 1))] = draw(
      st.integers(-5, -1) | st.integers(b.o, b.o + 5))
  return LOSS_FNS, ("targets",), dict(loss="xent", targets=classes)


@elman_bad
def integer_regression_targets(draw, b):
  loss = draw(st.sampled_from(["mse", "bce"]))
  targets = np.zeros((*b.batch, b.t, b.o), draw(st.sampled_from(BAD_FLOAT_DTYPES)))
  return LOSS_FNS, ("targets",), dict(loss=loss, targets=targets)


@elman_bad
def mask_shape(draw, b):
  return LOSS_FNS, ("mask",), dict(mask=np.ones(draw(wrong_shapes((*b.batch, b.t))), np.float32))


@elman_bad
def mask_dtype(draw, b):
  bad = draw(st.sampled_from([np.full((*b.batch, b.t), "1"), np.ones((*b.batch, b.t), complex)]))
  return LOSS_FNS, ("mask",), dict(mask=bad)


ELMAN_OTHER = ("init_size", "init_key", "init_recurrent_init", "init_dtype", "step_h", "step_x",
               "step_dtype", "step_params", "step_f")


def _elman_other_call(draw, b, which):
  """elman.init / elman.step cases: (target, names, thunk)."""
  key = jax.random.key(0)
  sizes = {"input_size": b.d, "hidden_size": b.h, "output_size": b.o}
  if which == "init_size":
    name = draw(st.sampled_from(sorted(sizes)))
    sizes[name] = draw(st.sampled_from(BAD_SIZES))
    return "elman.init", (name,), lambda: elman.init(key, **sizes)
  if which == "init_key":
    bad = draw(st.sampled_from(_bad_keys()))
    return "elman.init", ("key",), lambda: elman.init(bad, **sizes)
  if which == "init_recurrent_init":
    bad = draw(BAD_OPTION.filter(lambda v: v not in ("uniform", "orthogonal", "identity")))
    return "elman.init", ("recurrent_init",), lambda: elman.init(key, **sizes, recurrent_init=bad)
  if which == "init_dtype":
    bad = draw(st.sampled_from([np.int32, jnp.int8, "int16", bool, "foo", jnp.complex64]))
    return "elman.init", ("dtype",), lambda: elman.init(key, **sizes, dtype=bad)
  h, x = np.zeros((*b.batch, b.h), np.float32), np.zeros((*b.batch, b.d), np.float32)
  params, names, f = b.params, ("h",), b.f
  if which == "step_h":
    # A rank-2 h with the right H is a valid batch; then x is what does not fit.
    h = np.zeros(draw(wrong_shapes((b.h,)).filter(lambda s: len(s) != 2 or s[-1] != b.h)),
                 np.float32)
  elif which == "step_x":
    x, names = np.zeros(draw(wrong_shapes((*b.batch, b.d))), np.float32), ("x",)
  elif which == "step_dtype":
    names = (draw(st.sampled_from(["h", "x"])),)
    bad = draw(st.sampled_from(BAD_FLOAT_DTYPES))
    h, x = (h.astype(bad), x) if names == ("h",) else (h, x.astype(bad))
  elif which == "step_params":
    how = draw(st.sampled_from(["missing", "shape", "dtype", "type"]))
    names = ("params", "h", "x")   # a consistent but resized U makes h or x the misfit
    if how == "missing":
      drop = draw(st.sets(st.sampled_from(["U", "W", "b"]), min_size=1))
      params = {k: v for k, v in b.params.items() if k not in drop}
    elif how == "type":
      params, names = draw(st.sampled_from(BAD_PARAMS)), ("params",)
    else:   # step reads only U, W, b (V and c are optional there)
      params = {**b.params, **_mutate_leaf(draw, {k: b.params[k] for k in "UWb"}, how)}
  else:
    f, names = draw(BAD_OPTION.filter(lambda v: v not in FS)), ("f",)
  return "elman.step", names, lambda: elman.step(params, h, x, f=f)


@pytest.mark.parametrize("kind", sorted(ELMAN_BAD) + list(ELMAN_OTHER))
@bounded(6)
@given(data=st.data())
def test_elman_rejects_malformed_input(kind, data):
  base = data.draw(elman_bases(), label="base")
  if kind in ELMAN_OTHER:
    target, names, call = _elman_other_call(data.draw, base, kind)
  else:
    targets, names, change = ELMAN_BAD[kind](data.draw, base)
    target = data.draw(st.sampled_from(targets), label="target")
    call = elman_call(target, base, **change)
  RAN.add(f"elman:{kind}")
  expect_clear_error(target, f"elman:{kind}", names, call)


# ------------------------------------------------------------------------------ rnn
@functools.lru_cache(maxsize=None)
def _cell_keys(cell):
  """The keys `cell.init` returns (`U`, `W`, `b`, maybe `bh`), read without computing."""
  return tuple(jax.eval_shape(lambda k: cell.init(k, 1, 1, jnp.float32), jax.random.key(0)))


def _rnn_params(spec, rng):
  """Random params with exactly the structure and shapes `rnn.init(key, spec)` returns, using
  the `Cell` contract (`U [G, D]`, `W [G, H]`, `b [G]`, `bh [G]`), in NumPy."""
  h, g = spec.hidden_size, spec.cell.num_blocks * spec.hidden_size
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  shapes = {"U": None, "W": (g, h), "b": (g,), "bh": (g,)}
  layers = []
  for layer in range(spec.num_layers):
    d = spec.input_size if layer == 0 else h * spec.num_directions
    layers.append({direction: {k: normal(*(shapes[k] or (g, d))) for k in _cell_keys(spec.cell)}
                   for direction in spec.directions})
  params = {"layers": layers}
  if spec.output_size is not None:
    params["V"] = normal(spec.output_size, h * spec.num_directions)
    params["c"] = normal(spec.output_size)
  if spec.learn_initial_state:
    params["carry0"] = normal(spec.cell.carry_size, spec.num_layers * spec.num_directions, h)
  return params


class RnnBase(NamedTuple):
  spec: rnn.RNN
  params: dict
  xs: np.ndarray
  targets: object
  carry0: object
  lengths: object
  loss: str
  batch: tuple
  t: int
  rng: np.random.Generator


@st.composite
def rnn_bases(draw, output=True, bidirectional=None):
  batch, t = draw(BATCH), draw(TIME)
  spec = rnn.rnn(draw(st.sampled_from(CELLS)), draw(SIZE), draw(SIZE),
                 num_layers=draw(st.integers(1, 2)),
                 bidirectional=draw(st.booleans()) if bidirectional is None else bidirectional,
                 output_size=draw(SIZE) if output else None, dropout=draw(st.sampled_from([0, .3])),
                 learn_initial_state=draw(st.booleans()))
  rng = np.random.default_rng(draw(SEED))
  loss = draw(st.sampled_from(LOSSES))
  targets = _targets(rng, loss, (*batch, t), spec.output_size) if output else None
  carry0 = _carry(spec, batch, rng) if draw(st.booleans()) else None
  lengths = np.asarray(rng.integers(1, t + 1, size=batch), np.int32) if draw(st.booleans()) \
      else None
  xs = rng.normal(size=(*batch, t, spec.input_size)).astype(np.float32)
  return RnnBase(spec, _rnn_params(spec, rng), xs, targets, carry0, lengths, loss, batch, t, rng)


SEQ_FNS = ("rnn.apply", "rnn.loss")


def rnn_call(target, base, **change):
  a = {"spec": base.spec, "params": base.params, "xs": base.xs, "targets": base.targets,
       "carry0": base.carry0, "lengths": base.lengths, "loss": base.loss}
  a.update({k: v for k, v in change.items() if k in a})
  extra = {k: v for k, v in change.items() if k not in a}
  if target == "rnn.apply":
    return lambda: rnn.apply(a["spec"], a["params"], a["xs"], a["carry0"], lengths=a["lengths"],
                             **extra)
  return lambda: rnn.loss(a["spec"], a["params"], a["xs"], a["targets"], a["carry0"],
                          loss=a["loss"], lengths=a["lengths"], **extra)


RNN_BAD = {}


def rnn_bad(fn):
  RNN_BAD[fn.__name__] = fn
  return fn


@rnn_bad
def rnn_xs(draw, b):
  how = draw(st.sampled_from(["rank", "last_axis", "dtype", "no_steps", "not_array"]))
  d = b.spec.input_size
  xs = {"rank": lambda: np.zeros((2,) * draw(st.sampled_from([0, 1, 4])), np.float32),
        "last_axis": lambda: np.zeros(
            (*b.batch, b.t, draw(st.integers(0, 6).filter(lambda n: n != d))), np.float32),
        "dtype": lambda: b.xs.astype(draw(st.sampled_from(BAD_FLOAT_DTYPES))),
        "no_steps": lambda: np.zeros((*b.batch, 0, d), np.float32),
        "not_array": lambda: _not_an_array(draw, b.xs)}[how]()
  return SEQ_FNS, ("xs",), dict(xs=xs)


@rnn_bad
def carry0_shape(draw, b):
  carry = list(jax.tree.leaves(_carry(b.spec, b.batch, b.rng)))
  j = draw(st.integers(0, len(carry) - 1))
  carry[j] = np.zeros(draw(wrong_shapes(carry[j].shape)), np.float32)
  return SEQ_FNS, ("carry0",), dict(carry0=carry[0] if len(carry) == 1 else tuple(carry))


@rnn_bad
def carry0_structure(draw, b):
  part = np.zeros((b.spec.num_layers * b.spec.num_directions, *b.batch, b.spec.hidden_size),
                  np.float32)
  if b.spec.cell.carry_size == 1:
    bad = draw(st.sampled_from([(part,), [part], (part, part), {"h": part}]))
  else:
    bad = draw(st.sampled_from([part, (part,), (part, part, part), {"h": part, "c": part}]))
  return SEQ_FNS, ("carry0",), dict(carry0=bad)


@rnn_bad
def carry0_dtype(draw, b):
  dtype = draw(st.sampled_from(BAD_FLOAT_DTYPES))
  carry = jax.tree.map(lambda c: c.astype(dtype), _carry(b.spec, b.batch, b.rng))
  return SEQ_FNS, ("carry0",), dict(carry0=carry)


@rnn_bad
def lengths_shape(draw, b):
  return SEQ_FNS, ("lengths",), dict(lengths=np.ones(draw(wrong_shapes(b.batch)), np.int32))


@rnn_bad
def lengths_dtype(draw, b):
  bad = draw(st.sampled_from(BAD_INT_DTYPES))
  return SEQ_FNS, ("lengths",), dict(lengths=np.ones(b.batch, bad))


@rnn_bad
def lengths_out_of_range(draw, b):
  lengths = np.asarray(b.rng.integers(1, b.t + 1, size=b.batch), np.int32)
  lengths.reshape(-1)[draw(st.integers(0, lengths.size - 1))] = draw(
      st.integers(-3, 0) | st.integers(b.t + 1, b.t + 4))
  return SEQ_FNS, ("lengths",), dict(lengths=lengths)


@rnn_bad
def lengths_and_mask(draw, b):
  return (SEQ_FNS, ("lengths", "mask"),
          dict(lengths=np.ones(b.batch, np.int32), mask=np.ones((*b.batch, b.t), bool)))


@rnn_bad
def mask_wrong(draw, b):
  if draw(st.booleans()):
    mask = np.ones(draw(wrong_shapes((*b.batch, b.t))), bool)
  else:
    mask = draw(st.sampled_from([np.full((*b.batch, b.t), "1"), np.ones((*b.batch, b.t), complex)]))
  return SEQ_FNS, ("mask",), dict(lengths=None, mask=mask)


@rnn_bad
def mask_with_gaps_bidirectional(draw, b):
  assume(b.t >= 2)
  spec = b.spec._replace(bidirectional=True)
  mask = np.ones((*b.batch, b.t), bool)
  i = draw(st.integers(0, b.t - 2))
  mask.reshape(-1, b.t)[draw(st.integers(0, max(1, math.prod(b.batch)) - 1)), i] = False
  return SEQ_FNS, ("mask",), dict(spec=spec, params=_rnn_params(spec, b.rng), carry0=None,
                                  lengths=None, mask=mask)


@rnn_bad
def bad_prng_key(draw, b):
  return SEQ_FNS, ("key",), dict(key=draw(st.sampled_from(_bad_keys())))


@rnn_bad
def unknown_options(draw, b):
  name = draw(st.sampled_from(["backward", "impl", "loss", "unroll"]))
  valid = {"backward": ("manual", "autodiff"), "impl": ("sequential",), "loss": LOSSES}
  if name == "unroll":
    bad = draw(st.sampled_from(BAD_UNROLL))
  else:   # impl="parallel" is valid only for cells with a parallel scan, and these have none
    bad = draw(BAD_OPTION.filter(lambda v: v not in valid[name]) | st.just("parallel"))
    assume(name == "impl" or bad != "parallel")
  return ("rnn.loss",) if name == "loss" else SEQ_FNS, (name,), {name: bad}


def _bad_rnn_params(draw, spec, params):
  """A malformed version of `params` for `spec`."""
  how = draw(st.sampled_from(["top_keys", "layers", "cell_keys", "leaf_shape", "leaf_dtype",
                              "not_a_dict"]))
  if how == "top_keys":
    if draw(st.booleans()):
      drop = draw(st.sampled_from(sorted(params)))
      return {k: v for k, v in params.items() if k != drop}
    return {**params, draw(st.sampled_from(["W", "readout", "V2", 1])): np.zeros(2, np.float32)}
  if how == "layers":
    layers = params["layers"]
    bad = draw(st.sampled_from([
        layers + layers[:1], layers[:-1], {"0": layers[0]}, None, layers[0],
        [dict(e, extra=e["fwd"]) for e in layers], [{"fwd": e["fwd"]} for e in layers]
        if spec.bidirectional else [{"fwd": e["fwd"], "bwd": e["fwd"]} for e in layers],
        [e["fwd"] for e in layers]]))
    return {**params, "layers": bad}
  if how == "cell_keys":
    layer = draw(st.integers(0, len(params["layers"]) - 1))
    direction = draw(st.sampled_from(spec.directions))
    cell = dict(params["layers"][layer][direction])
    if draw(st.booleans()):
      del cell[draw(st.sampled_from(["U", "W", "b"]))]
    else:
      cell[draw(st.sampled_from(["V", "Wx", "bias", 0]))] = cell["b"]
    layers = [dict(e) for e in params["layers"]]
    layers[layer][direction] = cell
    return {**params, "layers": layers}
  if how == "not_a_dict":
    return draw(st.sampled_from(BAD_PARAMS))
  return _mutate_leaf(draw, params, how.removeprefix("leaf_"))


@rnn_bad
def malformed_params(draw, b):
  return SEQ_FNS, ("params",), dict(params=_bad_rnn_params(draw, b.spec, b.params))


@rnn_bad
def malformed_targets(draw, b):
  how = draw(st.sampled_from(["float_classes", "shape", "out_of_range", "int_regression"]))
  bt, o = (*b.batch, b.t), b.spec.output_size
  if how == "float_classes":
    change = dict(loss="xent", targets=np.zeros(draw(st.sampled_from([bt, (*bt, o)])), np.float32))
  elif how == "shape":
    want, dtype = (bt, np.int32) if b.loss == "xent" else ((*bt, o), np.float32)
    change = dict(targets=np.zeros(draw(wrong_shapes(want)), dtype))
  elif how == "out_of_range":
    classes = np.zeros(bt, np.int32)
    classes.reshape(-1)[-1] = draw(st.integers(-4, -1) | st.integers(o, o + 4))
    change = dict(loss="xent", targets=classes)
  else:
    change = dict(loss=draw(st.sampled_from(["mse", "bce"])),
                  targets=np.zeros((*bt, o), draw(st.sampled_from(BAD_FLOAT_DTYPES))))
  return ("rnn.loss",), ("targets",), change


RNN_OTHER = ("rnn_args", "init_args", "not_a_spec", "no_readout", "step", "readout_hs",
             "initial_carry_params")


def _rnn_other_call(draw, b, which):
  """rnn.rnn / init / step / readout / initial_carry / loss-without-readout cases."""
  spec, key = b.spec, jax.random.key(0)
  if which == "rnn_args":
    args = dict(cell="gru", input_size=3, hidden_size=4, num_layers=1, output_size=2,
                dropout=0.0, bidirectional=False, learn_initial_state=False)
    name = draw(st.sampled_from(sorted(args)))
    args[name] = draw({
        "cell": BAD_OPTION.filter(lambda v: v not in tuple(rnn.CELL_NAMES)) | st.sampled_from(
            [None, 3, len, np.tanh]),
        "dropout": st.sampled_from(BAD_DROPOUT),
        "bidirectional": st.sampled_from(BAD_BOOLS),
        "learn_initial_state": st.sampled_from(BAD_BOOLS)}.get(
            name, st.sampled_from([s for s in BAD_SIZES
                                   if s is not None or name != "output_size"])))
    return "rnn.rnn", (name,), lambda: rnn.rnn(args.pop("cell"), **args)
  if which == "init_args":
    if draw(st.booleans()):
      bad = draw(st.sampled_from(_bad_keys()))
      return "rnn.init", ("key",), lambda: rnn.init(bad, spec)
    bad = draw(st.sampled_from([np.int32, "int8", bool, "foo", jnp.complex64]))
    return "rnn.init", ("dtype",), lambda: rnn.init(key, spec, dtype=bad)
  if which == "not_a_spec":
    bad = draw(st.sampled_from([None, "lstm", tuple(spec), dict(spec._asdict()), spec.cell]))
    target = draw(st.sampled_from(["rnn.init", "rnn.apply", "rnn.loss", "rnn.step", "rnn.readout",
                                   "rnn.initial_carry"]))
    call = {"rnn.init": lambda: rnn.init(key, bad),
            "rnn.apply": lambda: rnn.apply(bad, b.params, b.xs),
            "rnn.loss": lambda: rnn.loss(bad, b.params, b.xs, b.targets),
            "rnn.step": lambda: rnn.step(bad, b.params, None, b.xs[..., 0, :]),
            "rnn.readout": lambda: rnn.readout(bad, b.params, np.zeros(4, np.float32)),
            "rnn.initial_carry": lambda: rnn.initial_carry(bad, b.params, b.batch)}[target]
    return target, ("spec",), call
  if which == "no_readout":
    bare = spec._replace(output_size=None)
    target = draw(st.sampled_from(["rnn.loss", "rnn.readout"]))
    params = _rnn_params(bare, b.rng)
    hs = np.zeros((*b.batch, b.t, spec.hidden_size * spec.num_directions), np.float32)
    call = (lambda: rnn.loss(bare, params, b.xs, b.targets)) if target == "rnn.loss" else (
        lambda: rnn.readout(bare, params, hs))
    return target, ("spec",), call
  if which == "readout_hs":
    fan_in = spec.hidden_size * spec.num_directions
    if draw(st.booleans()):
      hs = np.zeros((*b.batch, b.t, draw(st.integers(0, 7).filter(lambda n: n != fan_in))),
                    np.float32)
      if draw(st.booleans()):
        hs = np.zeros((), np.float32)
    else:
      hs = np.zeros((*b.batch, fan_in), draw(st.sampled_from(BAD_FLOAT_DTYPES)))
    return "rnn.readout", ("hs",), lambda: rnn.readout(spec, b.params, hs)
  if which == "initial_carry_params":
    params = _bad_rnn_params(draw, spec, b.params)
    return "rnn.initial_carry", ("params",), lambda: rnn.initial_carry(spec, params, b.batch)
  # rnn.step: x [*batch, D] and carry [L, *batch, H] (a tuple for LSTM).
  uni = spec._replace(bidirectional=False)
  params, carry = _rnn_params(uni, b.rng), _carry(uni, b.batch, b.rng)
  x = b.xs[..., 0, :]
  how = draw(st.sampled_from(["bidirectional", "x", "carry", "params"]))
  if how == "bidirectional":
    bi = spec._replace(bidirectional=True)
    return "rnn.step", ("spec",), lambda: rnn.step(bi, _rnn_params(bi, b.rng),
                                                   _carry(bi, b.batch, b.rng), x)
  names = (how,)
  if how == "x":
    x = draw(st.sampled_from(["shape", "dtype", "not_array"]))
    x = {"shape": lambda: np.zeros(draw(wrong_shapes(b.xs.shape[:-2] + b.xs.shape[-1:])),
                                   np.float32),
         "dtype": lambda: b.xs[..., 0, :].astype(draw(st.sampled_from(BAD_FLOAT_DTYPES))),
         "not_array": lambda: _not_an_array(draw, b.xs[..., 0, :])}[x]()
    # A rank-2 x [B', D] with a new batch size B' is valid; then the carry is the misfit.
    names = ("x", "carry")
  elif how == "carry":
    carry = draw(st.sampled_from([
        jax.tree.map(lambda c: np.zeros(draw(wrong_shapes(c.shape)), np.float32), carry),
        jax.tree.map(lambda c: c.astype(np.int32), carry),
        (carry,) if uni.cell.carry_size == 1 else carry[0],
        None]))
  else:
    params = _bad_rnn_params(draw, uni, params)
  return "rnn.step", names, lambda: rnn.step(uni, params, carry, x)


@pytest.mark.parametrize("kind", sorted(RNN_BAD) + list(RNN_OTHER))
@bounded(8)
@given(data=st.data())
def test_rnn_rejects_malformed_input(kind, data):
  base = data.draw(rnn_bases(), label="base")
  if kind in RNN_OTHER:
    target, names, call = _rnn_other_call(data.draw, base, kind)
  else:
    targets, names, change = RNN_BAD[kind](data.draw, base)
    target = data.draw(st.sampled_from(targets), label="target")
    call = rnn_call(target, base, **change)
  RAN.add(f"rnn:{kind}")
  expect_clear_error(target, f"rnn:{kind}", names, call)


# ------------------------------------------------------------------------------ tbptt
class TbpttBase(NamedTuple):
  spec: rnn.RNN
  params: dict
  carry: object
  xs: np.ndarray
  targets: np.ndarray
  chunk: int


@st.composite
def tbptt_bases(draw):
  spec = rnn.rnn(draw(st.sampled_from(CELLS)), draw(SIZE), draw(SIZE), output_size=draw(SIZE))
  rng = np.random.default_rng(draw(SEED))
  b, chunk = draw(st.integers(1, 3)), draw(st.integers(1, 3))
  n = chunk * draw(st.integers(1, 3))
  xs = rng.normal(size=(b, n, spec.input_size)).astype(np.float32)
  targets = np.asarray(rng.integers(0, spec.output_size, size=(b, n)), np.int32)
  return TbpttBase(spec, _rnn_params(spec, rng), _carry(spec, (b,), rng), xs, targets, chunk)


TBPTT_KINDS = ("rnn_chunk_loss", "chunk_loss_call", "make_tbptt_step", "tbptt_value_and_grad",
               "reset_carry", "stream_batches", "chunks", "run_tbptt")


def _tbptt_call(draw, b, which):
  loss_fn = tbptt.rnn_chunk_loss(b.spec, loss="xent")
  opt = optax.sgd(0.1)
  xs, targets, chunk = b.xs, b.targets, b.chunk
  if which == "rnn_chunk_loss":
    name = draw(st.sampled_from(["spec", "loss", "backward"]))
    args = {"spec": b.spec, "loss": "xent", "backward": "manual"}
    args[name] = {"spec": st.sampled_from([None, "lstm", tuple(b.spec),
                                           b.spec._replace(output_size=None)]),
                  "loss": BAD_OPTION.filter(lambda v: v not in LOSSES),
                  "backward": BAD_OPTION.filter(lambda v: v not in ("manual", "autodiff"))}[name]
    args[name] = draw(args[name])
    return which, (name,), lambda: tbptt.rnn_chunk_loss(args.pop("spec"), **args)
  if which == "chunk_loss_call":
    if draw(st.booleans()):
      bad_t = draw(st.sampled_from([targets.astype(np.float32), targets[:, :-1], targets[0],
                                    targets + b.spec.output_size]))
      return "rnn_chunk_loss:loss_fn", ("targets",), lambda: loss_fn(b.params, b.carry, xs, bad_t)
    bad_x = np.zeros(xs.shape[:-1] + (xs.shape[-1] + 1,), np.float32)
    return "rnn_chunk_loss:loss_fn", ("xs",), lambda: loss_fn(b.params, b.carry, bad_x, targets)
  if which == "make_tbptt_step":
    if draw(st.booleans()):
      bad = draw(st.sampled_from([None, 3, "loss"]))
      return which, ("loss_fn",), lambda: tbptt.make_tbptt_step(bad, opt)
    bad = draw(st.sampled_from([None, optax.sgd, {"update": None}, (opt.init, opt.update)]))
    return which, ("optimizer",), lambda: tbptt.make_tbptt_step(loss_fn, bad)
  if which in ("tbptt_value_and_grad", "run_tbptt"):
    how = draw(st.sampled_from(["fn", "chunk", "xs", "targets"]))
    fn = loss_fn if which == "tbptt_value_and_grad" else _must_not_run
    names = {"fn": ("loss_fn" if which == "tbptt_value_and_grad" else "step",),
             "chunk": ("chunk",), "xs": ("xs",), "targets": ("targets",)}[how]
    if how == "fn":
      fn = draw(st.sampled_from([None, 3, "step"]))
    elif how == "chunk":
      bad_chunks = st.sampled_from([0, -1, 1.5, "2", True, None])
      if which == "tbptt_value_and_grad":   # N must be a multiple of the chunk length
        bad_chunks |= st.integers(2, xs.shape[1] + 2).filter(lambda k: xs.shape[1] % k != 0)
      chunk = draw(bad_chunks)
    elif how == "xs":
      xs = draw(st.sampled_from([xs[0, :, 0], xs[:, :0], xs.tolist(), None]))
      targets = targets[:, :0] if np.shape(xs)[1:2] == (0,) else targets
    else:
      targets = draw(st.sampled_from([targets[:, :-1], targets[:1].repeat(4, 0), targets[0],
                                      targets.tolist()]))
    if which == "tbptt_value_and_grad":
      return which, names, lambda: tbptt.tbptt_value_and_grad(fn, b.params, b.carry, xs, targets,
                                                              chunk)
    return which, names, lambda: tbptt.run_tbptt(fn, b.params, (), xs, targets, chunk=chunk,
                                                 carry=b.carry)
  if which == "reset_carry":
    carry = b.carry
    batch = jax.tree.leaves(carry)[0].shape[1]
    how = draw(st.sampled_from(["reset", "initial", "carry"]))
    reset, initial = np.zeros(batch, bool), carry
    if how == "reset":
      reset = draw(st.sampled_from([np.zeros(batch + 1, bool), np.zeros((batch, 1), bool),
                                    np.bool_(True), np.full(batch, "1")]))
    elif how == "initial":
      initial = draw(st.sampled_from([
          jax.tree.map(lambda c: c[:, :1] if batch > 1 else c[:, :0], carry),
          jax.tree.map(lambda c: c[..., :-1], carry), (carry,),
          jax.tree.leaves(carry)[0] if isinstance(carry, tuple) else (carry, carry)]))
    else:
      carry = jax.tree.map(lambda c: c[0], carry)
      initial = carry
    return which, (how,), lambda: tbptt.reset_carry(carry, reset, initial)
  if which == "stream_batches":
    if draw(st.booleans()):
      tokens = draw(st.sampled_from([np.zeros(()), np.zeros((2, 5)), np.zeros(3)]))
      return which, ("tokens",), lambda: tbptt.stream_batches(tokens, 2)
    batch = draw(st.sampled_from([0, -1, 1.5, "2", None]))
    return which, ("batch",), lambda: tbptt.stream_batches(np.arange(10), batch)
  name = draw(st.sampled_from(["length", "chunk"]))
  args = {"length": 5, "chunk": 2}
  args[name] = draw(st.sampled_from([-1, 2.5, "5", None] + ([0] if name == "chunk" else [])))
  return which, (name,), lambda: list(tbptt.chunks(**args))


@pytest.mark.parametrize("kind", TBPTT_KINDS)
@bounded(10)
@given(data=st.data())
def test_tbptt_rejects_malformed_input(kind, data):
  base = data.draw(tbptt_bases(), label="base")
  target, names, call = _tbptt_call(data.draw, base, kind)
  RAN.add(f"tbptt:{kind}")
  expect_clear_error(f"tbptt.{target}", f"tbptt:{target}", names, call)


# ------------------------------------------------------------------------------ checkpoint
@st.composite
def saved_checkpoints(draw, directory):
  """(path, data, params, opt_state, key) of a small checkpoint written to `directory`."""
  rng = np.random.default_rng(draw(SEED))
  params = {"U": rng.normal(size=(draw(SIZE), 2)).astype(np.float32),
            "layers": [{"b": rng.normal(size=draw(SIZE)).astype(np.float32)}]}
  opt_state = _fill_like(jax.eval_shape(optax.adam(1e-3).init, params), rng)
  key = draw(st.sampled_from([None, jax.random.key(1), jax.random.PRNGKey(1)]))
  data = checkpoint.to_bytes(checkpoint.Checkpoint(params, opt_state, 7, key, metrics={"loss": 1}))
  path = os.path.join(directory, f"ckpt-{rng.integers(2 ** 62)}.safetensors")
  return path, data, params, opt_state, key


def _write(path, data):
  with open(path, "wb") as f:
    f.write(data)
  return path


CHECKPOINT_KINDS = ("path", "truncated", "bit_flip", "appended", "garbage", "params", "opt_state",
                    "key", "from_bytes")


def _checkpoint_call(draw, scratch, which):
  path, data, params, opt_state, key = draw(saved_checkpoints(str(scratch)))
  load = lambda p=path, **t: checkpoint.load(p, **{"params": params, "opt_state": opt_state,
                                                   "key": key, **t})
  if which == "path":
    _write(path, data)
    bad = draw(st.sampled_from([None, 3, 0, 1.5, [path], {"path": path}]))
    return "checkpoint.load", ("path",), lambda: load(bad)
  if which == "from_bytes":
    bad = draw(st.sampled_from([data.decode("latin-1"), None, len(data), list(data[:16])]))
    return "checkpoint.from_bytes", ("data",), lambda: checkpoint.from_bytes(
        bad, params=params, opt_state=opt_state)
  if which in ("truncated", "bit_flip", "appended", "garbage"):
    if which == "truncated":
      bad = data[:draw(st.integers(0, len(data) - 1))]
    elif which == "bit_flip":
      i, bit = draw(st.integers(0, len(data) - 1)), draw(st.integers(0, 7))
      bad = data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1:]
    elif which == "appended":
      bad = data + draw(st.binary(min_size=1, max_size=16))
    else:
      bad = draw(st.sampled_from([b"", pickle.dumps(params), json.dumps({"a": 1}).encode(),
                                  _plain_safetensors()]) | st.binary(max_size=64))
    return "checkpoint.load", (path,), lambda: load(_write(path, bad))
  _write(path, data)
  if which == "params":
    how = draw(st.sampled_from(["drop", "add", "shape", "dtype"]))
    if how == "drop":
      bad = {"U": params["U"]}
    elif how == "add":
      bad = {**params, "V": params["U"]}
    elif how == "shape":
      bad = {**params, "U": params["U"][:, :1]}
    else:
      bad = {**params, "U": params["U"].astype(draw(st.sampled_from([np.float16, np.int32])))}
    return "checkpoint.load", ("params",), lambda: load(params=bad)
  if which == "opt_state":
    bad = draw(st.sampled_from([
        optax.sgd(0.1, momentum=0.9).init(params), optax.rmsprop(0.1).init(params), (),
        optax.adam(0.1).init({"U": params["U"]})]))
    return "checkpoint.load", ("opt_state",), lambda: load(opt_state=bad)
  # A key of the other kind (typed <-> legacy uint32[2]), or one where the file has none.
  typed = key is not None and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  other = jax.random.PRNGKey(0) if typed else jax.random.key(0)
  bad = draw(st.sampled_from([np.zeros(3, np.uint32), other]))
  return "checkpoint.load", ("key",), lambda: load(key=bad)


@functools.lru_cache(maxsize=None)
def _plain_safetensors():
  import safetensors.numpy
  return safetensors.numpy.save({"w": np.zeros(2, np.float32)})


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
@bounded(8)
@given(data=st.data())
def test_checkpoint_load_rejects_malformed_input(scratch, kind, data):
  target, names, call = _checkpoint_call(data.draw, scratch, kind)
  RAN.add(f"checkpoint:{kind}")
  expect_clear_error(target, f"checkpoint:{kind}", names, call, guard=False)


# ------------------------------------------------------------------------------ the count
MIN_MALFORMED_CASES = 300
ALL_TARGETS = {
    "elman.init", "elman.step", "elman.forward", "elman.loss", "elman.manual_value_and_grad",
    "rnn.rnn", "rnn.init", "rnn.apply", "rnn.loss", "rnn.step", "rnn.readout",
    "rnn.initial_carry", "tbptt.rnn_chunk_loss", "tbptt.rnn_chunk_loss:loss_fn",
    "tbptt.make_tbptt_step", "tbptt.tbptt_value_and_grad", "tbptt.reset_carry",
    "tbptt.stream_batches", "tbptt.chunks", "tbptt.run_tbptt", "checkpoint.load",
    "checkpoint.from_bytes"}


def test_malformed_case_count(tmp_path_factory, capsys):
  """Runs after the malformed-input properties: writes and checks how many cases they ran."""
  if not COUNTS:
    pytest.skip("no malformed-input property ran in this session")
  total = sum(COUNTS.values())
  report = {"total": total, "by_function": dict(sorted(COUNTS.items())),
            "by_kind": dict(sorted(KIND_COUNTS.items()))}
  directory = os.environ.get("JAXRNN_PROPERTY_REPORT") or str(tmp_path_factory.getbasetemp())
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "malformed_counts.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
  summary = (f"malformed inputs: {total} cases over {len(COUNTS)} public functions ("
             + ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items())) + f"); report: {path}")
  with capsys.disabled():
    print("\n" + summary)
  expected = ({f"elman:{k}" for k in [*ELMAN_BAD, *ELMAN_OTHER]}
              | {f"rnn:{k}" for k in [*RNN_BAD, *RNN_OTHER]}
              | {f"tbptt:{k}" for k in TBPTT_KINDS} | {f"checkpoint:{k}" for k in CHECKPOINT_KINDS})
  if RAN != expected:
    pytest.skip(f"only part of the malformed-input properties ran; {summary}")
  assert total >= MIN_MALFORMED_CASES, summary
  missing = sorted(ALL_TARGETS - set(COUNTS))
  assert not missing, f"no malformed case for {missing}; {summary}"
