"""Transfer learning glue: ImageNet weights by model name, starting params, feature extraction.

  imagenet_weights(model_name, include_top) -> path of Keras' .h5 for it
  weights_file(weights, model_name, model)  -> the .h5 that config weights name for a model
  starting_params(config, params)           -> params from config.pretrained / config.init_from
  make_extractor(config, image_shape)       -> (extract(images uint8) -> features, feature shape)
  feature_split(split, extract, cache_dir)  -> the split with features instead of pixels,
                                               computed once and cached on disk
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from convjax.data.splits import Split
from convjax.errors import UserError
from convjax.models import apply_features, get_model
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


def latest_params(workdir: str) -> dict:
  """{'params': ..., 'model_state': ...} (numpy) of a run's latest checkpoint."""
  from convjax.train import checkpoint
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  steps = sorted(int(p) for p in os.listdir(directory) if p.isdigit()) if os.path.isdir(directory) else []
  if not steps:
    raise UserError(f"config.init_from={workdir!r} has no checkpoints")
  path = os.path.join(directory, str(steps[-1]), "state")
  state = checkpoint.read_state(path)
  logging.info("starting from %s (epoch %d)", path, steps[-1])
  return jax.device_get({"params": state["params"], "model_state": state["model_state"]})


def _same_structure(a, b, what: str):
  sa = jax.tree_util.tree_map(lambda x: tuple(x.shape), a)
  sb = jax.tree_util.tree_map(lambda x: tuple(x.shape), b)
  if sa != sb:
    raise UserError(f"{what} does not fit the model (different parameter names or shapes)")


def starting_params(config, params, model_state):
  """(params, model_state) to start a fresh run from, after config.pretrained / init_from."""
  if config.init_from:
    start = latest_params(config.init_from)
    _same_structure(start["params"], jax.device_get(params), f"config.init_from={config.init_from!r}")
    return start["params"], start["model_state"] or model_state
  if config.pretrained.weights:
    path = weights_file(config.pretrained.weights, config.model,
                        get_model(config.model, **config.model_kwargs))
    return keras_h5.load_into(params, path, under=config.pretrained.under), model_state
  return params, model_state


def make_extractor(config, image_shape: tuple, batch: int = 50):
  """The frozen conv base of config.feature_extractor with its weights, as a host function."""
  from convjax.train.config import input_transform
  name = config.feature_extractor.model
  base = get_model(name)
  if getattr(base, "include_top", False):  # a VGG with Keras' top: its conv base
    base = base.clone(include_top=False)
  x = jnp.zeros((1, *image_shape))
  variables = jax.eval_shape(lambda: base.init(jax.random.key(0), x))
  shape = jax.eval_shape(lambda v: apply_features(base, v, x), variables).shape[1:]
  prepare = input_transform(config)

  def extract(images: np.ndarray) -> np.ndarray:
    params = base.init(jax.random.key(0), x)["params"]
    weights = config.feature_extractor.weights
    if weights:
      params = keras_h5.load_into(params, weights_file(weights, name, base), under="features",
                                  strict=False)
    run = jax.jit(lambda p, imgs: apply_features(base, {"params": p}, prepare(imgs.astype(jnp.float32))))
    out = np.zeros((len(images), *shape), np.float32)
    for i in range(0, len(images), batch):
      chunk = images[i:i + batch]
      padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
      out[i:i + len(chunk)] = np.asarray(run(params, padded))[:len(chunk)]
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
      os.makedirs(cache_dir, exist_ok=True)
      tmp = path + ".tmp.npy"
      np.save(tmp, features)
      os.replace(tmp, path)
    return {"image": features, "label": rows["label"]}

  return split._replace(read=read, spec=f"features of {split.spec}")
