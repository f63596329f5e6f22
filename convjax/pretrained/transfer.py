"""Transfer learning glue: ImageNet weights by model name, and feature extraction.

imagenet_weights(model_name, include_top) -> path of Keras' .h5 for it
weights_file(weights, model_name, model)  -> the .h5 that config weights name for a model
feature_source(source, extractor, data, cache_dir)
                                          -> the data source with the frozen base's outputs
                                             instead of pixels, computed once, cached on disk
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from convjax import files
from convjax.data.preprocess import input_transform
from convjax.data.splits import Source, Split
from convjax.errors import UserError
from convjax.models import apply_features, get_model, init_variables
from convjax.models.vgg import VGG, VGGClassifier
from convjax.pretrained import fetch, keras_h5

IMAGENET = {"vgg16", "vgg19"}


def imagenet_weights(model_name: str, include_top: bool) -> str:
  if model_name not in IMAGENET:
    raise UserError(f"no ImageNet weights for model {model_name!r}; known: {', '.join(sorted(IMAGENET))}")
  suffix = "" if include_top else "_notop"
  return fetch.get_file(f"{model_name}_weights_tf_dim_ordering_tf_kernels{suffix}.h5")


def weights_file(weights: str, model_name: str, model) -> str:
  """The Keras .h5 that `weights` names for `model`: a local path or URL as given, or for
  'imagenet' Keras' file of the VGG of the model's depth (vgg16, vgg16_base and
  vgg16_classifier all take VGG16's), with the top only if the model has Keras' top."""
  if weights != "imagenet":
    return fetch.get_file(os.path.basename(weights), weights)
  name = f"vgg{model.depth}" if isinstance(model, (VGG, VGGClassifier)) else model_name
  return imagenet_weights(name, include_top=getattr(model, "include_top", False))


def params_from_file(weights: str, model_name: str, model, image_shape: tuple):
  """The model's params, every one read from the Keras .h5 `weights` names (weights_file): no
  random init runs, the params' shapes suffice (VGG16 with its top is 138M parameters)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))["params"]
  return keras_h5.load_into(shapes, weights_file(weights, model_name, model))


def base_model(extractor):
  """config.feature_extractor's model; a VGG with Keras' top gives its conv base."""
  base = get_model(extractor.model)
  if getattr(base, "include_top", False):  # a VGG with Keras' top: its conv base
    base = base.clone(include_top=False)
  return base


def frozen_base(extractor, image_shape: tuple):
  """(apply(params, x) -> features, params) of config.feature_extractor's frozen conv base,
  its weights loaded; x is the model input (preprocessed pixels)."""
  base = base_model(extractor)
  params = init_variables(base, jax.random.key(0), image_shape)["params"]
  if extractor.weights:
    params = keras_h5.load_into(
      params, weights_file(extractor.weights, extractor.model, base), under="features", strict=False
    )
  return (lambda p, x: apply_features(base, {"params": p}, x)), params


def make_extractor(extractor, data, image_shape: tuple, batch: int = 50):
  """The frozen conv base of config.feature_extractor with its weights, as a host function
  of uint8 images (config.data's preprocessing applied), and its output shape. The weights
  are read at the first call (a cached extraction needs none)."""
  base = base_model(extractor)
  x = jnp.zeros((1, *image_shape))
  variables = jax.eval_shape(lambda: base.init(jax.random.key(0), x))
  shape = jax.eval_shape(lambda v: apply_features(base, v, x), variables).shape[1:]
  prepare = input_transform(data.rescale, data.preprocess)

  def extract(images: np.ndarray) -> np.ndarray:
    apply, params = frozen_base(extractor, image_shape)
    run = jax.jit(lambda p, imgs: apply(p, prepare(imgs.astype(jnp.float32))))
    out = np.zeros((len(images), *shape), np.float32)
    for i in range(0, len(images), batch):
      chunk = images[i : i + batch]
      padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
      out[i : i + len(chunk)] = np.asarray(run(params, padded))[: len(chunk)]
    return out

  return extract, tuple(shape)


def feature_split(name: str, split: Split, extract, cache_dir: str) -> Split:
  """`split` with each row's image replaced by its features, cached as <cache_dir>/<name>_a_b.npy."""

  def read(a: int, b: int) -> dict:
    rows = split.read(a, b)
    path = os.path.join(cache_dir, f"{name}_{a}_{b}.npy")
    if os.path.exists(path):
      features = np.load(path)
    else:
      logging.info("extracting features of %s rows %d:%d", name, a, b)
      features = extract(rows["image"])
      files.make_dir(cache_dir)
      with files.output(path, "wb") as f:
        np.save(f, features)
    return {"image": features, "label": rows["label"]}

  return split._replace(read=read, spec=f"features of {split.spec}")


def feature_source(source: Source, extractor, data, cache_dir: str) -> Source:
  """`source` as the frozen base of config.feature_extractor sees it: each split's images
  replaced by the base's outputs, extracted once per split and cached in `cache_dir`."""
  extract, shape = make_extractor(extractor, data, source.image_shape)

  def splits(stream: bool = False):
    return {name: feature_split(name, split, extract, cache_dir) for name, split in source.splits().items()}

  return source._replace(
    description=f"{extractor.model} features of {source.description}", image_shape=shape, splits=splits, streams=False
  )
