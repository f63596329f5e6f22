r"""Figures of what a trained convnet learned, from its workdir (or a pretrained VGG16).

  python -m experiments.visualize --config=configs/visualize.py --workdir=/tmp/cats_dogs \
      --image=../shared/datasets/images/dog.4999.jpg
  python -m experiments.visualize --workdir=/tmp/cats_dogs --images='photos/**/*.jpg' \
      --config.viz.methods=gradcam,saliency

Writes to <workdir>/viz/: activations_<layer>.png, first_layer_filters.png,
filters_<layer>.png, top_images_<layer>.png, gradcam.png, saliency.png,
occlusion.png, and timings.json (seconds per method on this machine); with
--images, gradcam_images.png and saliency_images.png (a grid of every image with
its predicted and true class: the name of its folder where that is a class); for
a pretrained model its diagram, model.png. The
model, its weights and its input preprocessing come from the run
(convjax.run.read_run, the tested weights unless --weights says otherwise) and images are
fitted as its evaluation fitted them (convjax.inference.run_input); with --config.viz.model=vgg16 (or vgg16_base, its conv
base) the ImageNet model (configs/visualize.py). Every method is a JAX
transform of the model's apply function (convjax.viz); convjax.viz.figures
draws them, each taking its own config.viz.<method> options.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from convjax import cli, files, inference, run
from convjax.data.folders import decode_image
from convjax.data.preprocess import Fit, input_transform
from convjax.data.splits import open_source
from convjax.errors import UserError
from convjax.models import get_model, has_features
from convjax.models.diagram import plot_model
from convjax.pretrained import imagenet, transfer
from convjax.viz import figures, layers

config_flags.DEFINE_config_file("config", "configs/visualize.py", "Visualisation config.", lock_config=True)
flags.DEFINE_string("workdir", None, "A trained run's workdir (figures go to <workdir>/viz).")
flags.DEFINE_string("image", None, "The image to explain.")
flags.DEFINE_string(
  "images", None, "Many images (a folder, recursively, or a glob): Grad-CAM and saliency of each, one grid per method."
)
flags.DEFINE_enum("weights", "tested", run.WEIGHTS, "Which of the run's weights (see docs/using-a-run.md).")
flags.mark_flags_as_required(["workdir"])

METHODS = ("activations", "first_layer", "filters", "top_images", "gradcam", "saliency", "occlusion")
CLASS_METHODS = ("top_images", "gradcam", "saliency", "occlusion")  # need a classifier / a run's data
# Options of config.viz.<method> that count something: each must be >= 1.
COUNTS = {
  "filters": ("num_filters", "size", "octaves"),
  "saliency": ("smoothgrad_samples", "ig_steps"),
  "occlusion": ("patch", "stride"),
  "top_images": ("k",),
}


def check_options(viz) -> list:
  """The chosen methods; a bad method name or option is one UserError."""
  methods = [m.strip() for m in viz.methods.split(",") if m.strip()]
  unknown = sorted(set(methods) - set(METHODS))
  if unknown:
    raise UserError(f"unknown config.viz.methods {unknown}; valid: {', '.join(METHODS)}")
  for method, keys in COUNTS.items():
    for key in keys:
      if viz[method][key] < 1:
        raise UserError(f"config.viz.{method}.{key} must be >= 1, got {viz[method][key]}")
  if viz.model and "top_images" in methods:
    raise UserError(
      f"config.viz.methods: top_images needs a training run's images; {viz.model} has none "
      f"(--config.viz.methods={','.join(m for m in methods if m != 'top_images')})"
    )
  return methods


def pretrained(viz):
  """(model, variables, pixel transform, fit, (image size, channels)) of the ImageNet model viz.model."""
  model = get_model(viz.model)
  side = viz.image_size
  if getattr(model, "include_top", False) and side != 224:
    raise UserError(f"config.viz.image_size={side}: {viz.model} with its top takes 224x224 images")
  variables = {"params": transfer.params_from_file(viz.weights, viz.model, model, (side, side, 3))}
  return model, variables, input_transform(1.0, "caffe"), Fit((side, side)), ((side, side), 3)


def trained(workdir: str, weights: str = "tested"):
  """(model, variables, pixel transform, fit, (image size, channels), config) of a run: the
  weights `weights` names, read as predict and evaluate read them."""
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise UserError(f"{workdir!r} has no config.json: not a training run (or set --config.viz.model)")
  config, model, variables, _, what = run.read_run(workdir, weights)
  if config.feature_extractor.model:
    raise UserError(
      f"{workdir} trained a head on {config.feature_extractor.model}'s features: visualize explains models of images"
    )
  logging.info("explaining %s", what)
  _, shape, fit, prepare = inference.run_input(config)
  return model, variables, prepare, fit, (shape[:2], shape[-1]), config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  viz, workdir = flags.FLAGS.config.viz, flags.FLAGS.workdir
  if bool(flags.FLAGS.image) == bool(flags.FLAGS.images):
    raise UserError("give --image=FILE (every method) or --images=FOLDER|GLOB (Grad-CAM and saliency grids)")
  methods = check_options(viz)
  if viz.model:
    model, variables, prepare, fit, (size, channels) = pretrained(viz)
    name, data = viz.model, None
    files.make_dir(os.path.join(workdir, "viz"))
    plot_model(model, (*size, channels), os.path.join(workdir, "viz", "model.png"), viz.model)
  else:
    model, variables, prepare, fit, (size, channels), config = trained(workdir, flags.FLAGS.weights)
    name, data = config.model, config.data
  classifier = not (viz.model and not getattr(model, "include_top", True))
  if not classifier:
    refused = [m for m in methods if m in CLASS_METHODS]
    if refused:
      raise UserError(
        f"config.viz.methods {refused} need a classifier and a run's data; "
        f"{viz.model} is a conv base: use activations, first_layer, filters"
      )
  if flags.FLAGS.images:
    return explain_images(
      viz,
      methods,
      model,
      variables,
      prepare,
      fit,
      (size, channels),
      name,
      classes_of(viz, data, model, variables, size, channels),
      workdir,
    )
  image = fit(decode_image(flags.FLAGS.image, channels, None))
  subject = figures.Subject(model, variables, image, prepare(jnp.asarray(image, jnp.float32)[None]), None, prepare)
  subject, probability, draw = figure_functions(viz, methods, subject, name, classifier, data, workdir)
  timings = {}
  for method in methods:
    t0 = time.perf_counter()
    draw[method]()
    timings[method] = round(time.perf_counter() - t0, 3)
    logging.info("%s: %.2fs", method, timings[method])
  files.write_json(
    os.path.join(workdir, "viz", "timings.json"),
    {
      "device": jax.devices()[0].device_kind,
      "class": subject.class_index,
      "probability": probability,
      "seconds": timings,
    },
  )


def classes_of(viz, data, model, variables, size, channels) -> tuple:
  """The class names: the run's, ImageNet's for a pretrained model with its top, else indices."""
  classes = tuple(open_source(data).classes) if data is not None else ()
  if classes:
    return classes
  if viz.model and getattr(model, "include_top", False):
    index = imagenet.class_index()
    return tuple(index[i][1] for i in range(len(index)))
  x = jnp.zeros((1, *size, channels))
  return tuple(str(i) for i in range(max(2, jax.eval_shape(model.apply, variables, x).shape[-1])))


def explain_images(viz, methods, model, variables, prepare, fit, shape, name: str, classes: tuple, workdir: str):
  """Grad-CAM and saliency grids of every image --images names (a file's true label: the name
  of its folder where that is a class)."""
  batch_methods = [m for m in methods if m in ("gradcam", "saliency")]
  if not batch_methods:
    raise UserError(f"--images draws gradcam and saliency grids; config.viz.methods={viz.methods!r} has neither")
  size, channels = shape
  conv_paths = layers.layer_paths(model, (*size, channels), types=("Conv2D",))
  by_name = {p[-1]: p for p in conv_paths}
  if viz.gradcam.layer and viz.gradcam.layer not in by_name:
    raise UserError(f"config.viz.gradcam.layer={viz.gradcam.layer!r} is not a Conv2D layer of {name}")
  if "gradcam" in batch_methods and not conv_paths:
    raise UserError(f"config.viz.methods gradcam needs a Conv2D layer; {name} has none")
  paths = inference.list_images(flags.FLAGS.images)
  images, names = [], []
  for path in paths:
    try:
      images.append(fit(decode_image(path, channels, None)))
      names.append(path)
    except UserError as e:
      logging.warning("skipped %s", e)
  if not images:
    raise UserError(f"--images={flags.FLAGS.images!r}: no image could be read")
  true = [classes[i] if (i := inference.folder_class(p, classes)) >= 0 else "?" for p in names]
  out = os.path.join(workdir, "viz")
  files.make_dir(out)
  layer = by_name.get(viz.gradcam.layer, (conv_paths or [None])[-1])
  figures.batch_maps(model, variables, prepare, np.stack(images), names, classes, true, layer, batch_methods, out)


def figure_functions(viz, methods, subject, name: str, classifier: bool, data, workdir: str):
  """(subject with its class, the class probability, {method: () -> paths written}), after
  checking the layers and the class that the options name."""
  model, variables, x = subject.model, subject.variables, subject.x
  input_shape = x.shape[1:]
  conv_paths = layers.layer_paths(model, input_shape, types=("Conv2D",))
  all_paths = layers.layer_paths(model, input_shape)  # Conv2D and MaxPooling2D, in call order
  names = viz.layers.split(",") if viz.layers else []
  missing = sorted(set(names) - {p[-1] for p in all_paths})
  if missing:
    raise UserError(f"config.viz.layers: no Conv2D or MaxPooling2D layer named {missing} in {name}")
  chosen = [p for p in all_paths if not names or p[-1] in names]
  needs_conv = sorted(set(methods) & {"first_layer", "filters", "top_images", "gradcam"})
  if needs_conv and not conv_paths:
    raise UserError(f"config.viz.methods {needs_conv} need a Conv2D layer; {name} has none")
  if viz.occlusion.patch > min(input_shape[:2]) and "occlusion" in methods:
    raise UserError(
      f"config.viz.occlusion.patch={viz.occlusion.patch} is larger than the {input_shape[0]}x{input_shape[1]} input"
    )
  by_name = {p[-1]: p for p in conv_paths}
  for method in ("gradcam", "top_images"):
    if viz[method].layer and viz[method].layer not in by_name:
      raise UserError(f"config.viz.{method}.layer={viz[method].layer!r} is not a Conv2D layer of {name}")
  last_conv = (conv_paths or [None])[-1]
  cls = prob = None  # a conv base (vgg16_base) outputs feature maps, not classes
  if classifier:
    logits = model.apply(variables, x)
    cls = int(layers.predicted_class(logits)[0]) if viz.class_index < 0 else viz.class_index
    if cls >= max(2, logits.shape[-1]):
      raise UserError(f"config.viz.class_index={cls}: {name} has {max(2, logits.shape[-1])} classes")
    prob = float(layers.class_probability(logits, cls)[0])
  subject = subject._replace(class_index=cls)
  out = os.path.join(workdir, "viz")
  files.make_dir(out)
  logging.info("%s; figures in %s", "no classifier" if cls is None else f"class {cls} (p={prob:.3f})", out)

  def top_images():
    options = viz.top_images
    splits = open_source(data).splits()
    if options.split not in splits:
      raise UserError(f"config.viz.top_images.split={options.split!r}: the run has {sorted(splits)}")
    split = splits[options.split]
    path = by_name[options.layer] if options.layer else last_conv
    channels = int(layers.layer_output(model, variables, x, path).shape[-1])
    if not 0 <= options.filter < channels:
      raise UserError(f"config.viz.top_images.filter={options.filter}: {path[-1]} has {channels} filters")
    return figures.top_images(subject, split.read(0, split.size)["image"], path, options.filter, options.k, out)

  filter_paths = [p for p in chosen if p in conv_paths] if names else conv_paths[:1] + conv_paths[-1:]
  filter_options = dict(viz.filters)
  if not has_features(model, input_shape) and (viz.filters.size != input_shape[0] or viz.filters.octaves > 1):
    # Without `features` the whole model runs, which takes only its input size.
    logging.info("filters: %s has no `features`; patterns of its input size %d", name, input_shape[0])
    filter_options.update(size=input_shape[0], octaves=1)
  gradcam_layer = by_name.get(viz.gradcam.layer, last_conv)

  def gradcam():
    logging.info("gradcam of layer %s", "/".join(gradcam_layer))
    return figures.gradcam(subject, gradcam_layer, out)

  return (
    subject,
    prob,
    {
      "activations": lambda: figures.layer_activations(subject, chosen, out),
      "first_layer": lambda: figures.first_layer_kernels(variables, conv_paths[0], out),
      "filters": lambda: figures.filter_patterns(subject, filter_paths, out, seed=viz.seed, **filter_options),
      "top_images": top_images,
      "gradcam": gradcam,
      "saliency": lambda: figures.saliency_maps(subject, out, seed=viz.seed, **viz.saliency),
      "occlusion": lambda: figures.occlusion_map(subject, out, **viz.occlusion),
    },
  )


if __name__ == "__main__":
  cli.run(main)
