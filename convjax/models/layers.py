"""Keras-shaped Linen layers.

Each layer owns its activation, so a captured intermediate is what Keras shows
for that layer (post-ReLU), and parameters sit at `<layer>/kernel`,
`<layer>/bias` exactly as in a Keras HDF5 file.
"""
from typing import Callable, Optional

import flax.linen as nn
import jax.numpy as jnp


class Conv2D(nn.Conv):
  """`nn.Conv` with Keras defaults: 'VALID' padding and a fused activation."""
  padding: str = "VALID"
  activation: Optional[Callable] = None

  def __call__(self, x):
    y = super().__call__(x)
    return y if self.activation is None else self.activation(y)


class Dense(nn.Dense):
  """`nn.Dense` with a fused activation."""
  activation: Optional[Callable] = None

  def __call__(self, x):
    y = super().__call__(x)
    return y if self.activation is None else self.activation(y)


class Layer(nn.Module):
  """Marks a parameter-free module as one row of a model summary."""


class MaxPooling2D(Layer):
  pool_size: int = 2

  def __call__(self, x):
    p = (self.pool_size, self.pool_size)
    return nn.max_pool(x, p, strides=p, padding="VALID")


class Flatten(Layer):

  def __call__(self, x):
    return jnp.reshape(x, (x.shape[0], -1))
