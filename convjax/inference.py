"""Using a trained run: its classifier as one pure function of uint8 images, image files read
as its data were, and predictions in fixed-size batches over every device.

  classifier = from_run(workdir, weights="tested")   # or pretrained("vgg16")
  images, files, skipped = read_images(list_images("photos/"), classifier)
  probabilities = Predictor(classifier, mesh, batch_size)(images)

`Classifier.forward(variables, images)` is the whole path from stored pixels to class
probabilities (the run's pixel transform, a feature-extraction run's frozen base, the
model in inference mode in the run's compute dtype, softmax; a one-logit sigmoid head
gives p, the probability of class 1, as Keras' predict does), the same computation the training loop evaluates: experiments.predict,
experiments.evaluate and the export all call it.
"""

import contextlib
import glob
import importlib.metadata
import io
import logging as std_logging
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from convjax import files, parallel, run
from convjax.data.folders import IMAGE_EXTENSIONS, decode_image
from convjax.data.preprocess import Fit, input_transform
from convjax.data.splits import fit_for, open_source
from convjax.errors import UserError
from convjax.models import get_model
from convjax.pretrained import imagenet, transfer
from convjax.train.steps import cast_floats

EXTENSIONS = IMAGE_EXTENSIONS + (".tif", ".tiff", ".webp")


class Classifier(NamedTuple):
  name: str  # the run's workdir, or the pretrained model's name
  model: Any  # the Linen module (the head of a feature-extraction run)
  prepare: Callable  # float pixels (0-255) -> the model's input (the run's rescale and preprocess)
  forward: Callable  # (variables, uint8 (B, H, W, C)) -> float32 probabilities (B, K);
  # a sigmoid head (B, 1): the probability of classes[1]
  variables: Any  # numpy pytree: what forward takes
  image_shape: tuple  # (H, W, C) of the model's input
  fit: Fit  # one stored image -> the input size (the run's evaluation crop)
  classes: tuple  # class names (label i is classes[i])
  binary: bool  # a sigmoid head
  preprocessing: dict  # how pixels become the model's input, for the export's JSON


def make_forward(model, prepare: Callable, compute_dtype=jnp.float32, base: Callable = None) -> Callable:
  """forward(variables, images) of the module `model`: variables {'model': its variables,
  'base': a frozen base's params (with `base`: apply(params, x) -> features)}."""

  def forward(variables, images):
    x = prepare(images.astype(jnp.float32))
    if base is not None:
      x = base(variables["base"], x)
    logits = model.apply(cast_floats(variables["model"], compute_dtype), x.astype(compute_dtype), train=False)
    logits = logits.astype(jnp.float32)
    return jax.nn.sigmoid(logits) if logits.shape[-1] == 1 else jax.nn.softmax(logits, axis=-1)

  return forward


def run_input(config) -> tuple:
  """(data source, input shape (H, W, C), fit, prepare) of a run: how every reader of it
  (predict, evaluate, visualize) turns an image file into the model's input, as the run's
  evaluation did: decoded to its channels, centre-cropped where it cropped, resized to its
  size (fit), then its pixel transform (prepare, inside the jitted function)."""
  data = config.data
  source = open_source(data)
  shape = tuple(source.image_shape)
  fit = Fit(shape[:2], (), center_crop=fit_for(data).center_crop)
  return source, shape, fit, input_transform(data.rescale, data.preprocess)


def from_run(workdir: str, weights: str = "tested") -> Classifier:
  """The classifier of the run in `workdir` with the weights `weights` names (run.WEIGHTS),
  reading images as its evaluation did."""
  config, model, variables, _, _ = run.read_run(workdir, weights)
  data = config.data
  source, shape, fit, prepare = run_input(config)
  base, all_variables = None, {"model": variables}
  if config.feature_extractor.model:  # the model is the head: the base's outputs are its input
    base, all_variables["base"] = transfer.frozen_base(config.feature_extractor, shape)
  forward = make_forward(model, prepare, jnp.dtype(config.compute_dtype), base)
  width = jax.eval_shape(forward, all_variables, jax.ShapeDtypeStruct((1, *shape), jnp.uint8)).shape[-1]
  classes = tuple(source.classes) or tuple(str(i) for i in range(max(width, 2)))
  return Classifier(
    workdir,
    model,
    prepare,
    forward,
    jax.device_get(all_variables),
    shape,
    fit,
    classes,
    width == 1,
    {"rescale": data.rescale, "preprocess": data.preprocess, "center_crop": data.center_crop, "resize": "bilinear"},
  )


def pretrained(name: str) -> Classifier:
  """An ImageNet model with Keras' weights and top (vgg16, vgg19): 224x224 RGB, 'caffe'."""
  model = get_model(name)
  if not getattr(model, "include_top", False):
    raise UserError(f"--model={name} has no ImageNet classifier top: use vgg16 or vgg19")
  params = transfer.params_from_file("imagenet", name, model, (224, 224, 3))
  index = imagenet.class_index()
  classes = tuple(index[i][1] for i in range(len(index)))
  prepare = input_transform(1.0, "caffe")
  return Classifier(
    name,
    model,
    prepare,
    make_forward(model, prepare),
    jax.device_get({"model": {"params": params}}),
    (224, 224, 3),
    Fit((224, 224)),
    classes,
    False,
    {"rescale": 1.0, "preprocess": "caffe", "center_crop": 0.0, "resize": "bilinear"},
  )


def folder_class(path: str, classes: tuple) -> int:
  """The class an image file's folder names (its label in a Keras-style folder), or -1."""
  folder = os.path.basename(os.path.dirname(path))
  return classes.index(folder) if folder in classes else -1


def list_images(spec: str) -> list:
  """The image files `spec` names: a file, a folder (recursively) or a glob, sorted."""
  if os.path.isdir(spec):
    files = [os.path.join(d, f) for d, _, names in os.walk(spec) for f in names if f.lower().endswith(EXTENSIONS)]
  elif os.path.isfile(spec):
    files = [spec]
  else:
    files = [f for f in glob.glob(spec, recursive=True) if os.path.isfile(f)]
  if not files:
    raise UserError(f"--images={spec!r} names no image file ({', '.join(EXTENSIONS)} in a folder, a file or a glob)")
  return sorted(files)


def read_images(files: list, classifier: Classifier) -> tuple:
  """(uint8 (N, H, W, C) at the classifier's input size, the files read, [(file, why)] of
  those that could not be read): each decoded, converted and fitted as the run's data were."""
  images, read, skipped = [], [], []
  channels = classifier.image_shape[-1]
  for path in files:
    try:
      images.append(classifier.fit(decode_image(path, channels, None)))
      read.append(path)
    except UserError as e:
      skipped.append((path, str(e)))
  for _, why in skipped:
    logging.warning("skipped %s", why)
  stacked = np.stack(images) if images else np.zeros((0, *classifier.image_shape), np.uint8)
  return stacked, read, skipped


class Predictor:
  """probabilities = predictor(uint8 images (N, H, W, C)): batches of `batch_size` (the last
  padded) through one compiled program over `mesh`, batches sharded, weights replicated."""

  def __init__(self, classifier: Classifier, mesh, batch_size: int):
    if batch_size % mesh.size:
      raise UserError(f"--batch_size={batch_size} is not divisible by the {mesh.size} devices in use")
    self.mesh, self.batch_size, self.shape = mesh, batch_size, tuple(classifier.image_shape)
    self.binary = classifier.binary
    self.variables = parallel.put_replicated_tree(mesh, classifier.variables)
    self._forward = jax.jit(classifier.forward, out_shardings=parallel.replicated(mesh))

  def __call__(self, images: np.ndarray) -> np.ndarray:
    if images.shape[1:] != self.shape:
      raise ValueError(f"images of shape {images.shape[1:]}, the model takes {self.shape}")
    out, b = [], self.batch_size
    for start in range(0, len(images), b):
      chunk = images[start : start + b]
      batch = np.zeros((b, *self.shape), np.uint8)
      batch[: len(chunk)] = chunk
      global_batch = jax.make_array_from_callback(
        batch.shape, parallel.sharded(self.mesh), lambda i, batch=batch: batch[i]
      )
      out.append(np.asarray(self._forward(self.variables, global_batch))[: len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def class_probabilities(probabilities: np.ndarray) -> np.ndarray:
  """(N, K) probabilities of every class; a sigmoid head's (N, 1) p becomes (1 - p, p)."""
  return np.concatenate([1 - probabilities, probabilities], -1) if probabilities.shape[-1] == 1 else probabilities


def top_k(probabilities: np.ndarray, classifier: Classifier, k: int) -> list:
  """For each row, [(class index, name, probability)] of the k most probable classes (k
  capped at the class count; a sigmoid head: its one predicted class)."""
  k = 1 if classifier.binary else min(k, probabilities.shape[-1])
  probabilities = class_probabilities(probabilities)
  best = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
  return [
    [(int(i), classifier.classes[i], float(row[i])) for i in order]
    for row, order in zip(probabilities, best, strict=True)
  ]


EXPORT_FORMATS = ("jax", "onnx")


def export(classifier: Classifier, directory: str, weights: str = "", export_format: str = "jax") -> tuple:
  """Writes classifier.forward with its weights as constants and a symbolic batch size, as
  <directory>/model.jax (export_format 'jax': a jax.export serialization, StableHLO; loading
  needs only jax: jax.export.deserialize(bytes).call(uint8 images)) or <directory>/model.onnx
  ('onnx': loading needs only onnxruntime), and <directory>/model.json (input shape and
  dtype, output, class names, preprocessing). Returns the two paths."""
  if export_format not in EXPORT_FORMATS:
    raise UserError(f"unknown export format {export_format!r}; valid: {', '.join(EXPORT_FORMATS)}")
  variables = classifier.variables
  serve = jax.jit(lambda images: classifier.forward(variables, images))
  write = _onnx_model if export_format == "onnx" else _jax_module
  module, meta = write(serve, classifier, files.make_dir(directory))
  out = jax.eval_shape(serve, jax.ShapeDtypeStruct((1, *classifier.image_shape), jnp.uint8))
  files.write_json(
    os.path.join(directory, "model.json"),
    {
      "model": classifier.name,
      "weights": weights,
      "format": export_format,
      **meta,
      "input": {
        "shape": [None, *classifier.image_shape],
        "dtype": "uint8",
        "meaning": "RGB (or grey) pixels 0-255, already resized to the input size",
      },
      "output": {
        "shape": [None, int(out.shape[-1])],
        "dtype": str(out.dtype),
        "meaning": (
          "sigmoid probability of classes[1]" if classifier.binary else "softmax probabilities, one per class"
        ),
      },
      "classes": list(classifier.classes),
      "preprocessing": classifier.preprocessing,
    },
  )
  return module, os.path.join(directory, "model.json")


def _jax_module(serve, classifier: Classifier, directory: str) -> tuple:
  from jax import export as jax_export

  batch = jax_export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((*batch, *classifier.image_shape), jnp.uint8)
  exported = jax_export.export(serve, platforms=("cpu", "cuda"))(spec)
  module = os.path.join(directory, "model.jax")
  files.write_bytes(module, exported.serialize())
  load = "jax.export.deserialize(open('model.jax', 'rb').read()).call(images)"
  return module, {"platforms": list(exported.platforms), "load": load}


def _onnx_model(serve, classifier: Classifier, directory: str) -> tuple:
  """model.onnx by jax2onnx: input 'images' (batch, H, W, C) uint8, output 'probabilities'."""
  # jax2onnx logs a traceback for each optional plugin its jax cannot load (dm_pix's, 0.12 on
  # jax 0.10) and prints a DEBUG line per conv: none of it concerns the export.
  quiet = [std_logging.getLogger(name) for name in ("jax2onnx", "onnx_ir")]
  levels = [logger.level for logger in quiet]
  for logger in quiet:
    logger.setLevel(std_logging.ERROR)
  version = "?"
  try:
    try:
      import jax2onnx
    except ImportError:
      raise UserError("--export_format=onnx needs jax2onnx: pip install 'convjax[onnx]'") from None
    version = importlib.metadata.version("jax2onnx")
    spec = jax.ShapeDtypeStruct(("batch", *classifier.image_shape), jnp.uint8)
    with contextlib.redirect_stdout(io.StringIO()):
      proto = jax2onnx.to_onnx(
        serve, [spec], model_name="convjax", input_names=["images"], output_names=["probabilities"]
      )
  except UserError:
    raise
  except Exception as e:  # what jax2onnx cannot convert: one error naming the model and why
    reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise UserError(
      f"{classifier.name}: jax2onnx {version} cannot convert this model to ONNX ({type(e).__name__}: "
      f"{reason}); --export_format=jax exports it"
    ) from None
  finally:
    for logger, level in zip(quiet, levels, strict=True):
      logger.setLevel(level)
  # jax2onnx labels some intermediate NCHW tensors with their NHWC shapes (ResNet's residual
  # sums then fail onnxruntime's load); the labels are optional, and onnxruntime infers them.
  del proto.graph.value_info[:]
  module = os.path.join(directory, "model.onnx")
  files.write_bytes(module, proto.SerializeToString())
  load = "onnxruntime.InferenceSession('model.onnx').run(['probabilities'], {'images': images})[0]"
  return module, {"converter": f"jax2onnx {version}", "opset": int(proto.opset_import[0].version), "load": load}


class Evaluation(NamedTuple):
  labels: np.ndarray  # (N,) int
  probabilities: np.ndarray  # (N, K) of every class (a sigmoid head's as (1 - p, p))
  predicted: np.ndarray  # (N,) the training loop's prediction (argmax; a sigmoid head: p > 0.5)
  loss: np.ndarray  # (N,) cross-entropy, as the loop computes it (from probabilities)
  wrong: list  # [(confidence, row, image)] of the most confidently wrong, best first


def evaluate_split(split, predictor: Predictor, keep_wrong: int = 16) -> Evaluation:
  """Every row of a data Split (convjax.data.splits) through `predictor`, read a batch at a
  time; keeps the images of the `keep_wrong` most confidently wrong predictions."""
  labels, probabilities, wrong = [], [], []
  for start in range(0, split.size, predictor.batch_size):
    rows = split.read(start, min(start + predictor.batch_size, split.size))
    p = predictor(rows["image"])
    predicted = (p[:, 0] > 0.5).astype(np.int64) if p.shape[-1] == 1 else np.argmax(p, -1)
    full = class_probabilities(p)
    for i in np.flatnonzero(predicted != rows["label"]):
      wrong.append((float(full[i, predicted[i]]), start + int(i), rows["image"][i]))
    wrong = sorted(wrong, key=lambda w: -w[0])[:keep_wrong]
    labels.append(np.asarray(rows["label"], np.int64))
    probabilities.append(full)
  labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
  full = np.concatenate(probabilities) if probabilities else np.zeros((0, 2), np.float32)
  binary = predictor.binary
  predicted = (full[:, 1] > 0.5).astype(np.int64) if binary else np.argmax(full, -1)
  eps = 1e-7  # Keras' clip of probabilities in its cross-entropy
  loss = -np.log(np.clip(full[np.arange(len(labels)), labels], eps, 1.0))
  return Evaluation(labels, full, predicted, loss, wrong)


def metrics(result: Evaluation, classes: tuple) -> dict:
  """Loss, accuracy, top-5 accuracy (more than 5 classes), the confusion matrix (rows: true)
  and per-class precision, recall and support."""
  k = len(classes)
  confusion = np.zeros((k, k), np.int64)
  np.add.at(confusion, (result.labels, result.predicted), 1)
  out = {
    "count": int(len(result.labels)),
    "loss": float(np.mean(result.loss)) if len(result.loss) else 0.0,
    "accuracy": float(np.mean(result.predicted == result.labels)) if len(result.labels) else 0.0,
  }
  if k > 5:
    top5 = np.argsort(-result.probabilities, axis=-1, kind="stable")[:, :5]
    out["top5_accuracy"] = float(np.mean(np.any(top5 == result.labels[:, None], axis=-1)))
  predicted_count, support = confusion.sum(0), confusion.sum(1)
  out["per_class"] = {
    name: {
      "precision": float(confusion[i, i] / predicted_count[i]) if predicted_count[i] else 0.0,
      "recall": float(confusion[i, i] / support[i]) if support[i] else 0.0,
      "support": int(support[i]),
    }
    for i, name in enumerate(classes)
  }
  out["confusion_matrix"] = confusion.tolist()
  return out
