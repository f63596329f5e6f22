"""Every explanation method by name, and its faithfulness and robustness metrics, as one
pure, jittable function of (variables, images, classes, rng): what experiments/explain.py
runs over a split, a batch at a time, on every device.

A method gives either a CAM (N, h, w) at its layer's resolution or attributions shaped like
the input (N, H, W, C); `as_map` makes both a map (N, h, w) for ranking pixels and for the
files: a CAM as it is, attributions summed over channels (signed: positive is evidence for
the class, as captum's visualisation sums them). The metrics (faithfulness.py) read the map
(deletion, insertion, ROAD) or the attributions (infidelity: a CAM resized to the input and
spread over its channels), re-run the method (max-sensitivity), or compare with the maps of
the same model re-initialised (the randomisation check of Adebayo et al. 2018: the rank
correlation of the two maps; a method that explains the model has it near 0).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from convjax.models import layers as model_layers
from convjax.viz import cam, faithfulness, layers, occlusion, rewrite, saliency


class Options(NamedTuple):
  layer: tuple = ()  # the CAMs' layer; () -> the last conv layer
  fused_layers: tuple = ()  # layercam_fused's layers (paths); the explain binary: every conv layer
  ig_steps: int = 32  # Integrated Gradients' intervals
  samples: int = 16  # noise tunnels' and GradientSHAP's samples
  noise: float = 0.15  # noise tunnels' std, of each image's range
  baseline: str = "zeros"  # Integrated Gradients' and DeepLIFT's (saliency.BASELINES)
  patch: int = 4  # feature ablation's grid segments
  channel_batch: int = 16  # Score-CAM's and Ablation-CAM's channels per forward pass
  sensitivity_samples: int = 10  # max-sensitivity's perturbations (captum's default)
  infidelity_samples: int = 10


ATTRIBUTIONS = (
  "gradient",
  "input_x_gradient",
  "integrated_gradients",
  "smoothgrad",
  "smoothgrad_sq",
  "vargrad",
  "gradient_shap",
  "deeplift",
  "guided_backprop",
  "guided_gradcam",
  "feature_ablation",
)
METHODS = (*cam.CAMS, "layercam_fused", *ATTRIBUTIONS)
METRICS = ("deletion", "insertion", "road", "infidelity", "sensitivity", "randomisation")
# Which way is better, for the table's colours and the docs.
LOWER_IS_BETTER = {
  "deletion": True,
  "insertion": False,
  "road": False,
  "infidelity": True,
  "sensitivity": True,
  "randomisation": True,
}


def conv_layers(model, input_shape) -> list:
  """The model's conv layers' paths in call order: the CAMs' candidates, the last one their default."""
  return layers.layer_paths(model, input_shape, types=("Conv2D",))


# The methods that read the predicted classes off their own forward pass (each a vjp).
ONE_PASS = (
  "gradient",
  "input_x_gradient",
  "guided_backprop",
  "deeplift",
  *cam.GRADIENT_CAMS,
  "layercam_fused",
  "guided_gradcam",
)


def explain(model, variables, x, classes, method: str, options: Options, rng):
  """The method's CAM (N, h, w) or attributions (N, H, W, C) of `classes` (N,) for x."""
  return explain_classes(model, variables, x, classes, method, options, rng)[0]


def explain_classes(model, variables, x, classes, method: str, options: Options, rng):
  """(explain's result, the classes explained (N,)): `classes`, or with None each image's
  predicted class, which the ONE_PASS methods read off their own forward pass and the
  others predict first (one forward pass more). Traced with the max pools and first
  convolutions that are faster for gradients with respect to the input
  (models.layers.elementwise_max_pools and narrow_convs)."""
  with model_layers.elementwise_max_pools(), model_layers.narrow_convs():
    return _explain_classes(model, variables, x, classes, method, options, rng)


def _explain_classes(model, variables, x, classes, method, options, rng):
  if classes is None and method not in ONE_PASS:
    classes = layers.predicted_class(model.apply(variables, x))
  base = saliency.baseline(x, options.baseline, rng)
  if method in ("gradient", "input_x_gradient"):
    grad, classes = saliency.class_gradient(lambda v: model.apply(variables, v), x, classes)
    return (grad if method == "gradient" else x * grad), classes
  if method == "guided_backprop":
    return saliency.class_gradient(saliency.rewritten_apply(model, variables, rewrite.GUIDED), x, classes)
  if method == "deeplift":
    apply = saliency.rewritten_apply(model, variables, rewrite.DEEPLIFT, base)
    grad, classes = saliency.class_gradient(apply, x, classes)
    return (x - base) * grad, classes
  if method in cam.GRADIENT_CAMS:
    return cam.cam(model, variables, x, options.layer, method, classes)
  if method == "guided_gradcam":
    return cam.guided_grad_cam(model, variables, x, options.layer, classes)
  if method == "layercam_fused":
    return cam.fused(model, variables, x, options.fused_layers, "layercam", classes)
  return _explain(model, variables, x, classes, method, options, rng, base), classes


def _explain(model, variables, x, classes, method, options, rng, base):
  if method in cam.CAMS:
    return cam.cam(model, variables, x, options.layer, method, classes, options.channel_batch)[0]
  if method == "feature_ablation":
    return occlusion.feature_ablation(model, variables, x, classes, options.patch)
  if method == "integrated_gradients":
    return saliency.integrated_gradients(model, variables, x, classes, base, options.ig_steps)
  if method in saliency.NOISE_TUNNELS:
    return saliency.smoothgrad(model, variables, x, rng, classes, options.samples, options.noise, method)
  if method == "gradient_shap":  # captum's usual baselines: the zeros and noise over the range
    baselines = jnp.concatenate([jnp.zeros_like(x), saliency.baseline(x, "uniform", rng)])
    return saliency.gradient_shap(model, variables, x, rng, baselines, classes, options.samples)
  raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def as_map(result):
  """(N, h, w): a CAM as it is; attributions (N, H, W, C) summed over channels."""
  return result if result.ndim == 3 else jnp.sum(result, -1)


def as_attributions(result, x):
  """Input-shaped attributions: a CAM resized to the input (bilinear) on every channel."""
  if result.ndim == 4:
    return result
  resized = jax.image.resize(result, (result.shape[0], *x.shape[1:3]), "bilinear")
  return jnp.broadcast_to(resized[..., None], x.shape)


def rank_correlation(a, b):
  """(N,) Spearman's correlation of two batches of maps (ranks by pixel_ranks: ties in
  row-major order); 0 where either map is constant."""
  ra, rb = (faithfulness.pixel_ranks(m).reshape(m.shape[0], -1).astype(jnp.float32) for m in (a, b))
  ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
  varying = (jnp.ptp(a.reshape(a.shape[0], -1), 1) > 0) & (jnp.ptp(b.reshape(b.shape[0], -1), 1) > 0)
  rho = jnp.sum(ra * rb, 1) / jnp.sqrt(jnp.sum(ra * ra, 1) * jnp.sum(rb * rb, 1))
  return jnp.where(varying, rho, 0.0)


def measure(model, variables, random_variables, x, classes, method: str, options: Options, metrics, rng):
  """(map (N, h, w), {metric: (N,)}, the classes explained) of `method` on x (`classes`, or
  None: the predicted ones, as explain_classes); `random_variables` (the model
  re-initialised) serve the randomisation check."""
  keys = jax.random.split(rng, 4)
  result, classes = explain_classes(model, variables, x, classes, method, options, keys[0])
  maps = as_map(result)
  out = {}
  for name in metrics:
    if name in ("deletion", "insertion"):
      out[name] = faithfulness.curve(model, variables, x, maps, classes, name)[0]
    elif name == "road":
      out[name] = faithfulness.road(model, variables, x, maps, classes, keys[1])["combined"]
    elif name == "infidelity":
      attributions = as_attributions(result, x)
      out[name] = faithfulness.infidelity(
        model, variables, x, attributions, classes, keys[2], options.infidelity_samples, normalize=True
      )
    elif name == "sensitivity":
      out[name] = faithfulness.max_sensitivity(
        lambda v: explain(model, variables, v, classes, method, options, keys[0]),
        x,
        keys[3],
        options.sensitivity_samples,
      )
    elif name == "randomisation":
      other = as_map(explain(model, random_variables, x, classes, method, options, keys[0]))
      out[name] = rank_correlation(maps, other)
    else:
      raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")
  return maps, out, classes
