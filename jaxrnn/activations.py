"""Hidden activations `f` with their derivatives, and output activations `g`.

Every hidden activation here has a derivative that can be written from its *output* alone, which is
what the manual backward passes rely on: they keep `h_t = f(z_t)` and never `z_t`.

  tanh:    f'(z) = 1 - h^2
  sigmoid: f'(z) = h (1 - h)
  relu:    f'(z) = 1[h > 0]
"""
from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp

from jaxrnn._checks import check_choice

HiddenName = Literal["tanh", "sigmoid", "relu"]
OutputName = Literal["identity", "sigmoid", "softmax"]


class Activation(NamedTuple):
  """`fn(z) -> h` and `grad_from_output(h) -> dh/dz`, both elementwise."""
  fn: Callable[[jax.Array], jax.Array]
  grad_from_output: Callable[[jax.Array], jax.Array]


HIDDEN: dict[str, Activation] = {
    "tanh": Activation(jnp.tanh, lambda h: 1 - h * h),
    "sigmoid": Activation(jax.nn.sigmoid, lambda h: h * (1 - h)),
    "relu": Activation(jax.nn.relu, lambda h: (h > 0).astype(h.dtype)),
}

OUTPUT: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda z: z,
    "sigmoid": jax.nn.sigmoid,
    "softmax": lambda z: jax.nn.softmax(z, axis=-1),
}


def hidden(name: str, arg: str = "f") -> Activation:
  """Look up a hidden activation by name, raising a ValueError that lists the valid names."""
  return HIDDEN[check_choice(arg, name, HIDDEN)]


def output(name: str, arg: str = "g") -> Callable[[jax.Array], jax.Array]:
  """Look up an output activation by name, raising a ValueError that lists the valid names."""
  return OUTPUT[check_choice(arg, name, OUTPUT)]
