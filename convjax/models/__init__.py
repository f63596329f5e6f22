"""Models by name: `get_model(name, **overrides)` returns a Linen module.

Every model maps images (B, H, W, C) to logits (B, num_classes); a model with
num_classes=1 is a binary classifier (one sigmoid logit). Each model is
`head(features(x))` with its params under 'features/...' and 'head/...';
`apply_features` and `apply_head` run either half alone. `with_num_classes` fits a
model's class count to a dataset's.
"""

import functools

from absl import logging

from convjax.errors import UserError
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


def apply_features(model, variables, x):
  """The model's feature extractor (the conv base): `model.features(x)`."""
  return model.apply(variables, x, method=lambda m, x: m.features(x))


def apply_head(model, variables, features, train: bool = False, rngs=None):
  """The model's classifier on features: logits."""
  return model.apply(variables, features, rngs=rngs, method=lambda m, f: m.head(f, train=train))


def get_model(name: str, **overrides):
  if name not in MODELS:
    raise UserError(f"unknown model {name!r}; valid models: {', '.join(sorted(MODELS))}")
  try:
    return MODELS[name](**overrides)
  except TypeError as e:
    raise UserError(f"model {name!r}: bad model_kwargs {sorted(overrides)}: {e}") from None


def with_num_classes(name: str, kwargs: dict, num_classes: int) -> dict:
  """`kwargs` for model `name` with num_classes set: the dataset's `num_classes`, unless
  kwargs set it (then it must cover the dataset). A model with one output (a sigmoid binary
  classifier) fits two classes. Models without num_classes (a conv base) are left as they are."""
  current = getattr(get_model(name, **kwargs), "num_classes", None)
  if current is None or not num_classes:
    return dict(kwargs)
  if current == num_classes or (current == 1 and num_classes == 2):
    return {**kwargs, "num_classes": current}
  if "num_classes" in kwargs:
    if current < num_classes:
      raise UserError(f"config.model_kwargs.num_classes={current} but the dataset has {num_classes} classes")
    return dict(kwargs)
  logging.info("model %s: num_classes %d -> %d, the dataset's", name, current, num_classes)
  return {**kwargs, "num_classes": num_classes}
