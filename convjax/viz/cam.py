"""Grad-CAM (Selvaraju et al. 2017) and Grad-CAM++ (Chattopadhyay et al. 2018).

For a conv layer's output A (h, w, K) and a class score y: Grad-CAM weights
channel k by the spatial mean of dy/dA_k and keeps the positive part of the
weighted sum of channels; Grad-CAM++ weights by alpha-weighted positive
gradients. Both are normalised to [0, 1] per image (all-zero when nothing is
positive). `superimpose` colours the map (jet) over the image, as the notes do.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from convjax.viz import layers


def grad_cam(model, variables, x, layer: tuple, class_index: Optional[int] = None, plus_plus: bool = False):
  """Heatmaps (N, h, w) in [0, 1] at `layer`'s resolution, and the classes they explain."""
  classes = layers.resolve_class(model, variables, x, class_index)
  activations = layers.layer_output(model, variables, x, layer)

  def total_score(a):
    return jnp.sum(layers.class_score(layers.logits_given(model, variables, x, layer, a), classes))

  grads = jax.grad(total_score)(activations)
  if plus_plus:
    # With y = exp(score), the alphas reduce to first-derivative powers (paper eq. 19).
    g2, g3 = grads**2, grads**3
    denominator = 2 * g2 + jnp.sum(activations, axis=(1, 2), keepdims=True) * g3
    alpha = jnp.where(denominator != 0, g2 / jnp.where(denominator != 0, denominator, 1.0), 0.0)
    weights = jnp.sum(alpha * jax.nn.relu(grads), axis=(1, 2))
  else:
    weights = jnp.mean(grads, axis=(1, 2))
  cam = jax.nn.relu(jnp.einsum("nhwk,nk->nhw", activations, weights))
  return layers.normalise(cam, axis=(1, 2)), classes


def superimpose(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
  """uint8 image (H, W, 3) plus the heatmap, resized bilinearly and coloured jet, times alpha
  (the notes' `jet_heatmap * 0.4 + img`, clipped to 255)."""
  import matplotlib
  from convjax.data.preprocess import resize_bilinear

  h, w = image.shape[:2]
  resized = np.clip(resize_bilinear(np.asarray(heatmap, np.float32)[..., None], (h, w))[..., 0], 0, 1)
  coloured = matplotlib.colormaps["jet"](resized)[..., :3] * 255
  base = np.repeat(image, 3, -1) if image.shape[-1] == 1 else image
  return np.clip(coloured * alpha + base.astype(np.float32), 0, 255).astype(np.uint8)
