"""Every implementation the benchmark times: one training step of an RNN with a linear readout.

Shape legend: `B` batch, `T` time, `D` input, `H` hidden, `O` output, `G` gate blocks (elman 1,
gru 3, lstm 4).

The step is the same everywhere: run the cell over `xs [B, T, D]` from a zero state, read out
`o_t = V h_t + c` at every step, take the loss `L = (1/B) sum_b sum_t L_bt` (`L_t = 1/2 ||o_t -
y_t||^2` for "mse"; cross-entropy of the logits `o_t` against integer classes for "xent"), back-
propagate through time and apply one Adam(1e-3) update, in float32. Each framework uses its own
default initialisation, so initial losses agree only roughly.

JAX implementations jit the whole step (`value_and_grad` + `optax.adam`) as one `jax.jit`, with
params and optimiser state passed in, returned, and donated. The frameworks are imported lazily,
inside `build`, so a missing one is reported (`Missing`) rather than breaking the run, and a
memory-measuring subprocess imports only what its implementation needs.

Example:
  >>> runner = build("lstm", "gru", CONFIGS["medium"], seed=0)
  >>> loss = runner.run(10)          # ten steps, blocked until done; returns the last loss
"""
from __future__ import annotations

import importlib.util
from typing import Any, Callable, NamedTuple

import numpy as np

LEARNING_RATE = 1e-3


class Config(NamedTuple):
  """A benchmark configuration: sizes and the loss."""
  batch: int    # B
  time: int     # T
  input: int    # D
  hidden: int   # H
  output: int   # O
  loss: str     # "mse" (float targets [B, T, O]) or "xent" (one-hot inputs, int targets [B, T])


CONFIGS = {
    "small": Config(1, 1000, 16, 64, 16, "mse"),
    "medium": Config(32, 100, 64, 128, 64, "mse"),
    "large": Config(64, 200, 128, 512, 128, "mse"),
    "charlm": Config(32, 128, 65, 256, 65, "xent"),
    # Not part of the benchmark: a smoke-test size for checking that every impl builds and trains.
    "tiny": Config(2, 8, 3, 8, 3, "mse"),
}

CELLS = ("elman", "lstm", "gru")
GATE_BLOCKS = {"elman": 1, "gru": 3, "lstm": 4}

# Which Python modules each implementation needs (checked before building: absent -> "missing").
REQUIREMENTS = {
    "jaxrnn": ("jax", "optax", "jaxrnn"),
    "jaxrnn-autodiff": ("jax", "optax", "jaxrnn"),
    "flax-linen": ("jax", "optax", "flax"),
    "flax-linen-optlstm": ("jax", "optax", "flax"),
    "flax-nnx": ("jax", "optax", "flax"),
    "flax-nnx-optlstm": ("jax", "optax", "flax"),
    "haiku": ("jax", "optax", "haiku"),
    "equinox": ("jax", "optax", "equinox"),
    "torch": ("torch",),
}
IMPLS = tuple(REQUIREMENTS)
JAXRNN_IMPLS = ("jaxrnn", "jaxrnn-autodiff")
PEERS = tuple(i for i in IMPLS if i not in JAXRNN_IMPLS)
DEVICES = ("cpu", "cuda")


class Missing(Exception):
  """The implementation's framework is not installed."""


class NotApplicable(Exception):
  """The implementation does not exist for this cell (e.g. OptimizedLSTMCell for a GRU)."""


def step_flops(cell: str, cfg: Config) -> float:
  """Analytic FLOPs of one training step: matmuls only, backward counted as twice the forward.

  Forward `F = 2 B T (G H (D + H) + H O)`: the input projection `[B, D] x [D, G H]`, the recurrent
  projection `[B, H] x [H, G H]` and the readout `[B, H] x [H, O]` at each of `T` steps, 2 FLOPs
  per multiply-add. Backward needs, per forward matmul, one for the weight gradient and one for the
  input gradient: `2 F`. Step `= 3 F`. Elementwise gate maths, the loss and Adam are left out (a
  few percent at these sizes), and so is the fact that no framework needs `dL/dxs`.
  """
  g = GATE_BLOCKS[cell]
  forward = 2.0 * cfg.batch * cfg.time * (g * cfg.hidden * (cfg.input + cfg.hidden)
                                          + cfg.hidden * cfg.output)
  return 3.0 * forward


def make_data(cfg: Config, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Fixed numpy data for one configuration, shared by every implementation.

  Returns:
    `xs [B, T, D]` float32 (standard normal; one-hot characters for "xent") and `targets`:
    `[B, T, O]` float32 standard normal for "mse", `[B, T]` int32 next characters for "xent".
  """
  rng = np.random.default_rng(seed)
  if cfg.loss == "xent":
    ids = rng.integers(0, cfg.output, size=(cfg.batch, cfg.time + 1))
    xs = np.eye(cfg.input, dtype=np.float32)[ids[:, :-1]]
    return xs, ids[:, 1:].astype(np.int32)
  xs = rng.standard_normal((cfg.batch, cfg.time, cfg.input), dtype=np.float32)
  ys = rng.standard_normal((cfg.batch, cfg.time, cfg.output), dtype=np.float32)
  return xs, ys


class Runner:
  """A built implementation holding its own params, optimiser state and data.

  Attributes:
    impl: the implementation's name.
    note: what exactly it runs (shown in the report).
  """

  def __init__(self, impl: str, note: str, step: Callable[[Any], tuple[Any, Any]], state: Any,
               block: Callable[[Any], Any]):
    self.impl, self.note = impl, note
    self._step, self._state, self._block = step, state, block

  def run(self, n: int):
    """Run `n` training steps, wait for them to finish, and return the last step's loss."""
    state, value = self._state, None
    for _ in range(n):
      state, value = self._step(state)
    self._block((state, value))
    self._state = state
    return value


def import_framework(impl: str) -> None:
  """Import what `impl` needs (raises `Missing`); used to separate import from build costs."""
  for module in REQUIREMENTS[impl]:
    if importlib.util.find_spec(module) is None:
      raise Missing(f"{module} is not installed")
  for module in REQUIREMENTS[impl]:
    importlib.import_module(module)


def build(impl: str, cell: str, cfg: Config, *, seed: int = 0, donate: bool = True,
          threads: int = 2, device: str = "cpu", loss_options: dict | None = None) -> Runner:
  """Build `impl` for `cell` and `cfg` on the data of `make_data(cfg, seed)`.

  Args:
    impl: one of `IMPLS`.
    cell: "elman", "lstm" or "gru".
    cfg: the sizes and loss.
    seed: seeds the data and the params.
    donate: donate params and optimiser state to the jitted JAX steps.
    threads: intra-op threads for PyTorch.
    device: "cpu" or "cuda". PyTorch builds its model and data there; JAX implementations run on
      JAX's default backend, which the caller (`bench.py --device`) has checked matches.
    loss_options: jaxrnn implementations only: extra keyword arguments of `jaxrnn.rnn.loss`
      (e.g. `{"unroll": 16}`).

  Raises:
    Missing: the framework is not installed.
    NotApplicable: `impl` has no version of `cell`.
  """
  if impl not in BUILDERS:
    raise ValueError(f"impl must be one of {list(IMPLS)}; got {impl!r}.")
  if cell not in CELLS:
    raise ValueError(f"cell must be one of {list(CELLS)}; got {cell!r}.")
  if device not in DEVICES:
    raise ValueError(f"device must be one of {list(DEVICES)}; got {device!r}.")
  if impl.endswith("-optlstm") and cell != "lstm":
    raise NotApplicable(f"{impl} exists for lstm only")
  extra = {}
  if loss_options:
    if impl not in JAXRNN_IMPLS:
      raise ValueError(f"loss_options apply to {list(JAXRNN_IMPLS)} only; got impl {impl!r}.")
    extra["loss_options"] = dict(loss_options)
  import_framework(impl)
  xs, ys = make_data(cfg, seed)
  return BUILDERS[impl](impl, cell, cfg, xs, ys, seed=seed, donate=donate, threads=threads,
                        device=device, **extra)


# ----------------------------------------------------------------------------------------------
# JAX helpers shared by every JAX implementation.


def _jax_loss(out, targets, kind):
  """`(1/B) sum_{b,t} L_bt` for `out [B, T, O]` (logits for "xent")."""
  import jax.numpy as jnp
  import optax
  if kind == "mse":
    return 0.5 * jnp.sum(jnp.square(out - targets)) / out.shape[0]
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(out, targets)) / out.shape[0]


def _jax_runner(impl, note, train_step, params, xs, ys, donate, jit=None):
  """Wrap `train_step(params, opt_state, xs, ys) -> (params, opt_state, loss)` (not yet jitted),
  compiled by `jit` (default `jax.jit`) with donation."""
  import jax
  import optax
  opt_state = optax.adam(LEARNING_RATE).init(params)
  jitted = (jit or jax.jit)(train_step, donate_argnums=(0, 1) if donate else ())
  xs, ys = jax.device_put(xs), jax.device_put(ys)

  def step(state):
    params, opt_state, value = jitted(state[0], state[1], xs, ys)
    return (params, opt_state), value

  return Runner(impl, note, step, (params, opt_state), jax.block_until_ready)


def _optax_step(loss_fn):
  """`(params, opt_state, xs, ys) -> (params, opt_state, loss)` with `optax.adam`."""
  import jax
  import optax
  optimizer = optax.adam(LEARNING_RATE)

  def train_step(params, opt_state, xs, ys):
    value, grads = jax.value_and_grad(loss_fn)(params, xs, ys)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return train_step


# ----------------------------------------------------------------------------------------------
# jaxrnn.


def _build_jaxrnn(impl, cell, cfg, xs, ys, *, seed, donate, threads, device, loss_options=None):
  del threads, device  # JAX's default backend (see build)
  loss_options = loss_options or {}
  import jax
  import optax
  import jaxrnn
  backward = "autodiff" if impl == "jaxrnn-autodiff" else "manual"
  key = jax.random.key(seed)
  # Compare like with like: no peer skips non-finite steps, and every JAX peer donates its state;
  # so build the library's step unjitted, without the skip, and jit it here with donation.
  try:
    api = jaxrnn.rnn
    spec = api.rnn(cell, cfg.input, cfg.hidden, output_size=cfg.output)
    params = api.init(key, spec)
    loss_fn = lambda p, x, y: api.loss(spec, p, x, y, loss=cfg.loss, backward=backward,
                                       **loss_options)
    extra = "".join(f", {k}={v!r}" for k, v in loss_options.items())
    note = f"jaxrnn.rnn.loss(backward={backward!r}{extra}) + jaxrnn.make_train_step"
    value_and_grad_fn = None
  except AttributeError:
    if cell != "elman":
      raise
    # Fallback while jaxrnn.rnn does not exist: the seed's Elman network.
    params = jaxrnn.elman.init(key, cfg.input, cfg.hidden, cfg.output)
    loss_fn = lambda p, x, y: jaxrnn.elman.loss(p, x, y, loss=cfg.loss, backward="autodiff")
    value_and_grad_fn = None
    if backward == "manual":
      value_and_grad_fn = lambda p, x, y: jaxrnn.elman.manual_value_and_grad(p, x, y,
                                                                             loss=cfg.loss)
    note = f"jaxrnn.elman (grads={backward!r}) + jaxrnn.make_train_step"
  optional = {} if value_and_grad_fn is None else {"value_and_grad_fn": value_and_grad_fn}
  # The library compiles its steps with `jaxrnn.train.jit_step` (jax.jit with its CPU compiler
  # options; what make_train_step(jit=True) uses): so does the benchmark, adding the donation.
  jit = getattr(getattr(jaxrnn, "train", None), "jit_step", None)
  try:
    library_step = jaxrnn.make_train_step(loss_fn, optax.adam(LEARNING_RATE), **optional,
                                          skip_nonfinite=False, jit=False)
    note += ("(skip_nonfinite=False, jit=False), jitted here by "
             + ("jaxrnn.train.jit_step" if jit else "jax.jit"))
  except TypeError:
    # An API without those options: take the library's jitted step as it comes.
    library_step = jaxrnn.make_train_step(loss_fn, optax.adam(LEARNING_RATE), **optional)
    note += " (library's own jit: no donation, default options)"
    donate = False

  def train_step(params, opt_state, xs, ys):
    params, opt_state, metrics = library_step(params, opt_state, xs, ys)
    return params, opt_state, metrics["loss"]

  return _jax_runner(impl, note, train_step, params, xs, ys, donate, jit=jit)


# ----------------------------------------------------------------------------------------------
# Flax linen.


def _build_flax_linen(impl, cell, cfg, xs, ys, *, seed, donate, threads, device):
  del threads, device  # JAX's default backend (see build)
  import jax
  import flax.linen as nn
  cell_cls = {"elman": nn.SimpleCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}[cell]
  if impl == "flax-linen-optlstm":
    cell_cls = nn.OptimizedLSTMCell

  class Model(nn.Module):
    """`nn.RNN(cell)` over batch-major inputs, then `nn.Dense` on every step."""

    @nn.compact
    def __call__(self, xs):
      return nn.Dense(cfg.output)(nn.RNN(cell_cls(features=cfg.hidden))(xs))

  model = Model()
  params = model.init(jax.random.key(seed), xs[:1])["params"]
  loss_fn = lambda p, x, y: _jax_loss(model.apply({"params": p}, x), y, cfg.loss)
  note = f"flax.linen.RNN({cell_cls.__name__}) + Dense"
  return _jax_runner(impl, note, _optax_step(loss_fn), params, xs, ys, donate)


# ----------------------------------------------------------------------------------------------
# Flax NNX.


def _build_flax_nnx(impl, cell, cfg, xs, ys, *, seed, donate, threads, device):
  del threads, device  # JAX's default backend (see build)
  from flax import nnx
  cell_cls = {"elman": nnx.SimpleCell, "lstm": nnx.LSTMCell, "gru": nnx.GRUCell}[cell]
  if impl == "flax-nnx-optlstm":
    cell_cls = nnx.OptimizedLSTMCell

  class Model(nnx.Module):
    """`nnx.RNN(cell)` then `nnx.Linear`."""

    def __init__(self, rngs):
      self.rnn = nnx.RNN(cell_cls(cfg.input, cfg.hidden, rngs=rngs), rngs=False)
      self.readout = nnx.Linear(cfg.hidden, cfg.output, rngs=rngs)

    def __call__(self, xs):
      # An explicit zero carry: the RNN's own default draws from an Rngs stream, which cannot be
      # advanced inside a plain jax.jit.
      carry = self.rnn.cell.initialize_carry(xs[:, 0].shape, rngs=nnx.Rngs(0))
      return self.readout(self.rnn(xs, initial_carry=carry))

  # NNX's functional API (split / merge inside one jax.jit) rather than nnx.jit + nnx.Optimizer:
  # params and optimiser state are plain pytrees passed in and out, as for every other JAX impl.
  graphdef, params, rest = nnx.split(Model(nnx.Rngs(seed)), nnx.Param, ...)

  def loss_fn(p, x, y):
    return _jax_loss(nnx.merge(graphdef, p, rest)(x), y, cfg.loss)

  note = f"flax.nnx.RNN({cell_cls.__name__}) + Linear, split/merge in jax.jit"
  return _jax_runner(impl, note, _optax_step(loss_fn), params, xs, ys, donate)


# ----------------------------------------------------------------------------------------------
# Haiku.


def _build_haiku(impl, cell, cfg, xs, ys, *, seed, donate, threads, device):
  del threads, device  # JAX's default backend (see build)
  import jax
  import jax.numpy as jnp
  import haiku as hk
  core_cls = {"elman": hk.VanillaRNN, "lstm": hk.LSTM, "gru": hk.GRU}[cell]

  def forward(xs):
    core = core_cls(cfg.hidden)
    # dynamic_unroll is time-major.
    hs, _ = hk.dynamic_unroll(core, jnp.swapaxes(xs, 0, 1), core.initial_state(xs.shape[0]))
    return jnp.swapaxes(hk.Linear(cfg.output)(hs), 0, 1)

  model = hk.without_apply_rng(hk.transform(forward))
  params = model.init(jax.random.key(seed), xs[:1])
  loss_fn = lambda p, x, y: _jax_loss(model.apply(p, x), y, cfg.loss)
  note = f"hk.dynamic_unroll({core_cls.__name__}) + hk.Linear"
  return _jax_runner(impl, note, _optax_step(loss_fn), params, xs, ys, donate)


# ----------------------------------------------------------------------------------------------
# Equinox.


def _build_equinox(impl, cell, cfg, xs, ys, *, seed, donate, threads, device):
  del threads, device  # JAX's default backend (see build)
  import jax
  import jax.numpy as jnp
  import equinox as eqx

  class ElmanCell(eqx.Module):
    """`h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)` (nn.RNN's cell; equinox has none)."""
    ih: eqx.nn.Linear
    hh: eqx.nn.Linear

    def __init__(self, input_size, hidden_size, *, key):
      k_ih, k_hh = jax.random.split(key)
      self.ih = eqx.nn.Linear(input_size, hidden_size, key=k_ih)
      self.hh = eqx.nn.Linear(hidden_size, hidden_size, key=k_hh)

    def __call__(self, x, h):
      return jnp.tanh(self.ih(x) + self.hh(h))

  class Model(eqx.Module):
    """One sequence `[T, D] -> [T, O]`: the cell under `lax.scan`, then a vmapped readout."""
    cell: eqx.Module
    readout: eqx.nn.Linear
    is_lstm: bool = eqx.field(static=True)

    def __call__(self, xs):
      h0 = jnp.zeros((cfg.hidden,), xs.dtype)
      carry0 = (h0, h0) if self.is_lstm else h0

      def body(carry, x):
        carry = self.cell(x, carry)
        return carry, carry[0] if self.is_lstm else carry

      _, hs = jax.lax.scan(body, carry0, xs)
      return jax.vmap(self.readout)(hs)

  k_cell, k_out = jax.random.split(jax.random.key(seed))
  cell_cls = {"elman": ElmanCell, "lstm": eqx.nn.LSTMCell, "gru": eqx.nn.GRUCell}[cell]
  model = Model(cell_cls(cfg.input, cfg.hidden, key=k_cell),
                eqx.nn.Linear(cfg.hidden, cfg.output, key=k_out), cell == "lstm")
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def loss_fn(p, x, y):
    return _jax_loss(jax.vmap(eqx.combine(p, static))(x), y, cfg.loss)

  name = "minimal ElmanCell(eqx.nn.Linear x2)" if cell == "elman" else f"eqx.nn.{cell_cls.__name__}"
  note = f"{name} under lax.scan, vmapped over the batch, + eqx.nn.Linear"
  return _jax_runner(impl, note, _optax_step(loss_fn), params, xs, ys, donate)


# ----------------------------------------------------------------------------------------------
# PyTorch.


def _build_torch(impl, cell, cfg, xs, ys, *, seed, donate, threads, device):
  del donate
  import torch
  import torch.nn.functional as F
  if device == "cuda" and not torch.cuda.is_available():
    raise Missing("torch has no CUDA device here")
  torch.set_num_threads(threads)
  torch.manual_seed(seed)
  rnn_cls = {"elman": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
  rnn = rnn_cls(cfg.input, cfg.hidden, batch_first=True).to(device)
  readout = torch.nn.Linear(cfg.hidden, cfg.output).to(device)
  # On CUDA, nn.RNN/LSTM/GRU run cuDNN's fused kernels, and Adam its fused multi-tensor kernel
  # (what a PyTorch user tuning a GPU step would pick); on the CPU, Adam's default.
  fused = {"fused": True} if device == "cuda" else {}
  optimizer = torch.optim.Adam([*rnn.parameters(), *readout.parameters()], lr=LEARNING_RATE,
                               **fused)
  xs_t = torch.from_numpy(xs).to(device)
  ys_t = torch.from_numpy(ys.astype(np.int64) if cfg.loss == "xent" else ys).to(device)

  def step(state):
    optimizer.zero_grad(set_to_none=True)
    out = readout(rnn(xs_t)[0])
    if cfg.loss == "mse":
      value = 0.5 * torch.sum(torch.square(out - ys_t)) / cfg.batch
    else:
      value = F.cross_entropy(out.reshape(-1, cfg.output), ys_t.reshape(-1),
                              reduction="sum") / cfg.batch
    value.backward()
    optimizer.step()
    return state, value.detach()

  if device == "cuda":
    note = (f"torch.nn.{rnn_cls.__name__}(batch_first, cuDNN "
            f"{torch.backends.cudnn.version()}) + nn.Linear + optim.Adam(fused=True) on CUDA")
    block = lambda _: torch.cuda.synchronize()
  else:
    note = f"torch.nn.{rnn_cls.__name__}(batch_first) + nn.Linear + optim.Adam, {threads} threads"
    block = lambda _: None
  return Runner(impl, note, step, None, block)


BUILDERS = {
    "jaxrnn": _build_jaxrnn,
    "jaxrnn-autodiff": _build_jaxrnn,
    "flax-linen": _build_flax_linen,
    "flax-linen-optlstm": _build_flax_linen,
    "flax-nnx": _build_flax_nnx,
    "flax-nnx-optlstm": _build_flax_nnx,
    "haiku": _build_haiku,
    "equinox": _build_equinox,
    "torch": _build_torch,
}
