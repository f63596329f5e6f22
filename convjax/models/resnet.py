"""ResNet-18/34/50 (He et al. 2015), laid out as torchvision's: BatchNorm after
every convolution (no conv biases), the stride of a bottleneck on its 3x3 conv
("v1.5"), a 1x1 projection shortcut where the shape changes. Parameter counts
equal torchvision's at 1000 classes: 11,689,512 / 21,797,672 / 25,557,032.
BatchNorm statistics are the global batch's: the train step is one SPMD program.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from convjax.models import layers

# torchvision's BatchNorm2d: eps 1e-5, running averages updated with momentum 0.1.
BatchNorm = functools.partial(layers.BatchNorm, momentum=0.9, epsilon=1e-5)
conv = functools.partial(nn.Conv, use_bias=False, conv_general_dilated=layers.conv_general_dilated)


class BasicBlock(nn.Module):
  filters: int
  strides: int = 1
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(BatchNorm, use_running_average=not train)
    s = (self.strides, self.strides)
    y = nn.relu(norm()(conv(self.filters, (3, 3), s, padding=1)(x)))
    y = norm()(conv(self.filters, (3, 3), padding=1)(y))
    if x.shape[-1] != self.filters or self.strides != 1:
      x = norm()(conv(self.filters, (1, 1), s, name="downsample")(x))
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  filters: int
  strides: int = 1
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(BatchNorm, use_running_average=not train)
    s = (self.strides, self.strides)
    out = self.filters * self.expansion
    y = nn.relu(norm()(conv(self.filters, (1, 1))(x)))
    y = nn.relu(norm()(conv(self.filters, (3, 3), s, padding=1)(y)))
    y = norm()(conv(out, (1, 1))(y))
    if x.shape[-1] != out or self.strides != 1:
      x = norm()(conv(out, (1, 1), s, name="downsample")(x))
    return nn.relu(x + y)


class ResNetFeatures(nn.Module):
  """Stem (7x7/2 conv, 3x3/2 max pool) and four stages; returns the last feature map."""

  stage_sizes: Sequence[int]
  block: str = "basic"
  width: int = 64

  @nn.compact
  def __call__(self, x, train: bool = False):
    block = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
    x = conv(self.width, (7, 7), (2, 2), padding=3, name="conv1")(x)
    x = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(x))
    x = layers.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for stage, n in enumerate(self.stage_sizes):
      for i in range(n):
        strides = 2 if stage > 0 and i == 0 else 1
        x = block(self.width * 2**stage, strides, name=f"layer{stage + 1}_{i}")(x, train)
    return x


class GlobalPoolHead(nn.Module):
  """Global average pooling -> [Dropout] -> Dense(num_classes) logits."""

  num_classes: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.mean(x, axis=(1, 2))
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return nn.Dense(self.num_classes, name="fc")(x)


class ResNet(nn.Module):
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"
  width: int = 64
  num_classes: int = 1000
  dropout_rate: float = 0.0

  def setup(self):
    self.features = ResNetFeatures(self.stage_sizes, self.block, self.width)
    self.head = GlobalPoolHead(self.num_classes, self.dropout_rate)

  def __call__(self, x, train: bool = False):
    return self.head(self.features(x, train=train), train=train)
