"""jaxrnn.interop and jaxrnn.rnn against PyTorch's nn.RNN, nn.LSTM and nn.GRU (float32, CPU).

Every cell x num_layers x bidirectional, with and without initial states and padded batches:
outputs and final states to 1e-5, gradients of a scalar of both (w.r.t. every weight, the input
and the initial states) to 1e-4 through both the manual and the autodiff backward pass, exact
round trips of the weights, and the converter's error messages.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrnn import cells, interop, rnn

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch

KINDS = ("rnn_tanh", "rnn_relu", "lstm", "gru")
B, T, D, H = 4, 5, 3, 4
LENGTHS = np.array([5, 2, 4, 1])
FWD_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)


def make_module(kind, num_layers, bidirectional, bias=True, seed=0):
  torch.manual_seed(seed)
  kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, bias=bias, batch_first=True)
  if kind.startswith("rnn_"):
    return torch.nn.RNN(D, H, nonlinearity=kind[4:], **kwargs)
  return {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](D, H, **kwargs)


def numpy_state_dict(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def make_data(kind, num_layers, bidirectional, seed=1):
  """Inputs, initial carry and the fixed random weights of the scalar objective."""
  rng = np.random.default_rng(seed)
  k = num_layers * (2 if bidirectional else 1)
  carry_size = 2 if kind == "lstm" else 1
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  xs = normal(B, T, D)
  carry0 = tuple(normal(k, B, H) * 0.5 for _ in range(carry_size))
  r_out = normal(B, T, H * (2 if bidirectional else 1))
  r_carry = tuple(normal(k, B, H) for _ in range(carry_size))
  return xs, carry0, r_out, r_carry


def torch_run(module, xs, carry0, r_out, r_carry, lengths=None):
  """`(out, carry_T, grads)`: grads keyed like the state dict, plus "xs" and "carry0"."""
  module.zero_grad()
  x = torch.tensor(xs, requires_grad=True)
  hx = None
  if carry0 is not None:
    hx = tuple(torch.tensor(c, requires_grad=True) for c in carry0)
  hx_arg = None if hx is None else (hx if len(hx) == 2 else hx[0])
  if lengths is None:
    out, carry_T = module(x, hx_arg)
  else:
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), batch_first=True,
                                                     enforce_sorted=False)
    out, carry_T = module(packed, hx_arg)
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
  carry_T = carry_T if isinstance(carry_T, tuple) else (carry_T,)
  value = (out * torch.tensor(r_out)).sum()
  value = value + sum((c * torch.tensor(r)).sum() for c, r in zip(carry_T, r_carry))
  value.backward()
  grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
  grads["xs"] = x.grad.numpy()
  grads["carry0"] = None if hx is None else tuple(h.grad.numpy() for h in hx)
  return out.detach().numpy(), tuple(c.detach().numpy() for c in carry_T), grads


def jax_run(spec, params, xs, carry0, lengths, r_out, r_carry, backward):
  """`(hs, carry_T, (d_params, d_xs, d_carry0))` for the same scalar as `torch_run`."""
  def objective(params, xs, carry0):
    if carry0 is not None and spec.cell.carry_size == 1:
      carry0 = carry0[0]
    hs, carry_T = rnn.apply(spec, params, xs, carry0, lengths=lengths, backward=backward)
    carry_T = carry_T if isinstance(carry_T, tuple) else (carry_T,)
    value = jnp.sum(hs * r_out) + sum(jnp.sum(c * r) for c, r in zip(carry_T, r_carry))
    return value, (hs, carry_T)
  (_, (hs, carry_T)), grads = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)(
      params, xs, carry0)
  return hs, carry_T, grads


VARIANTS = [(with_carry0, padded, backward) for with_carry0 in (False, True)
            for padded in (False, True) for backward in ("manual", "autodiff")]


# Compiling dominates this file's time, so every variant of one spec is one XLA program (about a
# third of the cost of eight), compiled without LLVM's optimisations (half the cost again; the
# arithmetic is the same, only its scheduling differs).
@functools.partial(jax.jit, static_argnames="spec",
                   compiler_options={"xla_backend_optimization_level": 0,
                                     "xla_llvm_disable_expensive_passes": True})
def jax_run_variants(params, xs, carry0, lengths, r_out, r_carry, *, spec):
  return {(c, p, bw): jax_run(spec, params, xs, carry0 if c else None, lengths if p else None,
                              r_out, r_carry, bw) for c, p, bw in VARIANTS}


@functools.cache
def results(kind, num_layers, bidirectional):
  """`(spec, {variant: (jaxrnn results, torch results)})` for one module, every variant."""
  module = make_module(kind, num_layers, bidirectional)
  spec, params = interop.from_torch(numpy_state_dict(module), kind)
  xs, carry0, r_out, r_carry = make_data(kind, num_layers, bidirectional)
  ours = jax_run_variants(params, xs, carry0, LENGTHS, r_out, r_carry, spec=spec)
  theirs = {(c, p): torch_run(module, xs, carry0 if c else None, r_out, r_carry,
                              LENGTHS if p else None)
            for c in (False, True) for p in (False, True)}
  return spec, {(c, p, bw): (ours[c, p, bw], theirs[c, p]) for c, p, bw in VARIANTS}


def assert_close(actual, desired, tol, what):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), err_msg=what, **tol)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


@pytest.mark.parametrize("backward", ["manual", "autodiff"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("with_carry0", [False, True], ids=["zero_h0", "h0"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch(kind, num_layers, bidirectional, with_carry0, padded, backward):
  """Outputs, final states and gradients; padded batches against pack_padded_sequence."""
  spec, variants = results(kind, num_layers, bidirectional)
  (hs, carry_T, (d_params, d_xs, d_carry0)), (out_t, carry_t, grads_t) = variants[
      with_carry0, padded, backward]
  assert_close(hs, out_t, FWD_TOL, "outputs")
  for j, (c, c_t) in enumerate(zip(carry_T, carry_t)):
    assert_close(c, c_t, FWD_TOL, f"final carry[{j}]")
  if padded:  # zeros past each sequence's end, as pad_packed_sequence pads
    assert np.all(np.asarray(hs)[np.arange(T)[None, :] >= LENGTHS[:, None]] == 0)
  # Torch's grads, keyed like a state dict, convert into the params pytree like the weights do.
  d_params_t = interop.params_from_torch(spec, {k: v for k, v in grads_t.items()
                                                if k not in ("xs", "carry0")})
  leaves, treedef = jax.tree.flatten_with_path(d_params)
  assert treedef == jax.tree.structure(d_params_t)
  for (path, g), g_t in zip(leaves, jax.tree.leaves(d_params_t)):
    assert_close(g, g_t, GRAD_TOL, f"d{jax.tree_util.keystr(path)}")
  assert_close(d_xs, grads_t["xs"], GRAD_TOL, "d xs")
  if with_carry0:
    for j, (g, g_t) in enumerate(zip(d_carry0, grads_t["carry0"])):
      assert_close(g, g_t, GRAD_TOL, f"d carry0[{j}]")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trips_are_exact(kind, num_layers, bidirectional, bias):
  module = make_module(kind, num_layers, bidirectional, bias=bias)
  sd = numpy_state_dict(module)
  spec, params = interop.from_torch(sd, kind)
  assert spec == rnn.rnn(interop.torch_cell(kind), D, H, num_layers=num_layers,
                         bidirectional=bidirectional)
  assert interop.torch_kind(spec) == kind
  back = interop.to_torch(spec, params, bias=bias)
  assert list(back) == list(sd)  # PyTorch's keys, in PyTorch's order
  assert all(np.array_equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)
  assert {k: v.shape for k, v in sd.items()} == interop.torch_shapes(spec, bias=bias)
  if bias:  # jaxrnn -> torch -> jaxrnn, from jaxrnn's own init, through a real module
    params = rnn.init(jax.random.key(3), spec)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in
                            interop.to_torch(spec, params).items()}, strict=True)
    again = interop.params_from_torch(spec, numpy_state_dict(module))
    assert jax.tree.structure(again) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again),
                                                    jax.tree.leaves(params)))


def test_seed_elman_without_bh_converts():
  """The seed's one-bias Elman cell exports bias_hh = 0 and computes what the torch module does."""
  spec = rnn.rnn("elman", D, H)
  params = rnn.init(jax.random.key(0), spec)
  sd = interop.to_torch(spec, params)
  assert np.array_equal(sd["bias_hh_l0"], np.zeros(H, np.float32))
  module = make_module("rnn_tanh", 1, False)
  module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  xs = np.random.default_rng(0).standard_normal((B, T, D)).astype(np.float32)
  out_t, _ = module(torch.from_numpy(xs))
  hs, _ = rnn.apply(spec, params, xs)
  assert_close(hs, out_t.detach().numpy(), FWD_TOL, "outputs")
  assert interop.params_from_torch(spec, sd)["layers"][0]["fwd"].keys() == {"U", "W", "b", "bh"}


def test_prefix():
  sd = {"encoder.rnn." + k: v for k, v in numpy_state_dict(make_module("gru", 1, True)).items()}
  sd["encoder.head.weight"] = np.zeros((2, 8), np.float32)  # other submodules are ignored
  spec, params = interop.from_torch(sd, "gru", prefix="encoder.rnn.")
  back = interop.to_torch(spec, params, prefix="encoder.rnn.")
  assert all(np.array_equal(v, sd[k]) for k, v in back.items())
  assert len(back) == len(sd) - 1


def bad_state_dict():
  return numpy_state_dict(make_module("lstm", 2, True))


def test_missing_keys_are_all_listed():
  sd = bad_state_dict()
  del sd["weight_hh_l1"], sd["bias_ih_l0_reverse"]
  with pytest.raises(ValueError, match=r"missing keys: \['bias_ih_l0_reverse', 'weight_hh_l1'\]"):
    interop.from_torch(sd, "lstm")
  spec = rnn.rnn("lstm", D, H, num_layers=2, bidirectional=True)
  with pytest.raises(ValueError, match="missing keys") as info:
    interop.params_from_torch(spec, sd)
  assert "weight_hh_l1" in str(info.value) and "bias_ih_l0_reverse" in str(info.value)


def test_extra_keys_are_all_listed():
  sd = bad_state_dict()
  sd["weight_hr_l0"] = np.zeros((16, 2), np.float32)
  sd["foo"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"unexpected keys: \['foo', 'weight_hr_l0'\]") as info:
    interop.from_torch(sd, "lstm")
  assert "proj_size" in str(info.value)
  spec = rnn.rnn("lstm", D, H)  # one layer, one direction: the rest of sd is extra
  with pytest.raises(ValueError, match="unexpected keys") as info:
    interop.params_from_torch(spec, sd)
  assert "'weight_ih_l1_reverse'" in str(info.value) and "'foo'" in str(info.value)


def test_wrong_shapes_are_all_listed():
  sd = bad_state_dict()
  sd["weight_hh_l0"] = np.zeros((16, 5), np.float32)
  sd["bias_ih_l1"] = np.zeros((15,), np.float32)
  sd["weight_ih_l1_reverse"] = np.zeros((16, 4), np.float32)  # layer 1 reads 2H = 8
  with pytest.raises(ValueError) as info:
    interop.from_torch(sd, "lstm")
  message = str(info.value)
  assert "hidden_size=4" in message  # inferred from the keys that agree, not the misshapen one
  assert "weight_hh_l0: expected [16, 4], got [16, 5]" in message
  assert "bias_ih_l1: expected [16], got [15]" in message
  assert "weight_ih_l1_reverse: expected [16, 8], got [16, 4]" in message
  assert "missing" not in message and "unexpected" not in message


def test_other_bad_inputs():
  sd = numpy_state_dict(make_module("lstm", 1, False))
  with pytest.raises(ValueError, match="G are 3 \\* hidden_size"):
    interop.from_torch(sd, "gru")  # wrong kind: LSTM's 4H rows are not GRU's 3H
  with pytest.raises(ValueError, match="kind must be one of"):
    interop.from_torch(sd, "rnn")
  with pytest.raises(ValueError, match="no PyTorch recurrent keys"):
    interop.from_torch({"rnn.weight_ih_l0": sd["weight_ih_l0"]}, "lstm")
  with pytest.raises(ValueError, match="not floating point: weight_hh_l0"):
    interop.from_torch({**sd, "weight_hh_l0": sd["weight_hh_l0"].astype(np.int32)}, "lstm")
  spec, params = interop.from_torch(sd, "lstm")
  with pytest.raises(ValueError, match="readout"):
    interop.to_torch(spec._replace(output_size=2), params)
  with pytest.raises(ValueError, match="nonzero"):
    interop.to_torch(spec, params, bias=False)
  sigmoid_spec = rnn.rnn(cells.elman("sigmoid"), D, H)
  with pytest.raises(ValueError, match="no PyTorch equivalent"):
    interop.to_torch(sigmoid_spec, rnn.init(jax.random.key(0), sigmoid_spec))
