"""Character-level language model on Tiny Shakespeare (or any UTF-8 text), built on jaxrnn.

Model: characters -> embedding (a `[V, E]` params leaf looked up in the loss; `--embed 0` feeds
one-hot vectors instead) -> `jaxrnn.rnn` stack of `--layers` `--cell` layers of `--hidden` units
(dropout between layers and before the readout with `--dropout`) -> the readout `V h_t + c` to
`V` logits -> cross-entropy, averaged per character. `V` is the corpus's sorted distinct characters.

Training (only jaxrnn's public API and optax): Adam with gradient clipping by global norm, a
learning rate warmed up then cosine-decayed over the run's budget (whichever of `--steps` and
`--minutes` binds), and one of
  --mode windows  `jaxrnn.make_train_step` on batches of random windows, each from a zero state
                  (as the PyTorch reference, experiments/bench/torch_charlm.py);
  --mode tbptt    `jaxrnn.tbptt.make_tbptt_step` walking `--batch` parallel streams of the text in
                  chunks of `--seq` characters, the state carried from chunk to chunk.
The first 90% of the characters train, the last 10% validate. Validation is the reference's
protocol: consecutive non-overlapping 128-character windows, each from a zero state, mean
cross-entropy per predicted character (nats, and bits = nats / ln 2). Periodic evaluations use a
fixed, evenly spaced subset of those windows (`--eval-windows`); the last and the best models are
evaluated on all of them at the end. `--minutes` counts training time only (the first step's
compilation included; evaluation and checkpoint writing excluded), as the reference does.

Outputs, in a new run folder under `--out` (never an existing one): config.json, metrics.json
(learning curves and the summary), curves.png, sample.txt and checkpoints/ (the last and the best
checkpoint by validation loss, `jaxrnn.checkpoint` files holding the model config and vocabulary).

Usage (from the repository root):
  python experiments/charlm.py                                  # 10 minutes, LSTM defaults
  python experiments/charlm.py train --cell gru --minutes 2 --out runs
  python experiments/charlm.py --quick                          # < 1 minute, every output
  python experiments/charlm.py sample --checkpoint runs/charlm-... --length 500 --prompt "ROMEO:"
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
  from experiments import common
except ImportError:  # run as a script: python experiments/charlm.py
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
  from experiments import common

import jaxrnn
from jaxrnn import checkpoint, host_memory, losses, parallel, rnn, tbptt

ExperimentError = common.ExperimentError

MODEL_TAG = "jaxrnn.charlm"
CONFIG_VERSION = 1
CELLS = ("lstm", "gru", "elman", "mingru")
MODES = ("windows", "tbptt")
HOST_MALLOC = ("default", *host_memory.MODES)
MATMUL_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
BACKWARDS = ("manual", "autodiff")
DEFAULT_CORPUS = Path(__file__).resolve().parent / "data" / "tinyshakespeare.txt"
DEFAULT_PROMPT = "ROMEO:"
EVAL_SEQ = 128              # the reference's validation windows
EVAL_BATCH = 128            # windows per evaluation call (the last call is padded)
LOG2E = 1.0 / math.log(2.0)
# Best validation loss of experiments/bench/torch_charlm.py in 10 minutes on Tiny Shakespeare.
REFERENCE_VAL_LOSS = 1.516

# What --quick overrides (anything given explicitly on the command line wins).
QUICK = {"hidden": 32, "embed": 16, "layers": 1, "batch": 16, "seq": 32, "steps": 60,
         "lr": 4e-3, "dropout": 0.0,
         "eval_every": 20, "eval_windows": 16, "sample_length": 200, "warmup": 5}


# ------------------------------------------------------------------------------------------------
# Corpus.


class Corpus(NamedTuple):
  """A text cut for training.

  Attributes:
    vocab: the sorted distinct characters, a str of `V` characters.
    train: `[N_train]` int32 character ids, the first 90%.
    val: `[N_val]` int32 character ids, the last 10%.
  """
  vocab: str
  train: np.ndarray
  val: np.ndarray


def read_text(path: Path) -> str:
  """The UTF-8 text of `path`, or an ExperimentError saying why it is not usable."""
  path = Path(path)
  if not path.exists():
    raise ExperimentError(f"corpus file not found: {path}")
  if not path.is_file():
    raise ExperimentError(f"corpus must be a text file; {path} is not a regular file")
  try:
    data = path.read_bytes()
  except OSError as err:
    raise ExperimentError(f"cannot read corpus {path}: {err.strerror or err}") from None
  if not data:
    raise ExperimentError(f"corpus {path} is empty")
  if b"\x00" in data:
    raise ExperimentError(f"corpus {path} looks binary (it contains NUL bytes); give a UTF-8 "
                          "text file")
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as err:
    raise ExperimentError(f"corpus {path} is not UTF-8 text (invalid byte at offset "
                          f"{err.start}); give a UTF-8 text file") from None


def encode(text: str, vocab: str) -> np.ndarray:
  """`text` as `[len(text)]` int32 ids into `vocab` (every character must be in it)."""
  try:
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
  except UnicodeEncodeError:
    raise ExperimentError(f"{text!r} is not valid text (it has undecodable bytes)") from None
  table = np.frombuffer(vocab.encode("utf-32-le"), np.uint32)
  ids = np.searchsorted(table, codes)
  if len(codes) and (ids.max() >= len(table) or np.any(table[np.minimum(ids, len(table) - 1)]
                                                         != codes)):
    missing = sorted(set(text) - set(vocab))
    raise ExperimentError(f"characters {''.join(missing)!r} are not in the model's vocabulary")
  return ids.astype(np.int32)


def decode(ids, vocab: str) -> str:
  return "".join(vocab[i] for i in np.asarray(ids).tolist())


def load_corpus(path: Path, *, min_val: int) -> Corpus:
  """Read, index and split a corpus: first 90% train, last 10% validation."""
  text = read_text(path)
  vocab = "".join(sorted(set(text)))
  ids = encode(text, vocab)
  split = int(0.9 * len(ids))
  train, val = ids[:split], ids[split:]
  if len(val) < min_val + 1:
    raise ExperimentError(f"corpus {path} is too short: {len(ids)} characters leave "
                          f"{len(val)} for validation, which needs at least {min_val + 1} (one "
                          f"{min_val}-character window); use a longer text or a smaller --seq")
  return Corpus(vocab, train, val)


# ------------------------------------------------------------------------------------------------
# Model: params {"embed": [V, E] (absent for one-hot input), "rnn": jaxrnn.rnn params}.


class Model(NamedTuple):
  """Static description of a char-LM (hashable).

  Attributes:
    spec: the `jaxrnn.rnn.RNN` (input size `E`, or `V` for one-hot; readout to `V`).
    vocab_size: `V`.
    embed: `E`, or 0 for one-hot input.
    dropout: rate on the top layer's outputs before the readout (the spec drops between layers).
  """
  spec: rnn.RNN
  vocab_size: int
  embed: int
  dropout: float


def model_config(args, vocab: str) -> dict:
  """The JSON record from which `build_model` rebuilds the model (stored in every checkpoint)."""
  return {"model": MODEL_TAG, "config_version": CONFIG_VERSION, "cell": args.cell,
          "layers": args.layers, "hidden": args.hidden, "embed": args.embed,
          "dropout": args.dropout, "vocab": vocab}


def build_model(config: dict) -> Model:
  vocab_size = len(config["vocab"])
  embed = int(config["embed"])
  spec = rnn.rnn(config["cell"], embed or vocab_size, int(config["hidden"]),
                 num_layers=int(config["layers"]), output_size=vocab_size,
                 dropout=float(config["dropout"]))
  return Model(spec, vocab_size, embed, float(config["dropout"]))


def init_params(key: jax.Array, model: Model) -> dict:
  k_embed, k_rnn = jax.random.split(key)
  params = {"rnn": rnn.init(k_rnn, model.spec)}
  if model.embed:
    # nn.Embedding's N(0, 1) init, as the reference.
    params["embed"] = jax.random.normal(k_embed, (model.vocab_size, model.embed), jnp.float32)
  return params


def embed_ids(model: Model, params: dict, ids: jax.Array) -> jax.Array:
  """`ids [...]` int -> inputs `[..., D]`: an embedding lookup, or one-hot vectors."""
  if model.embed:
    return params["embed"][ids]
  return jax.nn.one_hot(ids, model.vocab_size, dtype=jnp.float32)


def forward(model: Model, params: dict, ids: jax.Array, carry=None, *, key=None,
            backward: str = "manual", unroll: int = 1, matmul_dtype=None):
  """`ids [B, T]` -> `(logits [B, T, V], final carry)`; dropout only when `key` is given;
  `matmul_dtype` as in `jaxrnn.rnn.apply`."""
  if model.dropout == 0.0:
    key = None
  k_rnn = k_top = None
  if key is not None:
    k_rnn, k_top = jax.random.split(key)
  hs, carry = rnn.apply(model.spec, params["rnn"], embed_ids(model, params, ids), carry,
                        key=k_rnn, backward=backward, unroll=unroll, matmul_dtype=matmul_dtype)
  if k_top is not None:
    keep = jax.random.bernoulli(k_top, 1.0 - model.dropout, hs.shape)
    hs = jnp.where(keep, hs / (1.0 - model.dropout), 0.0)
  return rnn.readout(model.spec, params["rnn"], hs, matmul_dtype), carry


def mean_xent(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean cross-entropy per character (nats) of `logits [B, T, V]` against `targets [B, T]`."""
  return jnp.mean(losses.step_losses(logits, targets, "xent"))


def make_window_loss(model: Model, backward: str, unroll: int, matmul_dtype=None):
  """`loss(params, xs [B, T], ys [B, T], key) -> scalar`, each window from a zero state."""

  def loss_fn(params, xs, ys, key):
    logits, _ = forward(model, params, xs, key=key, backward=backward, unroll=unroll,
                        matmul_dtype=matmul_dtype)
    return mean_xent(logits, ys)
  return loss_fn


def make_chunk_loss(model: Model, backward: str, unroll: int, matmul_dtype=None):
  """`loss(params, carry, xs [B, k], ys [B, k], key) -> (scalar, carry)` for truncated BPTT."""

  def loss_fn(params, carry, xs, ys, key):
    logits, carry = forward(model, params, xs, carry, key=key, backward=backward, unroll=unroll,
                            matmul_dtype=matmul_dtype)
    return mean_xent(logits, ys), carry
  return loss_fn


def make_optimizer(config: dict) -> optax.GradientTransformation:
  """Clip by global norm, then Adam whose learning rate the loop sets each step (the schedule
  follows the time budget, which a step-indexed optax schedule cannot know in advance)."""
  return optax.chain(optax.clip_by_global_norm(float(config["clip"])),
                     optax.inject_hyperparams(optax.adam)(learning_rate=float(config["lr"])))


def set_learning_rate(opt_state, lr: float):
  clip_state, adam_state = opt_state
  hyper = dict(adam_state.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32))
  return clip_state, adam_state._replace(hyperparams=hyper)


def learning_rate(progress: float, step: int, *, lr: float, warmup: int, final_frac: float,
                  schedule: str) -> float:
  """Linear warm-up over `warmup` steps, then constant or cosine decay to `lr * final_frac` as
  the run's `progress` (fraction of the budget spent) goes from 0 to 1."""
  scale = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
  if schedule == "cosine":
    p = min(max(progress, 0.0), 1.0)
    scale *= final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * p))
  return lr * scale


# ------------------------------------------------------------------------------------------------
# Evaluation and sampling.


def make_evaluator(model: Model):
  """`evaluate(params, windows [n, 129] int32 numpy) -> mean nats per predicted character`."""

  @jax.jit
  def window_losses(params, xs, ys):
    logits, _ = forward(model, params, xs)
    return jnp.sum(losses.step_losses(logits, ys, "xent"), axis=-1)   # [B]

  def evaluate(params, windows: np.ndarray) -> float:
    n = len(windows)
    pad = (-n) % EVAL_BATCH
    padded = np.concatenate([windows, np.zeros((pad, windows.shape[1]), windows.dtype)])
    sums = []
    for i in range(0, len(padded), EVAL_BATCH):
      batch = padded[i:i + EVAL_BATCH]
      sums.append(window_losses(params, batch[:, :-1], batch[:, 1:]))
    per_window = np.concatenate([np.asarray(s) for s in sums])[:n]
    return float(np.sum(per_window, dtype=np.float64) / (n * (windows.shape[1] - 1)))
  return evaluate


def val_windows(val: np.ndarray, seq: int = EVAL_SEQ) -> np.ndarray:
  """Consecutive non-overlapping windows `[n, seq + 1]` (inputs `[:, :-1]`, targets `[:, 1:]`)."""
  n = (len(val) - 1) // seq
  starts = np.arange(n) * seq
  return np.stack([val[s:s + seq + 1] for s in starts])


def subset(windows: np.ndarray, count: int) -> np.ndarray:
  """A fixed, evenly spaced subset of `count` windows (all of them if `count` is 0 or more than
  there are)."""
  if count <= 0 or count >= len(windows):
    return windows
  return windows[np.linspace(0, len(windows) - 1, count).round().astype(int)]


def pick(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array):
  """One id from `logits [V]`: the `top_k` most likely (all if 0), softmax at `temperature`
  (greedy when 0). Both are traced, so changing them does not recompile."""
  kth = jnp.sort(logits)[::-1][jnp.clip(top_k - 1, 0, logits.shape[-1] - 1)]
  logits = jnp.where((top_k > 0) & (logits < kth), -jnp.inf, logits)
  sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
  return jnp.where(temperature > 0, sampled, jnp.argmax(logits)).astype(jnp.int32)


def make_sampler(model: Model):
  """`sample(params, prompt [P] int32, key, temperature, top_k, length) -> [length] int32`.

  The prompt is run through the stack first (`rnn.apply`) to warm the state; then one
  `jax.lax.scan` feeds each sampled character back in through `rnn.step` and `rnn.readout`.
  """

  @functools.partial(jax.jit, static_argnames=("length",))
  def sample(params, prompt, key, temperature, top_k, *, length: int):
    p = params["rnn"]
    hs, carry = rnn.apply(model.spec, p, embed_ids(model, params, prompt))   # [P, H]
    logits = rnn.readout(model.spec, p, hs[-1])

    def body(state, k):
      carry, logits = state
      ch = pick(logits, k, temperature, top_k)
      carry, h = rnn.step(model.spec, p, carry, embed_ids(model, params, ch))
      return (carry, rnn.readout(model.spec, p, h)), ch

    _, ids = jax.lax.scan(body, (carry, logits), jax.random.split(key, length))
    return ids
  return sample


def generate(sampler, params, vocab: str, prompt: str, *, length: int,
             temperature: float, top_k: int, key: jax.Array) -> str:
  """The prompt followed by `length` sampled characters."""
  seed = prompt or ("\n" if "\n" in vocab else vocab[0])  # an empty prompt starts a new line
  ids = sampler(params, jnp.asarray(encode(seed, vocab)), key,
                jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
                length=length)
  return prompt + decode(ids, vocab)


def check_sampling(temperature: float, top_k: int, length: int) -> None:
  if not math.isfinite(temperature) or temperature < 0:
    raise ExperimentError(f"--temperature must be >= 0 (0 = greedy); got {temperature}")
  if top_k < 0:
    raise ExperimentError(f"--top-k must be >= 0 (0 = no cut); got {top_k}")
  if length < 1:
    raise ExperimentError(f"--length must be positive; got {length}")


# ------------------------------------------------------------------------------------------------
# Checkpoints.


def checkpoint_file(path: Path) -> Path:
  """The checkpoint a `--checkpoint` argument names: a file, or a run (or checkpoints) folder,
  whose best checkpoint by validation loss (else its newest intact one) is taken."""
  path = Path(path)
  if not path.exists():
    raise ExperimentError(f"checkpoint not found: {path}")
  if path.is_file():
    return path
  folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  manager = checkpoint.CheckpointManager(folder, keep=1, best_metric="val_loss")
  try:
    best = manager.best_step()
  except checkpoint.CheckpointError as err:
    raise ExperimentError(f"cannot read checkpoints in {folder}: {err}") from None
  if best is None:
    intact = [e for e in manager.entries() if e.error is None]
    if not intact:
      raise ExperimentError(f"no intact checkpoint in {folder}")
    best = intact[-1].step
  return Path(manager.path(best))


def load_model(path: Path):
  """`(model, config, params, file)` from a charlm checkpoint, or an ExperimentError."""
  file = checkpoint_file(path)
  try:
    info = checkpoint.verify(file)
  except checkpoint.CheckpointError as err:
    raise ExperimentError(f"bad checkpoint: {err}") from None
  except OSError as err:
    raise ExperimentError(f"cannot read checkpoint {file}: {err.strerror or err}") from None
  config = info.config
  if not isinstance(config, dict) or config.get("model") != MODEL_TAG:
    found = config.get("model") if isinstance(config, dict) else None
    raise ExperimentError(f"{file} is not a charlm checkpoint (its config names model "
                          f"{found!r}, expected {MODEL_TAG!r})")
  if config.get("config_version") != CONFIG_VERSION:
    raise ExperimentError(f"{file} is a charlm checkpoint of config version "
                          f"{config.get('config_version')!r}; this script reads {CONFIG_VERSION}")
  try:
    model = build_model(config)
    params = init_params(jax.random.key(0), model)
    opt_state = make_optimizer(config).init(params)
  except (KeyError, TypeError, ValueError) as err:
    raise ExperimentError(f"{file}: its charlm config is unusable ({err})") from None
  try:
    ckpt = checkpoint.load(file, params=params, opt_state=opt_state)
  except checkpoint.CheckpointError as err:
    raise ExperimentError(f"checkpoint does not match its model: {err}") from None
  return model, config, ckpt.params, file


# ------------------------------------------------------------------------------------------------
# Command line.


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """argparse's own errors (bad types, unknown options) as one-line `error:` too."""

  def error(message):
    raise ExperimentError(f"{parser.prog}: {message}")
  parser.error = error
  return parser


def train_parser() -> argparse.ArgumentParser:
  p = common.base_parser("Train a character-level language model. Subcommands: train (the "
                         "default, these options) and sample (see `charlm.py sample --help`).",
                         cells=CELLS, default_cell="lstm")
  p.prog = "charlm.py train"
  p.allow_abbrev = False
  p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                 help="UTF-8 text file (default: experiments/data/tinyshakespeare.txt)")
  p.add_argument("--mode", default="windows", help="windows | tbptt (default windows)")
  parallel.add_devices_argument(p)
  p.add_argument("--layers", type=int, default=1)
  p.add_argument("--hidden", type=int, default=384)
  p.add_argument("--embed", type=int, default=64, help="embedding size; 0 = one-hot input")
  p.add_argument("--dropout", type=float, default=0.25,
                 help="dropout on the top layer's outputs (and between layers); default 0.25")
  p.add_argument("--batch", type=int, default=32, help="windows (or streams) per step")
  p.add_argument("--seq", type=int, default=128, help="window (or TBPTT chunk) length")
  p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate")
  p.add_argument("--schedule", default="cosine", help="cosine | constant (after warm-up)")
  p.add_argument("--final-lr-frac", type=float, default=0.05,
                 help="cosine decays the lr to this fraction of --lr")
  p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
  p.add_argument("--clip", type=float, default=5.0, help="gradient clip (global norm)")
  p.add_argument("--backward", default="manual", help="manual | autodiff BPTT")
  p.add_argument("--unroll", type=int, default=1, help="lax.scan unroll factor")
  p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
  p.add_argument("--minutes", type=float, default=10.0, help="training-time budget (10)")
  p.add_argument("--matmul-dtype", default="float32",
                 help="float32 | bfloat16: the training step's matmul operands (jaxrnn.rnn's "
                      "matmul_dtype; float32 accumulation and state). Evaluation stays float32. "
                      "On a CPU the float32 LSTM/GRU run the native loops, faster than bfloat16 "
                      "through the scan (about 50,000 vs 39,600 chars/s on the default model)")
  p.add_argument("--host-malloc", default="default",
                 help="default | hugepages | keep: back XLA's per-step CPU buffers with "
                      "transparent huge pages, or keep glibc's freed heaps in the process "
                      "(jaxrnn.host_memory; the script relaunches itself with the GLIBC_TUNABLES "
                      "of the mode). Same results; hugepages measured 36,100 -> 40,600 chars/s on "
                      "the default model")
  p.add_argument("--eval-every", type=int, default=500, help="steps between validations")
  p.add_argument("--eval-windows", type=int, default=256,
                 help="validation windows in periodic evaluations (0 = all)")
  p.add_argument("--prompt", default=None,
                 help=f"prompt of the final sample (default {DEFAULT_PROMPT!r} if the "
                      "vocabulary has its characters)")
  p.add_argument("--sample-length", type=int, default=1000)
  p.add_argument("--temperature", type=float, default=0.8)
  p.add_argument("--top-k", type=int, default=0)
  return _one_line_errors(p)


def sample_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="charlm.py sample", allow_abbrev=False,
                              description="Generate text from a charlm checkpoint.")
  p.add_argument("--checkpoint", type=Path, required=True,
                 help="a checkpoint file, or a run folder (its best checkpoint)")
  p.add_argument("--length", type=int, default=500, help="characters to generate")
  p.add_argument("--prompt", default="", help="text to warm the state on (default: none)")
  p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
  p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0 = all)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", type=Path, default=None,
                 help="also write the text to this new file (never overwritten)")
  p.add_argument("--quiet", action="store_true", help="do not print the text on stdout")
  return _one_line_errors(p)


def parse_train_args(argv) -> argparse.Namespace:
  parser = train_parser()
  args = parser.parse_args(argv)
  if args.quick:
    explicit = train_parser()         # the same options, without defaults: what was given
    for action in explicit._actions:
      action.default = argparse.SUPPRESS
    given = set(vars(explicit.parse_args(argv)))
    for name, value in QUICK.items():
      if name not in given:
        setattr(args, name, value)
  common.check_choice("--cell", args.cell, CELLS)
  common.check_choice("--mode", args.mode, MODES)
  common.check_choice("--backward", args.backward, BACKWARDS)
  common.check_choice("--schedule", args.schedule, ("cosine", "constant"))
  common.check_choice("--host-malloc", args.host_malloc, HOST_MALLOC)
  common.check_choice("--matmul-dtype", args.matmul_dtype, tuple(MATMUL_DTYPES))
  if args.host_malloc != "default" and not host_memory.requested(args.host_malloc):
    raise ExperimentError(
        f"--host-malloc {args.host_malloc} needs the process started with GLIBC_TUNABLES="
        f"{':'.join(host_memory.MODES[args.host_malloc])} (glibc reads it at start-up only): run "
        "`python experiments/charlm.py ...` as a script, which relaunches itself with it, or set "
        "it in the environment.")
  common.check_positive(layers=args.layers, hidden=args.hidden, batch=args.batch, seq=args.seq,
                        lr=args.lr, clip=args.clip, minutes=args.minutes,
                        eval_every=args.eval_every, unroll=args.unroll,
                        sample_length=args.sample_length)
  if args.steps is not None:
    common.check_positive(steps=args.steps)
  if not math.isfinite(args.minutes):
    raise ExperimentError(f"--minutes must be finite; got {args.minutes}")
  if args.devices is not None:
    common.check_positive(devices=args.devices)
    if args.mode != "windows":
      raise ExperimentError(f"--devices needs --mode windows (the TBPTT carry is not sharded); "
                            f"got --mode {args.mode}")
    if args.batch % args.devices:
      raise ExperimentError(f"--batch {args.batch} must be a multiple of --devices {args.devices}")
  if args.embed < 0:
    raise ExperimentError(f"--embed must be >= 0 (0 = one-hot input); got {args.embed}")
  if not 0.0 <= args.dropout < 1.0:
    raise ExperimentError(f"--dropout must be in [0, 1); got {args.dropout}")
  if not 0.0 <= args.final_lr_frac <= 1.0:
    raise ExperimentError(f"--final-lr-frac must be in [0, 1]; got {args.final_lr_frac}")
  if args.warmup < 0:
    raise ExperimentError(f"--warmup must be >= 0; got {args.warmup}")
  check_sampling(args.temperature, args.top_k, args.sample_length)
  return args


# ------------------------------------------------------------------------------------------------
# Training.


class WindowBatches:
  """Random windows of the training text, `(xs [B, T], ys [B, T])` (the reference's batches)."""

  def __init__(self, train: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
    self.train, self.batch, self.seq, self.rng = train, batch, seq, rng
    self.offsets = np.arange(seq + 1)

  def next(self):
    starts = self.rng.integers(0, len(self.train) - self.seq - 1, size=self.batch)
    window = self.train[starts[:, None] + self.offsets]
    return window[:, :-1], window[:, 1:]


class StreamChunks:
  """`--batch` contiguous streams of the training text walked in chunks of `--seq` characters.

  Each epoch starts the streams at a fresh random offset (so chunk boundaries move) and `reset`
  is True for its first chunk (the carry starts from zeros again)."""

  def __init__(self, train: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
    self.train, self.batch, self.seq, self.rng = train, batch, seq, rng
    self.epoch, self.pos, self.streams = -1, 0, None

  def _new_epoch(self):
    self.epoch += 1
    offset = int(self.rng.integers(0, self.seq))
    self.streams = tbptt.stream_batches(self.train[offset:], self.batch)
    self.pos = 0

  def next(self):
    reset = False
    if self.streams is None or self.pos + self.seq + 1 > self.streams.shape[1]:
      self._new_epoch()
      reset = True
    s = self.streams[:, self.pos:self.pos + self.seq + 1]
    self.pos += self.seq
    return s[:, :-1], s[:, 1:], reset


def plot_curves(path: Path, metrics: dict, title: str, *, eval_windows: int,
                reference: bool) -> None:
  """Train loss per step and validation loss per evaluation against characters seen."""
  plt = common.plt()
  fig, ax = plt.subplots(figsize=(8, 4.5))
  train = metrics["train"]
  chars = np.asarray(train["chars_seen"], np.float64)
  loss = np.asarray(train["loss"], np.float64)
  if len(loss):
    ax.plot(chars / 1e6, loss, color="0.75", lw=0.6, label="train (per step)")
    width = max(1, len(loss) // 100)
    if len(loss) > width:
      smooth = np.convolve(loss, np.ones(width) / width, mode="valid")
      ax.plot(chars[width - 1:] / 1e6, smooth, color="C0", label=f"train ({width}-step mean)")
  evals = metrics["evals"]
  if evals:
    ax.plot([e["chars_seen"] / 1e6 for e in evals], [e["val_loss"] for e in evals], "o-",
            color="C1", ms=3, label=f"validation ({eval_windows} windows)")
  final = metrics.get("summary", {}).get("final_val_loss")
  if final is not None:
    ax.axhline(final, color="C1", ls=":", lw=1, label=f"final validation {final:.3f}")
  if reference:
    ax.axhline(REFERENCE_VAL_LOSS, color="C3", ls="--", lw=1,
               label=f"PyTorch reference best {REFERENCE_VAL_LOSS}")
  ax.set_xlabel("characters seen (millions)")
  ax.set_ylabel("cross-entropy (nats / char)")
  lo = min([v for v in [final] + [e["val_loss"] for e in evals] if v is not None] + [1.3])
  ax.set_ylim(max(0.0, lo - 0.1), min(4.5, max(loss.max() if len(loss) else 4.0, 2.0) + 0.1))
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  secax = ax.secondary_yaxis("right", functions=(lambda x: x * LOG2E, lambda x: x / LOG2E))
  secax.set_ylabel("bits / char")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def train(argv) -> int:
  args = parse_train_args(argv)
  corpus = load_corpus(args.corpus, min_val=8)
  if len(corpus.train) < args.seq + 2 or (args.mode == "tbptt"
                                          and len(corpus.train) // args.batch < args.seq + 2):
    raise ExperimentError(f"corpus {args.corpus} is too short for --batch {args.batch} --seq "
                          f"{args.seq}: the training part has {len(corpus.train)} characters")
  on_reference_corpus = args.corpus.resolve() == DEFAULT_CORPUS.resolve()
  eval_seq = min(EVAL_SEQ, len(corpus.val) - 1)
  windows_all = val_windows(corpus.val, eval_seq)
  windows_eval = subset(windows_all, args.eval_windows)

  cfg = model_config(args, corpus.vocab)
  model = build_model(cfg)
  hyper = {"lr": args.lr, "clip": args.clip}
  optimizer = make_optimizer(hyper)
  key = jax.random.key(args.seed)
  k_init, k_train, k_sample = jax.random.split(key, 3)
  params = init_params(k_init, model)
  opt_state = optimizer.init(params)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

  mesh = None
  if args.devices:
    try:
      mesh = parallel.make_mesh(args.devices)
    except ValueError as err:
      raise ExperimentError(str(err)) from None
  try:
    run_dir = common.make_run_dir(args.out, "charlm")
  except OSError as err:
    raise ExperimentError(f"cannot create a run folder under {args.out}: "
                          f"{err.strerror or err}") from None
  ckpt_dir = run_dir / "checkpoints"
  manager = checkpoint.CheckpointManager(ckpt_dir, keep=1, best_metric="val_loss")
  run_config = {
      "model": cfg, "params": n_params,
      "training": {k: getattr(args, k) for k in (
          "mode", "batch", "seq", "lr", "schedule", "final_lr_frac", "warmup", "clip", "backward",
          "unroll", "steps", "minutes", "eval_every", "eval_windows", "seed", "quick",
          "host_malloc", "matmul_dtype")},
      "corpus": {"path": str(args.corpus), "chars": len(corpus.train) + len(corpus.val),
                 "train_chars": len(corpus.train), "val_chars": len(corpus.val),
                 "vocab_size": len(corpus.vocab)},
      "eval": {"window": eval_seq, "periodic_windows": len(windows_eval),
               "all_windows": len(windows_all)},
      "sample": {"prompt": args.prompt, "length": args.sample_length,
                 "temperature": args.temperature, "top_k": args.top_k},
      "jax": {"version": jax.__version__, "backend": jax.default_backend(),
              "devices": [str(d) for d in jax.devices()]},
      "jaxrnn": jaxrnn.__version__,
      "argv": list(argv),
  }
  common.write_json(run_dir / "config.json", run_config)
  ckpt_config = dict(cfg, **hyper)

  print(f"corpus {args.corpus}: {len(corpus.train):,} train + {len(corpus.val):,} validation "
        f"chars, vocabulary {len(corpus.vocab)}; {args.cell} {args.layers}x{args.hidden}, "
        f"embed {args.embed or 'one-hot'}, {n_params:,} params; mode {args.mode}, batch "
        f"{args.batch} x {args.seq}, lr {args.lr} ({args.schedule}), {args.backward} BPTT; "
        f"budget {args.minutes:g} min" + (f" / {args.steps} steps" if args.steps else ""),
        flush=True)
  print(f"run folder: {run_dir}", flush=True)

  rng = np.random.default_rng(args.seed)
  if args.mode == "windows":
    loss_fn = make_window_loss(model, args.backward, args.unroll,
                              MATMUL_DTYPES[args.matmul_dtype])
    if args.devices:  # data-parallel over a mesh; without --devices, the plain jitted step
      # xs and ys (step arguments 2 and 3) are split over the devices; the dropout key is not.
      step_fn = parallel.make_sharded_train_step(loss_fn, optimizer, mesh, batch_argnums=(2, 3))
    else:
      step_fn = jaxrnn.make_train_step(loss_fn, optimizer)
    data = WindowBatches(corpus.train, args.batch, args.seq, rng)
  else:
    loss_fn = make_chunk_loss(model, args.backward, args.unroll,
                              MATMUL_DTYPES[args.matmul_dtype])
    step_fn = tbptt.make_tbptt_step(loss_fn, optimizer)
    data = StreamChunks(corpus.train, args.batch, args.seq, rng)
    zero_carry = rnn.initial_carry(model.spec, params["rnn"], (args.batch,))
    carry = zero_carry
  evaluate = make_evaluator(model)
  sampler = make_sampler(model)

  budget_s = 60.0 * args.minutes
  chars_per_step = args.batch * args.seq
  metrics: dict[str, Any] = {"train": {"step": [], "chars_seen": [], "train_s": [], "loss": [],
                                       "lr": []},
                             "evals": []}
  pending = []          # (step, train_s, lr, loss array) not yet read back from the device
  best = (math.inf, -1)
  train_s = eval_s = 0.0
  wall0 = time.perf_counter()
  step = 0

  def flush_losses():
    for s, t, lr, value in pending:
      m = metrics["train"]
      m["step"].append(s)
      m["chars_seen"].append(s * chars_per_step)
      m["train_s"].append(round(t, 3))
      m["lr"].append(lr)
      m["loss"].append(float(value))
    pending.clear()

  def running_loss(n=50):
    tail = metrics["train"]["loss"][-n:]
    return float(np.mean(tail)) if tail else None

  def validate():
    """Evaluate on the periodic subset, checkpoint (never over an existing file), log."""
    nonlocal eval_s, best
    start = time.perf_counter()
    val = evaluate(params, windows_eval)
    entry = {"step": step, "chars_seen": step * chars_per_step, "train_s": round(train_s, 3),
             "wall_s": round(time.perf_counter() - wall0, 3), "val_loss": val,
             "val_bpc": val * LOG2E, "train_loss": running_loss()}
    if step > 0 and not Path(manager.path(step)).exists():  # step 0 is not worth a checkpoint
      ckpt_metrics = {"val_loss": val}
      if entry["train_loss"] is not None:
        ckpt_metrics["train_loss"] = entry["train_loss"]
      manager.save(checkpoint.Checkpoint(
          params, opt_state, step, key=k_train, config=ckpt_config,
          data_position={"chars_seen": step * chars_per_step}, metrics=ckpt_metrics))
      if val < best[0]:
        best = (val, step)
    metrics["evals"].append(entry)
    common.write_json(run_dir / "metrics.json", metrics)
    eval_s += time.perf_counter() - start
    return val

  bar = common.progress(None, total=100, desc="train", disable=args.no_progress)
  if hasattr(bar, "bar_format"):     # the bar counts percent of the budget
    bar.bar_format = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}"
  last_val = validate()
  shown = 0.0
  seg_start = time.perf_counter()    # start of the current stretch of training time, or None
  interrupted = False

  def end_segment():
    nonlocal train_s, seg_start
    flush_losses()
    jax.block_until_ready(params)
    train_s += time.perf_counter() - seg_start
    seg_start = None

  try:
    while True:
      now_train = train_s + (time.perf_counter() - seg_start)
      progress = now_train / budget_s
      if args.steps:
        progress = max(progress, step / args.steps)
      if progress >= 1.0:
        break
      lr = learning_rate(progress, step, lr=args.lr, warmup=args.warmup,
                         final_frac=args.final_lr_frac, schedule=args.schedule)
      opt_state = set_learning_rate(opt_state, lr)
      k_step = jax.random.fold_in(k_train, step)
      if args.mode == "windows":
        xs, ys = data.next()
        params, opt_state, m = step_fn(params, opt_state, xs, ys, k_step)
      else:
        xs, ys, reset = data.next()
        if reset:
          carry = zero_carry
        params, opt_state, carry, m = step_fn(params, opt_state, carry, xs, ys, k_step)
      step += 1
      pending.append((step, now_train, lr, m["loss"]))
      if step % 10 == 0:
        flush_losses()      # also bounds how far the host runs ahead of the device
      if step % args.eval_every == 0:
        end_segment()
        last_val = validate()
        seg_start = time.perf_counter()
      pct = min(100.0, 100.0 * progress)
      if bar is not None and hasattr(bar, "update") and pct - shown >= 0.5:
        bar.update(pct - shown)
        shown = pct
        loss = running_loss()
        bar.set_postfix_str(f"step {step}, loss {loss if loss is not None else math.nan:.3f}, "
                            f"val {last_val:.3f}, "
                            f"{step * chars_per_step / max(now_train, 1e-9):,.0f} chars/s",
                            refresh=False)
  except KeyboardInterrupt:
    # Ctrl-C ends training early; evaluation, sample, plot and summary still follow (a second
    # Ctrl-C aborts them).
    interrupted = True
  finally:
    if bar is not None and hasattr(bar, "close"):
      if shown < 100.0 and not interrupted:
        bar.update(100.0 - shown)
      bar.close()
  if interrupted:
    print(f"interrupted at step {step}: finishing with the model trained so far", flush=True)
  if seg_start is not None:
    end_segment()
  if step == 0:
    raise ExperimentError("interrupted before the first training step; nothing was saved "
                          f"but {run_dir}/config.json")
  if not Path(manager.path(step)).exists():
    validate()

  # Final evaluation on the whole validation text: the last model and the best checkpoint.
  start = time.perf_counter()
  final_val = evaluate(params, windows_all)
  if best[1] < 0:               # no finite validation loss so far: the last is all there is
    best = (math.inf, step)
  best_path = Path(manager.path(best[1]))
  best_params = checkpoint.load(best_path, params=params, opt_state=opt_state).params
  best_val = final_val if best[1] == step else evaluate(best_params, windows_all)
  if best_val > final_val:      # the subset can rank them wrongly; report the better one
    best_val_report, best_params, best_step = final_val, params, step
    best_path = Path(manager.path(step))
  else:
    best_val_report, best_step = best_val, best[1]
  eval_s += time.perf_counter() - start

  prompt = args.prompt
  if prompt is None:
    prompt = DEFAULT_PROMPT if set(DEFAULT_PROMPT) <= set(corpus.vocab) else ""
  try:
    text = generate(sampler, best_params, corpus.vocab, prompt, length=args.sample_length,
                    temperature=args.temperature, top_k=args.top_k, key=k_sample)
  except ExperimentError as err:
    text = f"(no sample: {err})"
  (run_dir / "sample.txt").write_text(text + "\n", encoding="utf-8")

  summary = {
      "steps": step, "chars_seen": step * chars_per_step, "train_s": train_s, "eval_s": eval_s,
      "wall_s": time.perf_counter() - wall0,
      "chars_per_s": step * chars_per_step / train_s if train_s else None,
      "final_val_loss": final_val, "final_val_bpc": final_val * LOG2E,
      "best_val_loss": best_val_report, "best_val_bpc": best_val_report * LOG2E,
      "best_step": best_step, "best_checkpoint": str(best_path.relative_to(run_dir)),
      "last_checkpoint": str(Path(manager.path(step)).relative_to(run_dir)),
      "final_train_loss": running_loss(), "eval_windows_final": len(windows_all),
      "reference_val_loss": REFERENCE_VAL_LOSS if on_reference_corpus else None,
  }
  metrics["summary"] = summary
  common.write_json(run_dir / "metrics.json", metrics)
  plot_curves(run_dir / "curves.png", metrics,
              f"char-LM, {args.cell} {args.layers}x{args.hidden}, {args.mode}, "
              f"{step} steps, {train_s / 60:.1f} min",
              eval_windows=len(windows_eval), reference=on_reference_corpus)

  print(f"\n--- sample (best checkpoint, temperature {args.temperature}) ---\n{text[:600]}\n---")
  print(f"{step} steps, {step * chars_per_step:,} chars in {train_s:.1f} s of training "
        f"({summary['chars_per_s']:,.0f} chars/s; evaluation {eval_s:.1f} s)")
  print(f"validation (all {len(windows_all)} windows): last {final_val:.4f} nats/char "
        f"({final_val * LOG2E:.4f} bits), best {best_val_report:.4f} nats/char "
        f"({best_val_report * LOG2E:.4f} bits) at step {best_step}"
        + (f"; PyTorch reference {REFERENCE_VAL_LOSS}" if on_reference_corpus else ""))
  print(f"wrote {run_dir}/: config.json metrics.json curves.png sample.txt checkpoints/")
  return 0


# ------------------------------------------------------------------------------------------------
# Sampling.


def sample(argv) -> int:
  args = sample_parser().parse_args(argv)
  check_sampling(args.temperature, args.top_k, args.length)
  if args.output is not None and args.output.exists():
    raise ExperimentError(f"{args.output} exists; it is never overwritten: choose a new --output")
  model, config, params, file = load_model(args.checkpoint)
  text = generate(make_sampler(model), params, config["vocab"], args.prompt,
                  length=args.length, temperature=args.temperature, top_k=args.top_k,
                  key=jax.random.key(args.seed))
  if args.output is not None:
    try:
      with open(args.output, "x", encoding="utf-8") as fh:
        fh.write(text + "\n")
    except FileExistsError:
      raise ExperimentError(f"{args.output} exists; it is never overwritten") from None
    except OSError as err:
      raise ExperimentError(f"cannot write {args.output}: {err.strerror or err}") from None
    print(f"sampled {args.length} characters from {file} into {args.output}", file=sys.stderr)
  if not args.quiet:
    print(text)
  return 0


def main(argv: Optional[list[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "sample":
    return sample(argv[1:])
  if argv and argv[0] == "train":
    argv = argv[1:]
  return train(argv)


def host_malloc_of(argv: list[str]) -> str:
  """The `--host-malloc` value of a train command line (without parsing the rest of it)."""
  if argv and argv[0] == "sample":
    return "default"
  p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  p.add_argument("--host-malloc", default="default")
  return p.parse_known_args(argv)[0].host_malloc


if __name__ == "__main__":
  mode = host_malloc_of(sys.argv[1:])
  if mode in host_memory.MODES:
    host_memory.relaunch(mode)  # returns at once in the relaunched process
  common.run_main(main)
