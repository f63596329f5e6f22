"""The CAM family: class activation maps of one conv layer, batched and jittable.

For a layer's output A (N, h, w, K) and a class score y (the logit; see layers.class_score):

- Grad-CAM (Selvaraju et al. 2017): relu(sum_k mean_hw(dy/dA_k) A_k).
- Grad-CAM++ (Chattopadhyay et al. 2018): alpha-weighted positive gradients as the weights.
- XGrad-CAM (Fu et al. 2020): weights sum_hw(dy/dA_k A_k) / sum_hw(A_k).
- HiResCAM (Draelos & Carin 2020): relu(sum_k dy/dA_k * A_k), element-wise: no averaging.
- LayerCAM (Jiang et al. 2021): relu(sum_k relu(dy/dA_k) * A_k).
- Eigen-CAM (Muhammad & Yeasin 2020): A (hw, K), centred over positions, projected on its
  first right singular vector; EigenGrad-CAM the same of dy/dA * A. The singular vector's
  sign is arbitrary: it is chosen so that the map correlates positively with sum_k A_k
  (pytorch-grad-cam keeps whatever LAPACK returns).
- Score-CAM (Wang et al. 2020): each channel, upsampled to the input (bilinear, corners
  aligned, as pytorch-grad-cam) and min-max scaled, masks the input; the softmax over
  channels of the masked inputs' class scores weighs the channels.
- Ablation-CAM (Desai & Ramaswamy 2020): weights (y - y_without_k) / y, with channel k of
  the layer set to zero.
- Guided Grad-CAM: guided backprop times the Grad-CAM map, min-max scaled, at the input's size.
- Fused over layers (`fused`; LayerCAM's use of several layers, Jiang et al. 2021): each
  layer's map min-max scaled and resized to the input, their mean min-max scaled, as
  pytorch-grad-cam fuses its target layers (the paper takes the maximum of tanh-scaled maps).

Every map is kept positive and normalised to [0, 1] per image (all-zero when nothing is
positive). `superimpose` colours a map (jet) over the image, as the notes do.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from convjax.viz import layers


GRADIENT_CAMS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigengradcam")
CAMS = (*GRADIENT_CAMS, "eigencam", "scorecam", "ablationcam")


def grad_cam(model, variables, x, layer: tuple, class_index: Optional[int] = None, plus_plus: bool = False):
  """Heatmaps (N, h, w) in [0, 1] at `layer`'s resolution, and the classes they explain."""
  return cam(model, variables, x, layer, "gradcam++" if plus_plus else "gradcam", class_index)


def cam(model, variables, x, layer: tuple, method: str = "gradcam", class_index=None, channel_batch: int = 16):
  """Maps (N, h, w) in [0, 1] of CAM `method` (one of CAMS) at `layer`, and the classes they
  explain (class_index: an int, (N,) ints, or None for the predicted classes). Score-CAM and
  Ablation-CAM run the model once per channel of the layer, `channel_batch` channels at a time."""
  if method not in CAMS:
    raise ValueError(f"unknown CAM method {method!r}; valid: {', '.join(CAMS)}")
  if method in GRADIENT_CAMS:
    outputs, grads, classes = _gradients(model, variables, x, [layer], class_index)
    return _from_gradients(method, grads[tuple(layer)], outputs[tuple(layer)]), classes
  classes = layers.resolve_class(model, variables, x, class_index)
  activations = layers.layer_output(model, variables, x, layer)
  if method == "eigencam":
    return _eigen(activations, activations), classes
  if method == "scorecam":
    return _score_cam(model, variables, x, classes, activations, channel_batch), classes

  def score_with(a):  # the class score with the layer's output a instead
    return layers.class_score(layers.shifted_logits(model, variables, x, {tuple(layer): a - activations})[0], classes)

  return _ablation_cam(score_with, activations, channel_batch), classes


def _gradients(model, variables, x, paths, class_index):
  """({path: the layer's output}, {path: the class score's gradient there}, the classes)
  from one forward and one backward pass (layers.shifted_logits), the predicted classes
  read off the same forward pass, as pytorch-grad-cam's hooks give them."""
  paths = [tuple(p) for p in paths]
  shapes = jax.eval_shape(lambda: layers.layer_outputs(model, variables, x, paths))
  zeros = {p: jnp.zeros(shapes[p].shape, shapes[p].dtype) for p in paths}
  logits, backward, outputs = jax.vjp(lambda s: layers.shifted_logits(model, variables, x, s), zeros, has_aux=True)
  classes = (
    layers.predicted_class(logits) if class_index is None else layers.resolve_class(model, variables, x, class_index)
  )
  (grads,) = backward(jax.grad(lambda z: jnp.sum(layers.class_score(z, classes)))(logits))
  return outputs, grads, classes


def _from_gradients(method: str, grads, activations):
  """The map of a CAM of GRADIENT_CAMS from the layer's output and the score's gradient there."""
  if method == "eigengradcam":
    return _eigen(grads * activations, activations)
  if method == "hirescam":
    return _positive(jnp.sum(grads * activations, -1))
  if method == "layercam":
    return _positive(jnp.sum(jax.nn.relu(grads) * activations, -1))
  if method == "gradcam++":
    # With y = exp(score), the alphas reduce to first-derivative powers (paper eq. 19); the
    # 1e-6 in the denominator is pytorch-grad-cam's (it moves maps of tiny gradients by ~1e-3).
    g2, g3 = grads**2, grads**3
    denominator = 2 * g2 + jnp.sum(activations, axis=(1, 2), keepdims=True) * g3 + 1e-6
    alpha = jnp.where(grads != 0, g2 / denominator, 0.0)
    weights = jnp.sum(alpha * jax.nn.relu(grads), axis=(1, 2))
  elif method == "xgradcam":
    total = jnp.sum(activations, axis=(1, 2))
    weights = jnp.sum(grads * activations, axis=(1, 2)) / jnp.where(total != 0, total, 1.0)
  else:
    weights = jnp.mean(grads, axis=(1, 2))
  return _weighted(activations, weights)


def guided_grad_cam(model, variables, x, layer: tuple, class_index=None):
  """Guided Grad-CAM (Selvaraju et al. 2017), as pytorch-grad-cam composes it: guided
  backprop (N, H, W, C) times the Grad-CAM map min-max scaled, resized to the input
  (bilinear, half-pixel centres, as cv2.resize) and min-max scaled again; and the classes
  they explain."""
  from convjax.viz import saliency

  maps, classes = cam(model, variables, x, layer, "gradcam", class_index)
  resized = _min_max(jax.image.resize(_min_max(maps), (maps.shape[0], *x.shape[1:3]), "bilinear"))
  return saliency.guided_backprop(model, variables, x, classes) * resized[..., None], classes


def fused(model, variables, x, layer_list, method: str = "layercam", class_index=None):
  """Maps (N, H, W) at the input's size of CAM `method` over the layers in `layer_list`:
  each layer's map min-max scaled, resized to the input (bilinear, half-pixel centres, as
  cv2.resize), then their mean min-max scaled (pytorch-grad-cam's multi-layer CAM); and the
  classes they explain. A gradient CAM's layers come from one forward and one backward pass,
  as pytorch-grad-cam's hooks give them."""
  if method in GRADIENT_CAMS:  # every layer's output and gradient, and the predicted classes, from one pass
    outputs, grads, classes = _gradients(model, variables, x, layer_list, class_index)
    maps = [_from_gradients(method, grads[tuple(p)], outputs[tuple(p)]) for p in layer_list]
  else:
    classes = layers.resolve_class(model, variables, x, class_index)
    maps = [cam(model, variables, x, layer, method, classes)[0] for layer in layer_list]
  resized = [jax.image.resize(_min_max(m), (x.shape[0], *x.shape[1:3]), "bilinear") for m in maps]
  return _min_max(jnp.mean(jnp.stack(resized), 0)), classes


def _min_max(m):
  """pytorch-grad-cam's scale_cam_image: (m - min) / (max - min + 1e-7) per map."""
  low = jnp.min(m, axis=(1, 2), keepdims=True)
  return (m - low) / (jnp.max(m, axis=(1, 2), keepdims=True) - low + 1e-7)


def _positive(m):
  return layers.normalise(jax.nn.relu(m), axis=(1, 2))


def _weighted(activations, weights):
  """relu(sum_k weights_k A_k), normalised."""
  return _positive(jnp.einsum("nhwk,nk->nhw", activations, weights))


def _eigen(values, activations):
  """The projection of `values` (N, h, w, K), centred over positions, on their first right
  singular vector, signed to correlate positively with sum_k activations_k."""
  n, h, w, k = values.shape
  flat = values.reshape(n, h * w, k)
  centred = flat - jnp.mean(flat, axis=1, keepdims=True)
  # The first singular pair from the eigenvectors of the smaller Gram matrix: XLA:CPU's
  # batched SVD of 16 (225, 128) maps takes ~4x as long as eigh of their (128, 128) Grams.
  if h * w < k:  # centred = U S V^T: its projection on v1 is s1 u1, u1 the Gram C C^T's first
    eigenvalues, vectors = jnp.linalg.eigh(jnp.einsum("npk,nqk->npq", centred, centred))
    projection = vectors[..., -1] * jnp.sqrt(jnp.maximum(eigenvalues[:, -1:], 0.0))
  else:
    first = jnp.linalg.eigh(jnp.einsum("npk,npl->nkl", centred, centred))[1][..., -1]  # (N, K)
    projection = jnp.einsum("npk,nk->np", centred, first)
  total = jnp.sum(activations.reshape(n, h * w, k), -1)
  sign = jnp.where(jnp.sum(projection * (total - jnp.mean(total, 1, keepdims=True)), 1) < 0, -1.0, 1.0)
  return _positive((projection * sign[:, None]).reshape(n, h, w))


def upsample_aligned(maps, size):
  """Bilinear upsampling of (N, h, w, K) to (N, *size, K) with corners aligned (torch's
  UpsamplingBilinear2d, which Score-CAM's reference implementation uses)."""

  def matrix(out, inp):
    if inp == 1 or out == 1:
      return jnp.ones((out, inp)) / inp
    source = jnp.arange(out) * (inp - 1) / (out - 1)
    return jax.nn.relu(1 - jnp.abs(source[:, None] - jnp.arange(inp)[None, :]))

  return jnp.einsum("Hh,nhwk,Ww->nHWk", matrix(size[0], maps.shape[1]), maps, matrix(size[1], maps.shape[2]))


def _channel_chunks(k: int, channel_batch: int):
  return [jnp.arange(start, min(start + channel_batch, k)) for start in range(0, k, channel_batch)]


def _score_cam(model, variables, x, classes, activations, channel_batch):
  up = upsample_aligned(activations, x.shape[1:3])
  low, high = jnp.min(up, axis=(1, 2), keepdims=True), jnp.max(up, axis=(1, 2), keepdims=True)
  masks = (up - low) / (high - low + 1e-8)  # (N, H, W, K)

  def scores(channels):  # (N, len(channels)): the class score of x masked by each channel
    masked = jnp.einsum("nhwc,nhwk->knhwc", x, masks[..., channels])
    logits = jax.vmap(lambda xi: model.apply(variables, xi))(masked)
    return jax.vmap(lambda lg: layers.class_score(lg, classes))(logits).T

  weights = jax.nn.softmax(jnp.concatenate([scores(c) for c in _channel_chunks(masks.shape[-1], channel_batch)], 1))
  return _weighted(activations, weights)


def _ablation_cam(score_with, activations, channel_batch):
  original = score_with(activations)

  def ablated(channels):  # (N, len(channels)): the class score with each channel set to zero
    keep = 1.0 - jax.nn.one_hot(channels, activations.shape[-1], dtype=activations.dtype)  # (c, K)
    return jax.vmap(lambda mask: score_with(activations * mask))(keep).T

  without = jnp.concatenate([ablated(c) for c in _channel_chunks(activations.shape[-1], channel_batch)], 1)
  safe = jnp.where(original != 0, original, 1.0)[:, None]
  return _weighted(activations, (original[:, None] - without) / safe)


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
