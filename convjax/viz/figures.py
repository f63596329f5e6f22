"""The figures of experiments/visualize.py: one function per method, each computing its maps
with convjax.viz and writing PNGs to a folder.

A `Subject` is what is explained: the model, its variables, the image (uint8, as
shown) and its model input, the class, and `prepare` (0-255 pixels -> model input).
Each function returns the paths it wrote.
"""

import os
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import logging

from convjax.viz import activations, cam, filters, layers, occlusion, saliency
from convjax.viz.plots import channel_grid_figure, image_grid, map_panels


class Subject(NamedTuple):
  model: object
  variables: dict
  image: np.ndarray  # (H, W, C) uint8, as drawn
  x: jnp.ndarray  # (1, H, W, C) the model's input for it
  class_index: int
  prepare: Callable


def layer_activations(s: Subject, paths: Sequence[tuple], out: str) -> list:
  """activations_<layer>.png: every channel of each layer at `paths`, 16 to a row."""
  acts = layers.layer_outputs(s.model, s.variables, s.x, paths)
  written = []
  for path in paths:
    written.append(os.path.join(out, f"activations_{path[-1]}.png"))
    channel_grid_figure(
      activations.channel_grid(np.asarray(acts[tuple(path)][0])),
      written[-1],
      f"{path[-1]} {tuple(acts[tuple(path)].shape[1:])}",
    )
  return written


def first_layer_kernels(variables: dict, conv_path: tuple, out: str) -> list:
  """first_layer_filters.png: the first conv layer's kernels, min-max scaled together."""
  node = variables["params"]
  for name in conv_path:
    node = node[name]
  tiles = np.moveaxis(np.asarray(node["kernel"]), -1, 0)  # (c_out, k, k, c_in)
  tiles = (tiles - tiles.min()) / (tiles.max() - tiles.min() + 1e-12)
  path = os.path.join(out, "first_layer_filters.png")
  image_grid(tiles if tiles.shape[-1] in (1, 3) else tiles[..., :1], path, cols=8, size=1.0)
  return [path]


def filter_patterns(s: Subject, paths: Sequence[tuple], out: str, num_filters: int, size: int, **ascent) -> list:
  """filters_<layer>.png: the first `num_filters` filters of each layer by gradient ascent
  (filters.maximize_filters; `ascent` holds its options), 8 to a row."""
  written = []
  for path in paths:
    n = min(num_filters, int(layers.layer_output(s.model, s.variables, s.x, path).shape[-1]))
    images, start, end = filters.maximize_filters(
      s.model, s.variables, path, range(n), size=size, channels=s.image.shape[-1], prepare=s.prepare, **ascent
    )
    written.append(os.path.join(out, f"filters_{path[-1]}.png"))
    image_grid(np.stack([filters.deprocess(im) for im in np.asarray(images)]), written[-1], cols=8, size=1.5)
    logging.info(
      "%s: mean activation %.3f -> %.3f over %d filters", path[-1], float(jnp.mean(start)), float(jnp.mean(end)), n
    )
  return written


def top_images(s: Subject, pixels: np.ndarray, path: tuple, channel: int, k: int, out: str) -> list:
  """top_images_<layer>.png: the k images of `pixels` (uint8) that excite `channel` most."""
  order, _ = activations.top_images(s.model, s.variables, pixels, path, channel, k, prepare=s.prepare)
  written = os.path.join(out, f"top_images_{path[-1]}.png")
  image_grid(pixels[order], written, cols=3)
  return [written]


def gradcam(s: Subject, layer: tuple, out: str) -> list:
  """gradcam.png: Grad-CAM and Grad-CAM++ at `layer`, each alone and over the image."""
  heat = np.asarray(cam.grad_cam(s.model, s.variables, s.x, layer, s.class_index)[0][0])
  heat_pp = np.asarray(cam.grad_cam(s.model, s.variables, s.x, layer, s.class_index, plus_plus=True)[0][0])
  path = os.path.join(out, "gradcam.png")
  map_panels(
    path,
    s.image,
    [
      (f"Grad-CAM {layer[-1]}", heat, "jet"),
      ("superimposed (alpha 0.4)", cam.superimpose(s.image, heat), None),
      ("Grad-CAM++", heat_pp, "jet"),
      ("superimposed", cam.superimpose(s.image, heat_pp), None),
    ],
  )
  return [path]


def saliency_maps(
  s: Subject, out: str, seed: int, smoothgrad_samples: int, smoothgrad_noise: float, ig_steps: int, ig_baseline: float
) -> list:
  """saliency.png: vanilla gradient, SmoothGrad, Integrated Gradients (from a constant
  image of pixel value `ig_baseline`) and guided backprop."""
  m, v, x, c = s.model, s.variables, s.x, s.class_index
  baseline = s.prepare(jnp.full((1, *s.image.shape), ig_baseline, jnp.float32))
  maps = {
    "gradient": saliency.vanilla_gradient(m, v, x, c),
    "SmoothGrad": saliency.smoothgrad(m, v, x, jax.random.key(seed), c, smoothgrad_samples, smoothgrad_noise),
    f"Integrated Gradients ({ig_steps})": saliency.integrated_gradients(m, v, x, c, baseline, ig_steps),
    "guided backprop": saliency.guided_backprop(m, v, x, c),
  }
  path = os.path.join(out, "saliency.png")
  map_panels(path, s.image, [(k, np.asarray(saliency.saliency_map(g)[0]), "hot") for k, g in maps.items()])
  return [path]


def occlusion_map(s: Subject, out: str, patch: int, stride: int) -> list:
  """occlusion.png: the class probability with a grey patch at each position, and how much
  the patch lowers the class score (which still varies where the probability saturates)."""
  occ = occlusion.occlusion_map(s.model, s.variables, s.x[0], s.class_index, patch, stride)
  unoccluded = float(layers.class_score(s.model.apply(s.variables, s.x), s.class_index)[0])
  path = os.path.join(out, "occlusion.png")
  p = occ.probability
  map_panels(
    path,
    s.image,
    [
      (
        f"p(class {s.class_index}), {patch}px patch: {p.min():.3f}-{p.max():.3f}",
        p,
        "viridis",
        {"vmin": 0.0, "vmax": 1.0},
      ),
      ("drop in class score", unoccluded - occ.score, "magma"),
    ],
  )
  return [path]


def batch_maps(
  model,
  variables,
  prepare: Callable,
  images: np.ndarray,
  names: Sequence[str],
  classes: Sequence[str],
  true: Sequence[str],
  layer: tuple,
  methods: Sequence[str],
  out: str,
  batch: int = 16,
) -> list:
  """gradcam_images.png and saliency_images.png: one grid per method over many images, each
  titled with its file, predicted class (probability) and true label; Grad-CAM at `layer` and
  the vanilla-gradient saliency of the predicted class, computed `batch` images at a time by
  one jitted function (the last batch padded)."""
  methods = [m for m in ("gradcam", "saliency") if m in methods]

  def explain(v, pixels):
    x = prepare(pixels.astype(jnp.float32))
    logits = model.apply(v, x)
    predicted = layers.predicted_class(logits)
    maps = {"class": predicted, "probability": layers.class_probability(logits, predicted)}
    if "gradcam" in methods:
      maps["gradcam"] = cam.grad_cam(model, v, x, layer)[0]
    if "saliency" in methods:
      maps["saliency"] = saliency.saliency_map(saliency.vanilla_gradient(model, v, x))
    return maps

  run = jax.jit(explain)
  parts = []
  for start in range(0, len(images), batch):
    chunk = images[start : start + batch]
    padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
    parts.append({k: np.asarray(v)[: len(chunk)] for k, v in run(variables, padded).items()})
  got = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  titles = [
    f"{os.path.basename(n)[:24]}\npredicted {classes[c]} ({p:.2f})\ntrue {t}"
    for n, c, p, t in zip(names, got["class"], got["probability"], true, strict=True)
  ]
  colour = matplotlib.colormaps["hot"]
  tiles = {
    "gradcam": lambda i: cam.superimpose(images[i], got["gradcam"][i]),
    "saliency": lambda i: (colour(got["saliency"][i])[..., :3] * 255).astype(np.uint8),
  }
  paths = []
  for method in methods:
    path = os.path.join(out, f"{method}_images.png")
    image_grid(
      np.stack([tiles[method](i) for i in range(len(images))]), path, cols=min(6, len(images)), titles=titles, size=2.3
    )
    paths.append(path)
  logging.info("%s of %d images: %s", " and ".join(methods), len(images), ", ".join(paths))
  return paths
