"""Occlusion sensitivity (Zeiler & Fergus 2014): the class probability as a grey patch
slides over the image, evaluated in batches of occluded copies."""
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from convjax.viz import layers


def occlusion_map(model, variables, image, class_index: Optional[int] = None, patch: int = 8,
                  stride: int = 4, fill: Optional[float] = None, batch: int = 64):
  """(rows, cols) class probabilities, one per patch position, and the class.

  `image` is one model input (H, W, C); `fill` defaults to the image's mean.
  """
  x = jnp.asarray(image)[None]
  cls = int(layers.resolve_class(model, variables, x, class_index)[0])
  h, w, _ = image.shape
  tops, lefts = np.arange(0, h - patch + 1, stride), np.arange(0, w - patch + 1, stride)
  positions = np.array([(t, l) for t in tops for l in lefts], np.int32)
  value = jnp.mean(x) if fill is None else fill
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]

  @jax.jit
  def probabilities(corners):
    def occlude(corner):
      inside = ((rows >= corner[0]) & (rows < corner[0] + patch) & (cols >= corner[1])
                & (cols < corner[1] + patch))
      return jnp.where(inside[..., None], value, x[0])
    return layers.class_probability(model.apply(variables, jax.vmap(occlude)(corners)), cls)

  padded = np.concatenate([positions, np.zeros((-len(positions) % batch, 2), np.int32)])
  out = np.concatenate([np.asarray(probabilities(padded[i:i + batch])) for i in range(0, len(padded), batch)])
  return out[:len(positions)].reshape(len(tops), len(lefts)), cls
