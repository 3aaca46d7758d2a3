"""Plain NumPy references, written from the equations, independent of the library's code."""
import numpy as np

F = {
    "tanh": np.tanh,
    "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
    "relu": lambda z: np.maximum(z, 0),
}


def softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


G = {"identity": lambda z: z, "sigmoid": F["sigmoid"], "softmax": softmax}


def elman_loop(params, xs, h0=None, f="tanh", g="identity"):
  """h_t = f(U x_t + W h_{t-1} + b), o_t = g(V h_t + c), for one sequence xs [T, D]."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  h = np.zeros(p["W"].shape[0]) if h0 is None else np.asarray(h0, np.float64)
  hs, os = [], []
  for x in np.asarray(xs, np.float64):
    h = F[f](p["U"] @ x + p["W"] @ h + p["b"])
    hs.append(h)
    os.append(G[g](p["V"] @ h + p["c"]))
  return np.stack(hs), np.stack(os)
