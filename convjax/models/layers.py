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
  """Keras' MaxPooling2D(pool_size) with strides = pool_size and 'valid' padding.

  The windows don't overlap, so it is a max over two axes of a reshape. Its
  gradient is elementwise (on ties it is shared equally, where
  `nn.max_pool`'s select-and-scatter gives it to one input: both are valid
  subgradients), and on CPU it is several times faster than select-and-scatter.
  """
  pool_size: int = 2

  def __call__(self, x):
    k = self.pool_size
    n, h, w, c = x.shape
    h, w = h // k, w // k
    x = x[:, :h * k, :w * k]
    return jnp.max(x.reshape(n, h, k, w, k, c), axis=(2, 4))


class Flatten(Layer):

  def __call__(self, x):
    return jnp.reshape(x, (x.shape[0], -1))
