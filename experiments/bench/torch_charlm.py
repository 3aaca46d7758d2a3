"""PyTorch reference character-level language model: the baseline jaxrnn's char-LM is held against.

Model: `nn.Embedding(V, 64) -> nn.LSTM(64, 256, batch_first) -> nn.Linear(256, V)`, one layer,
float32, `V` the distinct characters of the whole text (65 for Tiny Shakespeare).

Training: batches of 32 windows of 128 characters drawn uniformly at random from the first 90% of
the text (inputs `text[s:s+128]`, targets `text[s+1:s+129]`), zero initial state per window, loss
the mean cross-entropy per character, Adam(lr 2e-3), gradients clipped to global norm 5, PyTorch
on `--threads` (2) intra-op threads. It trains for `--minutes` of training time (evaluation time is
not counted, and is reported separately).

Validation: the last 10% of the text cut into consecutive non-overlapping 128-character windows
(each from a zero state, as in training), mean cross-entropy in nats per character over every
predicted character; evaluated every `--eval-every` steps and at the end.

Usage (from the repository root):
  python experiments/bench/torch_charlm.py --minutes 10 --json runs/torch_charlm.json
  python experiments/bench/torch_charlm.py --minutes 0.5           # a smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA_CANDIDATES = (
    os.path.join(REPO_ROOT, "experiments", "data", "tinyshakespeare.txt"),
    os.path.join(REPO_ROOT, "..", "shared", "data", "tinyshakespeare.txt"),
)


def default_data_path() -> str:
  """experiments/data/tinyshakespeare.txt if the repo ships it, else ../shared/data/."""
  for path in DATA_CANDIDATES:
    if os.path.exists(path):
      return os.path.normpath(path)
  return os.path.normpath(DATA_CANDIDATES[-1])


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  p.add_argument("--data", default=None, help="text file (default: %s)" % default_data_path())
  p.add_argument("--minutes", type=float, default=10.0, help="training time budget (10)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq", type=int, default=128, help="window length in characters")
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--embed", type=int, default=64)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--clip", type=float, default=5.0, help="global gradient-norm clip")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--eval-every", type=int, default=200, help="steps between validations")
  p.add_argument("--log-every", type=int, default=50, help="steps between training-loss lines")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=os.path.join(REPO_ROOT, "runs", "torch_charlm.json"),
                 help="where to write the curve (default runs/torch_charlm.json)")
  return p.parse_args(argv)


class CharLSTM(torch.nn.Module):
  """Embedding -> 1-layer LSTM -> linear logits over the vocabulary."""

  def __init__(self, vocab: int, embed: int, hidden: int):
    super().__init__()
    self.embed = torch.nn.Embedding(vocab, embed)
    self.lstm = torch.nn.LSTM(embed, hidden, batch_first=True)
    self.readout = torch.nn.Linear(hidden, vocab)

  def forward(self, ids: torch.Tensor) -> torch.Tensor:
    """`ids [B, T]` int64 -> logits `[B, T, V]`."""
    hs, _ = self.lstm(self.embed(ids))
    return self.readout(hs)


def load_text(path: str) -> tuple[np.ndarray, list[str]]:
  """The text as int64 ids `[N]` and the sorted vocabulary."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  vocab = sorted(set(text))
  index = {ch: i for i, ch in enumerate(vocab)}
  return np.fromiter((index[ch] for ch in text), dtype=np.int64, count=len(text)), vocab


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (Linux), else `platform.processor()`."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


@torch.no_grad()
def evaluate(model: CharLSTM, val: np.ndarray, seq: int, batch: int) -> float:
  """Mean cross-entropy (nats/char) over consecutive non-overlapping windows of `val`."""
  model.eval()
  n_windows = (len(val) - 1) // seq
  xs = torch.from_numpy(val[:n_windows * seq].reshape(n_windows, seq))
  ys = torch.from_numpy(val[1:n_windows * seq + 1].reshape(n_windows, seq))
  total, count = 0.0, 0
  for i in range(0, n_windows, batch):
    logits = model(xs[i:i + batch])
    total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys[i:i + batch].reshape(-1),
                             reduction="sum").item()
    count += ys[i:i + batch].numel()
  model.train()
  return total / count


def main(argv=None) -> None:
  args = parse_args(argv)
  torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  rng = np.random.default_rng(args.seed)
  path = args.data or default_data_path()
  ids, vocab = load_text(path)
  split = int(0.9 * len(ids))
  train, val = ids[:split], ids[split:]
  model = CharLSTM(len(vocab), args.embed, args.hidden)
  optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
  n_params = sum(p.numel() for p in model.parameters())
  print(f"data {path}: {len(ids):,} chars, vocab {len(vocab)}, train {len(train):,}, "
        f"val {len(val):,}; model {n_params:,} params; {args.threads} threads", flush=True)

  budget = 60.0 * args.minutes
  train_s = eval_s = 0.0
  curve, recent = [], []
  best = math.inf
  step = 0

  def validate():
    nonlocal eval_s, best
    start = time.perf_counter()
    val_loss = evaluate(model, val, args.seq, args.batch)
    eval_s += time.perf_counter() - start
    best = min(best, val_loss)
    train_loss = float(np.mean(recent)) if recent else None
    curve.append({"step": step, "train_s": train_s, "chars_seen": step * args.batch * args.seq,
                  "train_loss": train_loss, "val_loss": val_loss})
    print(f"step {step:6d}  train {train_s:7.1f} s  train loss "
          f"{train_loss if train_loss is not None else float('nan'):.4f}  val {val_loss:.4f} "
          f"nats/char (best {best:.4f}; eval {eval_s:.1f} s)", flush=True)

  validate()
  while train_s < budget:
    start = time.perf_counter()
    starts = rng.integers(0, len(train) - args.seq - 1, size=args.batch)
    window = np.stack([train[s:s + args.seq + 1] for s in starts])
    xs, ys = torch.from_numpy(window[:, :-1]), torch.from_numpy(window[:, 1:])
    logits = model(xs)
    loss = F.cross_entropy(logits.reshape(-1, len(vocab)), ys.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    optimizer.step()
    value = loss.item()
    train_s += time.perf_counter() - start
    step += 1
    recent = (recent + [value])[-args.log_every:]
    if step % args.log_every == 0 and step % args.eval_every:
      print(f"step {step:6d}  train {train_s:7.1f} s  train loss {np.mean(recent):.4f}  "
            f"({step * args.batch * args.seq / train_s:,.0f} chars/s)", flush=True)
    if step % args.eval_every == 0:
      validate()
  if not curve or curve[-1]["step"] != step:
    validate()

  result = {
      "model": "torch nn.Embedding(V,%d) + nn.LSTM(%d,%d) + nn.Linear" % (args.embed, args.embed,
                                                                       args.hidden),
      "config": vars(args) | {"data": path, "vocab": len(vocab), "params": n_params},
      "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                  "torch": torch.__version__, "threads": torch.get_num_threads()},
      "steps": step,
      "train_s": train_s,
      "eval_s": eval_s,
      "chars_per_s": step * args.batch * args.seq / train_s if train_s else None,
      "best_val_loss": best,
      "final_val_loss": curve[-1]["val_loss"],
      "curve": curve,
  }
  print(f"done: {step} steps in {train_s:.1f} s of training ({result['chars_per_s']:,.0f} "
        f"chars/s); best val loss {best:.4f} nats/char, final {result['final_val_loss']:.4f}")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
