r"""Figures of what a trained convnet learned, from its workdir (or a pretrained VGG16).

  python -m experiments.visualize --config=configs/visualize.py --workdir=/tmp/cats_dogs \
      --image=../shared/datasets/images/dog.4999.jpg

Writes to <workdir>/viz/: activations_<layer>.png, first_layer_filters.png,
filters_<layer>.png, top_images_<layer>.png, gradcam.png, saliency.png,
occlusion.png, and timings.json (seconds per method on this machine). The
model, its weights and its input preprocessing come from the run's config.json
and latest checkpoint; with --config.viz.model=vgg16 (or vgg16_base, its conv
base) the ImageNet model (configs/visualize.py). Every method is a JAX
transform of the model's apply function (convjax.viz); convjax.viz.figures
draws them.
"""
import json
import os
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from convjax import cli
from convjax.data.folders import decode_image
from convjax.errors import UserError
from convjax.models import get_model
from convjax.pretrained import keras_h5, transfer
from convjax.train import config as config_lib
from convjax.viz import figures, layers

config_flags.DEFINE_config_file("config", "configs/visualize.py", "Visualisation config.", lock_config=True)
flags.DEFINE_string("workdir", None, "A trained run's workdir (figures go to <workdir>/viz).")
flags.DEFINE_string("image", None, "The image to explain.")
flags.mark_flags_as_required(["workdir", "image"])

METHODS = ("activations", "first_layer", "filters", "top_images", "gradcam", "saliency", "occlusion")
CLASS_METHODS = ("top_images", "gradcam", "saliency", "occlusion")  # need a classifier / a run's data


def load_model(workdir: str, viz):
  """(model, variables, run config) from a run, or a pretrained model with viz.model."""
  if viz.model:
    model = get_model(viz.model)
    side = viz.image_size
    if getattr(model, "include_top", False) and side != 224:
      raise UserError(f"config.viz.image_size={side}: {viz.model} with its top takes 224x224 images")
    run = config_lib.default_config()
    run.model, run.rescale, run.preprocess = viz.model, 1.0, "caffe"
    run.data.image_size = (side, side)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, side, side, 3)))["params"]
    return model, {"params": keras_h5.load_into(params, transfer.weights_file(viz.weights, viz.model, model))}, run
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{workdir!r} has no config.json: not a training run (or set --config.viz.model)")
  with open(path) as f:
    run = config_lib.from_stored(json.load(f))
  model = get_model(run.model, **run.model_kwargs)
  start = transfer.latest_params(workdir)
  return model, {"params": start["params"], **(start["model_state"] or {})}, run


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  viz, workdir = flags.FLAGS.config.viz, flags.FLAGS.workdir
  methods = [m.strip() for m in viz.methods.split(",") if m.strip()]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise UserError(f"unknown config.viz.methods {unknown}; valid: {', '.join(METHODS)}")
  for key in ("num_filters", "filter_size", "octaves", "smoothgrad_samples", "ig_steps", "occlusion_patch",
              "occlusion_stride", "top_k"):
    if viz[key] < 1:
      raise UserError(f"config.viz.{key} must be >= 1, got {viz[key]}")
  if viz.model and "top_images" in methods:
    raise UserError(f"config.viz.methods: top_images needs a training run's images; {viz.model} has none "
                    f"(--config.viz.methods={','.join(m for m in methods if m != 'top_images')})")
  model, variables, run = load_model(workdir, viz)
  if viz.model and not getattr(model, "include_top", True):
    refused = [m for m in methods if m in CLASS_METHODS]
    if refused:
      raise UserError(f"config.viz.methods {refused} need a classifier and a run's data; "
                      f"{viz.model} is a conv base: use activations, first_layer, filters")
  size, channels = tuple(run.data.image_size) or None, run.data.channels
  if not viz.model and not run.data.folder:  # a TFDS run: its images' shape
    from convjax.data import tfds as tfds_data
    shape = tfds_data.get_builder(run.dataset, run.data_dir or None, False).info.features["image"].shape
    size, channels = size or tuple(shape[:2]), shape[-1]
  image = decode_image(flags.FLAGS.image, channels, size)
  prepare = config_lib.input_transform(run)
  x = prepare(jnp.asarray(image, jnp.float32)[None])
  input_shape = x.shape[1:]
  conv_paths = layers.layer_paths(model, input_shape, types=("Conv2D",))
  all_paths = layers.layer_paths(model, input_shape)  # Conv2D and MaxPooling2D, in call order
  names = viz.layers.split(",") if viz.layers else []
  missing = sorted(set(names) - {p[-1] for p in all_paths})
  if missing:
    raise UserError(f"config.viz.layers: no Conv2D or MaxPooling2D layer named {missing} in {run.model}")
  chosen = [p for p in all_paths if not names or p[-1] in names]
  needs_conv = sorted(set(methods) & {"first_layer", "filters", "top_images", "gradcam"})
  if needs_conv and not conv_paths:
    raise UserError(f"config.viz.methods {needs_conv} need a Conv2D layer; {run.model} has none")
  if viz.occlusion_patch > min(input_shape[:2]) and "occlusion" in methods:
    raise UserError(f"config.viz.occlusion_patch={viz.occlusion_patch} is larger than the "
                    f"{input_shape[0]}x{input_shape[1]} input")
  by_name = {p[-1]: p for p in conv_paths}
  for key in ("gradcam_layer", "top_layer"):
    if viz[key] and viz[key] not in by_name:
      raise UserError(f"config.viz.{key}={viz[key]!r} is not a Conv2D layer of {run.model}")
  gradcam_layer = by_name[viz.gradcam_layer] if viz.gradcam_layer else (conv_paths or [None])[-1]
  cls = prob = None  # a conv base (vgg16_base) outputs feature maps, not classes
  if not (viz.model and not getattr(model, "include_top", True)):
    logits = model.apply(variables, x)
    cls = int(layers.predicted_class(logits)[0]) if viz.class_index < 0 else viz.class_index
    if cls >= max(2, logits.shape[-1]):
      raise UserError(f"config.viz.class_index={cls}: {run.model} has {max(2, logits.shape[-1])} classes")
    prob = float(layers.class_probability(logits, cls)[0])
  subject = figures.Subject(model, variables, image, x, cls, prepare)
  out = os.path.join(workdir, "viz")
  os.makedirs(out, exist_ok=True)

  def top_images():
    from convjax.data.splits import open_splits
    splits = open_splits(run)
    if viz.top_split not in splits:
      raise UserError(f"config.viz.top_split={viz.top_split!r}: the run has {sorted(splits)}")
    split = splits[viz.top_split]
    path = by_name[viz.top_layer] if viz.top_layer else conv_paths[-1]
    channels = int(layers.layer_output(model, variables, x, path).shape[-1])
    if not 0 <= viz.top_filter < channels:
      raise UserError(f"config.viz.top_filter={viz.top_filter}: {path[-1]} has {channels} filters")
    return figures.top_images(subject, split.read(0, split.size)["image"], path, viz.top_filter,
                              viz.top_k, out)

  draw = {
      "activations": lambda: figures.layer_activations(subject, chosen, out),
      "first_layer": lambda: figures.first_layer_kernels(variables, conv_paths[0], out),
      "filters": lambda: figures.filter_patterns(
          subject, [p for p in chosen if p in conv_paths] if names else conv_paths[:1] + conv_paths[-1:],
          out, viz.num_filters, viz.filter_size, steps=viz.steps, step_size=viz.step_size, seed=viz.seed,
          jitter=viz.jitter, blur_sigma=viz.blur_sigma, l2=viz.l2, tv=viz.tv, octaves=viz.octaves,
          octave_scale=viz.octave_scale),
      "top_images": top_images,
      "gradcam": lambda: figures.gradcam(subject, gradcam_layer, out),
      "saliency": lambda: figures.saliency_maps(subject, out, viz.seed, viz.smoothgrad_samples,
                                                viz.smoothgrad_noise, viz.ig_steps, viz.ig_baseline),
      "occlusion": lambda: figures.occlusion_map(subject, out, viz.occlusion_patch, viz.occlusion_stride),
  }
  logging.info("%s; figures in %s", "no classifier" if cls is None else f"class {cls} (p={prob:.3f})", out)
  timings = {}
  for name in methods:
    t0 = time.perf_counter()
    draw[name]()
    timings[name] = round(time.perf_counter() - t0, 3)
    logging.info("%s: %.2fs", name, timings[name])
  with open(os.path.join(out, "timings.json"), "w") as f:
    json.dump({"device": jax.devices()[0].device_kind, "class": cls, "probability": prob,
               "seconds": timings}, f, indent=1)


if __name__ == "__main__":
  cli.run(main)
