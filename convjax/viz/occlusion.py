"""Occlusion sensitivity (Zeiler & Fergus 2014): the class probability (and score) as a
grey patch slides over the image, evaluated in batches of occluded copies; and feature
ablation over a grid of segments (captum's FeatureAblation), batched over images."""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from convjax.viz import layers


class Occlusion(NamedTuple):
  probability: np.ndarray  # (rows, cols): the class probability with the patch at each position
  score: np.ndarray  # (rows, cols): the class score (layers.class_score), which a confident
  # model's saturated probability hides
  class_index: int


def occlusion_map(
  model,
  variables,
  image,
  class_index: Optional[int] = None,
  patch: int = 8,
  stride: int = 4,
  fill: Optional[float] = None,
  batch: int = 64,
) -> Occlusion:
  """The class's probability and score for each patch position (row-major over the image):
  every `stride` pixels with the whole patch inside, (H - patch) // stride + 1 per side
  (with a stride that doesn't divide H - patch, the last few rows and columns are never
  covered).

  `image` is one model input (H, W, C); `fill` defaults to the image's mean.
  """
  if not 1 <= patch <= min(image.shape[:2]) or stride < 1:
    raise ValueError(
      f"occlusion patch {patch} / stride {stride} for a {image.shape[0]}x{image.shape[1]} "
      "image: need 1 <= patch <= side and stride >= 1"
    )
  x = jnp.asarray(image)[None]
  cls = int(layers.resolve_class(model, variables, x, class_index)[0])
  h, w, _ = image.shape
  tops, lefts = np.arange(0, h - patch + 1, stride), np.arange(0, w - patch + 1, stride)
  positions = np.array([(t, l) for t in tops for l in lefts], np.int32)
  value = jnp.mean(x) if fill is None else fill
  rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]

  @jax.jit
  def evaluate(corners):
    def occlude(corner):
      inside = (rows >= corner[0]) & (rows < corner[0] + patch) & (cols >= corner[1]) & (cols < corner[1] + patch)
      return jnp.where(inside[..., None], value, x[0])

    logits = model.apply(variables, jax.vmap(occlude)(corners))
    return jnp.stack([layers.class_probability(logits, cls), layers.class_score(logits, cls)])

  padded = np.concatenate([positions, np.zeros((-len(positions) % batch, 2), np.int32)])
  out = np.concatenate([np.asarray(evaluate(padded[i : i + batch])) for i in range(0, len(padded), batch)], axis=1)
  probability, score = out[:, : len(positions)].reshape(2, len(tops), len(lefts))
  return Occlusion(probability, score, cls)


def grid_segments(height: int, width: int, patch: int):
  """(H, W) int segment ids: a grid of patch x patch squares over the whole image (the last
  row and column of squares cut by the border), row-major."""
  rows, cols = np.arange(height) // patch, np.arange(width) // patch
  return (rows[:, None] * (-(-width // patch)) + cols[None, :]).astype(np.int32)


def feature_ablation(model, variables, x, class_index=None, patch: int = 4, baseline=0.0, batch: int = 16):
  """captum's FeatureAblation over grid segments (`grid_segments`): each pixel's attribution
  is score(x) - score(x with its segment set to `baseline`), the same for every channel;
  batched over images (N, H, W, C) and jittable: segments run `batch` at a time (lax.map)."""
  classes = layers.resolve_class(model, variables, x, class_index)
  segments = grid_segments(x.shape[1], x.shape[2], patch)
  count = int(segments.max()) + 1  # numpy: known while tracing
  base = jnp.broadcast_to(jnp.asarray(baseline, x.dtype), x.shape)
  score = layers.class_score(model.apply(variables, x), classes)

  def drop(segment):  # (N,): the class score with `segment` set to the baseline
    inside = (segments == segment)[None, :, :, None]
    return layers.class_score(model.apply(variables, jnp.where(inside, base, x)), classes)

  ids = jnp.arange(-(-count // batch) * batch).reshape(-1, batch)  # ids >= count change nothing
  dropped = jax.lax.map(jax.vmap(drop), ids).reshape(-1, x.shape[0])[:count]  # (count, N)
  per_segment = score[None, :] - dropped
  return jnp.broadcast_to(per_segment.T[:, segments][..., None], x.shape)
