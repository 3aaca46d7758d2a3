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


def sigmoid(z):
  return 1 / (1 + np.exp(-z))


def lstm_step(p, h, c, x):
  """PyTorch's LSTM equations, gate order i, f, g, o."""
  z = p["U"] @ x + p["b"] + p["W"] @ h + p["bh"]
  i, f, g, o = np.split(z, 4)
  i, f, g, o = sigmoid(i), sigmoid(f), np.tanh(g), sigmoid(o)
  c = f * c + i * g
  return o * np.tanh(c), c


def gru_step(p, h, x):
  """PyTorch's GRU equations, gate order r, z, n."""
  xr, xz, xn = np.split(p["U"] @ x + p["b"], 3)
  hr, hz, hn = np.split(p["W"] @ h + p["bh"], 3)
  r, z = sigmoid(xr + hr), sigmoid(xz + hz)
  n = np.tanh(xn + r * hn)
  return (1 - z) * n + z * h


def cell_loop(name, params, xs, h0=None, c0=None):
  """Run one cell over xs [T, D] in float64; returns hs [T, H] and the final (h, c)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  hidden = p["W"].shape[1]
  h = np.zeros(hidden) if h0 is None else np.asarray(h0, np.float64)
  c = np.zeros(hidden) if c0 is None else np.asarray(c0, np.float64)
  hs = []
  for x in np.asarray(xs, np.float64):
    if name == "lstm":
      h, c = lstm_step(p, h, c, x)
    elif name == "gru":
      h = gru_step(p, h, x)
    else:
      h = F[name](p["U"] @ x + p["b"] + p["W"] @ h + p.get("bh", 0))
    hs.append(h)
  return np.stack(hs), (h, c)
