"""Models by name: `get_model(name, **overrides)` returns a Linen module.

The model contract, for convjax's own models and a researcher's (convjax/models/own.py,
docs/your-own-model.md):
- images (B, H, W, C) float in, logits (B, K) out; one logit is a binary (sigmoid) classifier;
- a `train` keyword is optional (dropout and BatchNorm train with train=True);
- BatchNorm statistics live in the `batch_stats` collection, dropout draws from the
  `dropout` rng;
- a `num_classes` field, if there is one, follows the dataset's class count
  (`with_num_classes`) unless model_kwargs set it;
- `features` and `head` are optional: `head(features(x))` with params under 'features/...'
  and 'head/...' is what feature extraction, a frozen conv base and `apply_features` use,
  and a config that needs them on a model without them is refused by name.
A model is a `flax.linen.Module` or a `flax.nnx.Module` class (constructed with `rngs=`),
the latter adapted by own.nnx_model_class().

A name is one of MODELS (convjax's, and those `register` adds), an installed package's
entry point (group `convjax.models`), `package.module:Class` or `path/to/file.py:Class`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from absl import logging

from convjax.errors import UserError
from convjax.models import own
from convjax.models.alexnet import AlexNet
from convjax.models.googlenet import GoogLeNet
from convjax.models.lenet import LeNet5
from convjax.models.mlp import MLP
from convjax.models.mobilenet import MobileNet, XceptionSmall
from convjax.models.resnet import ResNet
from convjax.models.small_convnet import SmallConvNet
from convjax.models.vgg import VGG, VGGClassifier

MODELS = {
  "small_convnet": SmallConvNet,
  "mnist_convnet": functools.partial(
    SmallConvNet, filters=(32, 64, 64), pool_after=(True, True, False), hidden=(64,), num_classes=10
  ),
  "cats_dogs_convnet": functools.partial(
    SmallConvNet, filters=(32, 64, 128, 128), pool_after=(True,) * 4, hidden=(512,), num_classes=1
  ),
  "notes_cnn": functools.partial(
    SmallConvNet,
    filters=(32, 64, 128, 128),
    pool_after=(False, True, True, True),
    conv_dropout=(0.0, 0.25, 0.0, 0.0),
    dropout_rate=0.25,
    hidden=(1024,),
    hidden_dropout_rate=0.5,
    num_classes=10,
  ),
  "mlp": MLP,
  "mnist_dense": functools.partial(MLP, hidden=(512,), num_classes=10),
  "notes_mlp": functools.partial(MLP, hidden=(512, 512), hidden_dropout_rate=0.2, num_classes=10),
  # The classic architectures; each takes num_classes (and its input size from the data).
  "lenet5": LeNet5,
  "alexnet": AlexNet,
  "vgg11": functools.partial(VGG, depth=11),
  "vgg13": functools.partial(VGG, depth=13),
  "vgg16": functools.partial(VGG, depth=16),
  "vgg19": functools.partial(VGG, depth=19),
  "vgg16_base": functools.partial(VGG, depth=16, include_top=False, pooling="avg"),
  "vgg16_classifier": functools.partial(VGGClassifier, depth=16),  # transfer learning
  "googlenet": GoogLeNet,
  "resnet18": functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block="basic"),
  "resnet34": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="basic"),
  "resnet50": functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck"),
  "mobilenet": MobileNet,
  "xception_small": XceptionSmall,
}
BUILTIN = frozenset(MODELS)


def register(name: str):
  """A class decorator: `@convjax.models.register("tinynet")` makes the model a name."""

  def add(factory):
    if name in MODELS and MODELS[name] is not factory:
      raise UserError(f"model name {name!r} is already taken (by {MODELS[name]})")
    MODELS[name] = factory
    return factory

  return add


def how_named(name: str) -> str:
  """How `name` is found: builtin, registered, entry_point, import or file."""
  if name in MODELS:
    return "builtin" if name in BUILTIN else "registered"
  if own.is_path(name):
    return "file" if own.is_file_name(own.file_and_class(name)[0]) else "import"
  return "entry_point"


def factory_of(name: str):
  """The class (or factory) that `name` names; an unknown name is one UserError."""
  if name in MODELS:
    return MODELS[name]
  if own.is_path(name):
    return own.resolve_path(name)
  if name in own.entry_points():
    return own.load_entry_point(name)
  raise UserError(
    f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}, or your own as "
    f"package.module:Class or path/to/file.py:Class ({own.GUIDE})"
  )


def model_fields(name: str) -> dict:
  """{field: default} of model `name`, a preset's values included (dataclasses.MISSING: none)."""
  return own.fields(factory_of(name))


def has_features(model, input_shape) -> bool:
  """Whether the model is `head(features(x))` (apply_features and a frozen base need it)."""
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  try:
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, method=lambda m, x: m.features(x)), x)
  except AttributeError as e:
    if "features" in str(e):
      return False
  except Exception:  # it has features, which this input does not fit: abstract_params says so
    pass
  return True


# What runs once (a model's random init and the optimizer state around it) compiles at XLA's
# backend optimisation level 1: 2-3x faster than at the default level (MNIST convnet 2.2 -> 0.7 s,
# ResNet-18 5.7 -> 2.3 s, GoogLeNet 14.5 -> 7.8 s; BENCHMARKS.md "A run's start"), with the
# same bits on every built-in model (tests/test_models.py checks two). What runs every step
# keeps the default level.
RUN_ONCE = {"xla_backend_optimization_level": 1}


def init_variables(model, rng, input_shape):
  """`model.init(rng, zeros)` for images of `input_shape`, compiled as RUN_ONCE."""
  return jax.jit(model.init, compiler_options=RUN_ONCE)(rng, jnp.zeros((1, *input_shape), jnp.float32))


def apply_features(model, variables, x):
  """The model's feature extractor (the conv base): `model.features(x)`."""
  return model.apply(variables, x, method=lambda m, x: m.features(x))


def apply_head(model, variables, features, train: bool = False, rngs=None):
  """The model's classifier on features: logits."""
  return model.apply(variables, features, rngs=rngs, method=lambda m, f: m.head(f, train=train))


def get_model(name: str, **overrides):
  """The Linen module `name` names, with `overrides` of its fields (each checked)."""
  return own.build(factory_of(name), name, overrides)


def with_num_classes(name: str, kwargs: dict, num_classes: int) -> dict:
  """`kwargs` for model `name` with num_classes set: the dataset's `num_classes`, unless
  kwargs set it (then it must cover the dataset). A model with one output (a sigmoid binary
  classifier) fits two classes. Models without num_classes (a conv base) are left as they are."""
  fields = model_fields(name)
  if "num_classes" not in fields or not num_classes:
    return dict(kwargs)
  current = kwargs.get("num_classes", fields["num_classes"])
  if current is dataclasses.MISSING or current is None:
    return {**kwargs, "num_classes": num_classes}
  if not isinstance(current, int):
    return dict(kwargs)
  if current == num_classes or (current == 1 and num_classes == 2):
    return {**kwargs, "num_classes": current}
  if "num_classes" in kwargs:
    if current < num_classes:
      raise UserError(f"config.model_kwargs.num_classes={current} but the dataset has {num_classes} classes")
    return dict(kwargs)
  logging.info("model %s: num_classes %d -> %d, the dataset's", name, current, num_classes)
  return {**kwargs, "num_classes": num_classes}
