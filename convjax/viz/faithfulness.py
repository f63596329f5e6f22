"""How faithful a map is to the model: deletion and insertion curves (Petsiuk et al. 2018).

Deletion replaces the pixels of an image by a baseline in the order of the map, most
relevant first, and follows the class probability: a faithful map makes it fall fast (a
low area under the curve). Insertion starts from the baseline and reveals the pixels in
the same order: a faithful map makes the probability rise fast (a high area). Both are
batched over images and jittable; each point of a curve is one forward pass of the batch.
"""

import jax
import jax.numpy as jnp

from convjax.viz import cam, layers

MODES = ("deletion", "insertion")


def pixel_ranks(maps):
  """(N, H, W) -> the rank of each pixel in its map, 0 for the most relevant (ties in
  row-major order, so the result is deterministic)."""
  n = maps.shape[0]
  order = jnp.argsort(-maps.reshape(n, -1), axis=1, stable=True)
  return jnp.argsort(order, axis=1).reshape(maps.shape)


def curve(model, variables, x, maps, classes, mode: str = "deletion", steps: int = 32, baseline=None):
  """(area under the curve (N,), the curve (N, steps + 1)): the probability of `classes` with
  0, 1/steps, ..., all of the pixels of x (N, H, W, C) deleted (replaced by `baseline`,
  default zeros) or inserted (into `baseline`), in the order of `maps` (N, h, w; upsampled
  to x's size as Score-CAM does where h, w differ, e.g. a CAM at its layer's resolution).
  The area is the trapezoid rule over the fraction of pixels, from 0 to 1."""
  if mode not in MODES:
    raise ValueError(f"unknown faithfulness curve {mode!r}; valid: {', '.join(MODES)}")
  if maps.shape[1:] != x.shape[1:3]:
    maps = cam.upsample_aligned(maps[..., None], x.shape[1:3])[..., 0]
  base = jnp.zeros_like(x) if baseline is None else jnp.broadcast_to(baseline, x.shape)
  ranks = pixel_ranks(maps)[..., None]
  pixels = maps.shape[1] * maps.shape[2]
  counts = jnp.round(jnp.linspace(0, pixels, steps + 1)).astype(jnp.int32)

  def probability(count):
    changed = ranks < count
    image = jnp.where(changed, base, x) if mode == "deletion" else jnp.where(changed, x, base)
    return layers.class_probability(model.apply(variables, image), classes)

  points = jax.lax.map(probability, counts).T  # (N, steps + 1)
  return (points[:, :-1] + points[:, 1:]).sum(1) / (2 * steps), points
