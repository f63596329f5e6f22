r"""Figures of what a trained convnet learned, from its workdir (or a pretrained VGG16).

  python -m experiments.visualize --config=configs/visualize.py --workdir=/tmp/cats_dogs \
      --image=../shared/datasets/images/dog.4999.jpg

Writes to <workdir>/viz/: activations_<layer>.png, first_layer_filters.png,
filters_<layer>.png, top_images_<layer>.png, gradcam.png, saliency.png,
occlusion.png, and timings.json (seconds per method on this machine). The
model, its weights and its input preprocessing come from the run's config.json
and latest checkpoint. Every method is a JAX transform of the model's apply
function (convjax.viz).
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from convjax import cli  # noqa: E402
from convjax.data.folders import decode_image  # noqa: E402
from convjax.errors import UserError  # noqa: E402
from convjax.models import get_model  # noqa: E402
from convjax.pretrained import keras_h5, transfer  # noqa: E402
from convjax.train import config as config_lib  # noqa: E402
from convjax.viz import activations, cam, filters, layers, occlusion, saliency  # noqa: E402
from convjax.viz.plots import image_grid  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/visualize.py", "Visualisation config.", lock_config=True)
flags.DEFINE_string("workdir", None, "A trained run's workdir (figures go to <workdir>/viz).")
flags.DEFINE_string("image", None, "The image to explain.")
flags.mark_flags_as_required(["workdir", "image"])

METHODS = ("activations", "first_layer", "filters", "top_images", "gradcam", "saliency", "occlusion")


def load_model(workdir: str, viz):
  """(model, variables, run config) from a run, or a pretrained model with viz.model."""
  if viz.model:
    run = config_lib.default_config()
    run.model, run.rescale, run.preprocess = viz.model, 1.0, "caffe"
    run.data.image_size = (224, 224)
    model = get_model(viz.model)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"]
    path = (transfer.imagenet_weights(viz.model, include_top=True) if viz.weights == "imagenet"
            else viz.weights)
    return model, {"params": keras_h5.load_into(params, path)}, run
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{workdir!r} has no config.json: not a training run (or set --config.viz.model)")
  with open(path) as f:
    run = config_lib.from_stored(json.load(f))
  model = get_model(run.model, **run.model_kwargs)
  start = transfer.latest_params(workdir)
  return model, {"params": start["params"], **(start["model_state"] or {})}, run


def _save_maps(path, image, panels):
  fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3.2 * (len(panels) + 1), 3.4))
  axes[0].imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None)
  axes[0].set_title("image")
  for ax, (title, m, cmap) in zip(axes[1:], panels):
    ax.imshow(m, cmap=cmap)
    ax.set_title(title, fontsize=9)
  for ax in axes:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  viz, workdir = flags.FLAGS.config.viz, flags.FLAGS.workdir
  methods = [m.strip() for m in viz.methods.split(",") if m.strip()]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise UserError(f"unknown config.viz.methods {unknown}; valid: {', '.join(METHODS)}")
  model, variables, run = load_model(workdir, viz)
  size, channels = tuple(run.data.image_size) or None, run.data.channels
  if not viz.model and not run.data.folder:  # a TFDS run: its images' shape
    from convjax.data import tfds as tfds_data
    shape = tfds_data.get_builder(run.dataset, run.data_dir or None, False).info.features["image"].shape
    size, channels = size or tuple(shape[:2]), shape[-1]
  image = decode_image(flags.FLAGS.image, channels, size)
  prepare = config_lib.input_transform(run)
  x = prepare(jnp.asarray(image, jnp.float32)[None])
  input_shape = x.shape[1:]
  out = os.path.join(workdir, "viz")
  os.makedirs(out, exist_ok=True)
  conv_paths = layers.layer_paths(model, input_shape, types=("Conv2D",))
  chosen = [tuple(p for p in path) for path in conv_paths + layers.layer_paths(model, input_shape, ("MaxPooling2D",))
            if not viz.layers or path[-1] in viz.layers.split(",")]
  chosen = [p for p in layers.layer_paths(model, input_shape) if p in chosen]
  last_conv = conv_paths[-1]
  by_name = {p[-1]: p for p in conv_paths}
  gradcam_layer = by_name[viz.gradcam_layer] if viz.gradcam_layer else last_conv
  logits = model.apply(variables, x)
  cls = int(layers.predicted_class(logits)[0]) if viz.class_index < 0 else viz.class_index
  prob = float(layers.class_probability(logits, cls)[0])
  timings = {}

  def timed(name, fn):
    t0 = time.perf_counter()
    fn()
    timings[name] = round(time.perf_counter() - t0, 3)
    logging.info("%s: %.2fs", name, timings[name])

  def draw_activations():
    acts = layers.layer_outputs(model, variables, x, chosen)
    for path in chosen:
      grid = activations.channel_grid(np.asarray(acts[path][0]))
      fig = plt.figure(figsize=(grid.shape[1] / 60 + 1, grid.shape[0] / 60 + 1))
      plt.imshow(grid, cmap="viridis", aspect="auto")
      plt.title(f"{path[-1]} {tuple(acts[path].shape[1:])}")
      plt.axis("off")
      fig.savefig(os.path.join(out, f"activations_{path[-1]}.png"), dpi=100)
      plt.close(fig)

  def draw_first_layer():
    node = variables["params"]
    for name in conv_paths[0]:
      node = node[name]
    kernel = np.asarray(node["kernel"])  # (k, k, c_in, c_out)
    tiles = np.moveaxis(kernel, -1, 0)
    tiles = (tiles - tiles.min()) / (tiles.max() - tiles.min() + 1e-12)
    image_grid(tiles if tiles.shape[-1] in (1, 3) else tiles[..., :1], os.path.join(out, "first_layer_filters.png"),
               cols=8, size=1.0)

  def draw_filters():
    for path in (chosen if viz.layers else conv_paths[:1] + conv_paths[-1:]):
      if path not in conv_paths:
        continue
      channels = int(layers.layer_output(model, variables, x, path).shape[-1])
      n = min(viz.num_filters, channels)
      images, start, end = filters.maximize_filters(
          model, variables, path, range(n), size=viz.filter_size, channels=image.shape[-1],
          steps=viz.steps, step_size=viz.step_size, seed=viz.seed, prepare=prepare, jitter=viz.jitter,
          blur_sigma=viz.blur_sigma, l2=viz.l2, tv=viz.tv)
      tiles = np.stack([filters.deprocess(im) for im in np.asarray(images)])
      image_grid(tiles, os.path.join(out, f"filters_{path[-1]}.png"), cols=8, size=1.5)
      logging.info("%s: mean activation %.3f -> %.3f over %d filters", path[-1],
                   float(jnp.mean(start)), float(jnp.mean(end)), n)

  def draw_top_images():
    from convjax.data.splits import open_splits
    split = open_splits(run)[viz.top_split]
    pixels = split.read(0, split.size)["image"]
    path = by_name[viz.top_layer] if viz.top_layer else last_conv
    order, _ = activations.top_images(model, variables, pixels, path, viz.top_filter, viz.top_k,
                                      prepare=prepare)
    image_grid(pixels[order], os.path.join(out, f"top_images_{path[-1]}.png"), cols=3)

  def draw_gradcam():
    heat, _ = cam.grad_cam(model, variables, x, gradcam_layer, cls)
    heat_pp, _ = cam.grad_cam(model, variables, x, gradcam_layer, cls, plus_plus=True)
    _save_maps(os.path.join(out, "gradcam.png"), image, [
        (f"Grad-CAM {gradcam_layer[-1]}", np.asarray(heat[0]), "jet"),
        ("superimposed (alpha 0.4)", cam.superimpose(image, np.asarray(heat[0])), None),
        ("Grad-CAM++", np.asarray(heat_pp[0]), "jet"),
        ("superimposed", cam.superimpose(image, np.asarray(heat_pp[0])), None)])

  def draw_saliency():
    baseline = prepare(jnp.full((1, *image.shape), viz.ig_baseline, jnp.float32))
    maps = {
        "gradient": saliency.vanilla_gradient(model, variables, x, cls),
        "SmoothGrad": saliency.smoothgrad(model, variables, x, jax.random.key(viz.seed), cls,
                                          viz.smoothgrad_samples, viz.smoothgrad_noise),
        f"Integrated Gradients ({viz.ig_steps})": saliency.integrated_gradients(
            model, variables, x, cls, baseline, viz.ig_steps),
        "guided backprop": saliency.guided_backprop(model, variables, x, cls),
    }
    _save_maps(os.path.join(out, "saliency.png"), image,
               [(k, np.asarray(saliency.saliency_map(v)[0]), "hot") for k, v in maps.items()])

  def draw_occlusion():
    probs, _ = occlusion.occlusion_map(model, variables, x[0], cls, viz.occlusion_patch, viz.occlusion_stride)
    _save_maps(os.path.join(out, "occlusion.png"), image,
               [(f"p(class {cls}) with a {viz.occlusion_patch}px patch", probs, "viridis")])

  draw = {"activations": draw_activations, "first_layer": draw_first_layer, "filters": draw_filters,
          "top_images": draw_top_images, "gradcam": draw_gradcam, "saliency": draw_saliency,
          "occlusion": draw_occlusion}
  logging.info("class %d (p=%.3f); figures in %s", cls, prob, out)
  for name in methods:
    timed(name, draw[name])
  with open(os.path.join(out, "timings.json"), "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "class": cls, "probability": prob,
               "seconds": timings}, f, indent=1)


if __name__ == "__main__":
  cli.run(main)
