"""The recurrent matmul's precision: float32 vs bfloat16 operands with float32 accumulation.

A bare `lax.scan` of `h_t = tanh((a_t + h_{t-1} W^T)[:, :H])` (the per-step GEMM `[B, H] x [H, G]`
and one element-wise pass) at three sizes, median of 7 timings of the jitted scan. On a CPU with
AVX512-BF16 the bfloat16 GEMM can run at up to twice the float32 rate (experiments/PERF_NOTES.md).

Run: python experiments/bench/gemm_precision.py
"""
from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

SIZES = ((32, 128, 512, 100), (32, 256, 1024, 128), (64, 512, 2048, 50))  # (B, H, G, T)


def median_ms(f, *args, n=30, repeats=7):
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(n):
      out = f(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / n)
  return 1e3 * statistics.median(times)


def scan_fn(dtype, h_size):
  """`(W^T [H, G], a [T, B, G], h0 [B, H]) -> hs [T, B, H]` with the GEMM's operands in `dtype`."""
  def run(w_t, a, h0):
    w_c = w_t.astype(dtype)

    def body(h, a_t):
      z = a_t + jnp.dot(h.astype(dtype), w_c, preferred_element_type=jnp.float32)
      h = jnp.tanh(z[:, :h_size])
      return h, h

    return jax.lax.scan(body, h0, a)[1]
  return jax.jit(run)


def main():
  for b, h, g, t in SIZES:
    k = jax.random.split(jax.random.key(0), 2)
    w_t = 0.05 * jax.random.normal(k[0], (h, g))
    a = jax.random.normal(k[1], (t, b, g))
    h0 = jnp.zeros((b, h))
    f32 = median_ms(scan_fn(jnp.float32, h), w_t, a, h0)
    bf16 = median_ms(scan_fn(jnp.bfloat16, h), w_t, a, h0)
    print(f"B={b} H={h} G={g} T={t}: float32 {1e3 * f32 / t:.1f} us/step, "
          f"bfloat16 operands {1e3 * bf16 / t:.1f} us/step ({f32 / bf16:.2f}x)")


if __name__ == "__main__":
  main()
