"""jaxrnn: recurrent neural networks as pure JAX functions, with hand-written BPTT.

Modules:
  cells     the recurrences (Elman, LSTM, GRU) behind one `Cell` interface
  scan      unrolling a cell in time with `lax.scan`
  backward  the manual BPTT engine and its `jax.custom_vjp`
  kernels   native CPU loops for the Elman cell, LSTM and GRU (C++ via the XLA FFI), used by `rnn`
            on CPU
  elman     the seed's Elman network: init / step / forward / loss / manual_value_and_grad
  losses    per-step losses and their hand-derived gradients
  train     jitted Optax training steps
  host_memory  opt-in huge pages for XLA's per-step CPU buffers (fewer page faults)
"""
from jaxrnn import (activations, backward, cells, checkpoint, data, elman, host_memory, interop,
                    kernels, loop, losses, parallel, parallel_scan, rnn, scan, tbptt, train)
from jaxrnn.cells import Cell, elman as elman_cell, gru, lstm, mingru
from jaxrnn.train import make_train_step

__version__ = "0.1.0"

__all__ = [
    "Cell", "activations", "backward", "cells", "checkpoint", "data", "elman", "elman_cell", "gru",
    "host_memory", "interop", "kernels", "loop", "losses", "lstm", "make_train_step",
    "mingru", "parallel", "parallel_scan", "rnn", "scan", "tbptt", "train",
]
