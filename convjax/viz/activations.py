"""Intermediate activations (read with layers.layer_outputs): every channel of a layer in the notes' grid,
and the dataset images that excite a filter most."""

import jax
import jax.numpy as jnp
import numpy as np

from convjax.viz import layers


def channel_grid(activation, per_row: int = 16) -> np.ndarray:
  """(h, w, c) -> a uint8 grid of its c channels, each standardised as the notes do
  (x - mean) / std * 64 + 128, clipped; constant channels come out flat grey."""
  a = np.asarray(activation, np.float32)
  h, w, c = a.shape
  mean, std = a.mean(axis=(0, 1)), a.std(axis=(0, 1))
  a = (a - mean) / np.where(std > 0, std, 1.0) * 64 + 128
  a = np.clip(a, 0, 255).astype(np.uint8)
  rows = -(-c // per_row)
  grid = np.zeros((rows * h, per_row * w), np.uint8)
  for i in range(c):
    r, col = divmod(i, per_row)
    grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = a[..., i]
  return grid


def top_images(model, variables, images, path, channel: int, k: int = 9, batch: int = 64, prepare=lambda x: x):
  """Indices of the k images (of a uint8 array) with the highest mean activation of `channel`."""
  fn = jax.jit(lambda x: jnp.mean(layers.layer_output(model, variables, prepare(x), path)[..., channel], axis=(1, 2)))
  scores = np.concatenate(
    [np.asarray(fn(jnp.asarray(images[i : i + batch], jnp.float32))) for i in range(0, len(images), batch)]
  )
  order = np.argsort(-scores)[:k]
  return order, scores[order]
