"""First experiment: an Elman RNN learns next-step prediction of noisy sine mixtures.

Run: python experiments/sine.py [--steps 1500] [--hidden 64] [--seed 0]
Trains with Adam on the manual BPTT path and prints the loss falling; takes ~10 s on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import optax

import jaxrnn
from jaxrnn import elman


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--hidden", type=int, default=64)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.steps < 1 or args.hidden < 1 or args.batch < 1 or args.length < 1:
    parser.error("--steps, --hidden, --batch and --length must be positive")

  key = jax.random.key(args.seed)
  k_init, k_data, k_test = jax.random.split(key, 3)
  params = elman.init(k_init, 1, args.hidden, 1)
  optimizer = optax.adam(args.lr)
  opt_state = optimizer.init(params)
  step = elman.make_train_step(optimizer, f="tanh", loss="mse")
  # The seed's loss sums over time; report it per step so the numbers read as an MSE.
  per_step = lambda loss: float(loss) / args.length * 2

  xs_test, ys_test = jaxrnn.data.noisy_sines(k_test, 256, args.length)
  baseline = per_step(elman.loss({**params, "V": 0 * params["V"], "c": 0 * params["c"]},
                                 xs_test, ys_test))
  print(f"jaxrnn {jaxrnn.__version__} on {jax.devices()[0].platform}: Elman tanh, H={args.hidden}, "
        f"B={args.batch}, T={args.length}, Adam lr={args.lr}")
  print(f"predict-zero baseline test MSE: {baseline:.4f}")
  start = time.perf_counter()
  for i in range(1, args.steps + 1):
    xs, ys = jaxrnn.data.noisy_sines(jax.random.fold_in(k_data, i), args.batch, args.length)
    params, opt_state, metrics = step(params, opt_state, xs, ys)
    if i == 1 or i % max(1, args.steps // 10) == 0:
      print(f"step {i:5d}  train MSE {per_step(metrics['loss']):.5f}  "
            f"|grad| {float(metrics['grad_norm']):.3f}  ({time.perf_counter() - start:.1f} s)",
            flush=True)
  test = per_step(elman.loss(params, xs_test, ys_test))
  print(f"test MSE {test:.5f} (baseline {baseline:.4f}, {baseline / test:.0f}x lower) "
        f"in {time.perf_counter() - start:.1f} s")
  return 0 if test < baseline else 1


if __name__ == "__main__":
  sys.exit(main())
