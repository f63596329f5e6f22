"""Depthwise-separable convolutions: MobileNet v1 and a small Xception-style network.

A depthwise-separable convolution is a depthwise k x k convolution (one filter
per input channel: k*k*c_in weights) followed by a 1x1 pointwise convolution
(c_in*c_out): k*k*c_in + c_in*c_out weights instead of a full convolution's
k*k*c_in*c_out, about 1/c_out + 1/k^2 of the cost.

`mobilenet` is Howard et al. 2017 as keras.applications.MobileNet (alpha 1.0,
224x224): BatchNorm (eps 1e-3) and ReLU6 after every convolution, a 1x1
convolution as classifier. Keras counts 4,253,864 parameters at 1000 classes,
of which 21,888 are BatchNorm moving statistics (here: the 'batch_stats'
collection), 4,231,976 trainable.

`xception_small` stacks Xception-style residual blocks (Chollet 2017): two
ReLU -> SeparableConv -> BatchNorm pairs, a 3x3/2 max pool, and a strided 1x1
convolution on the shortcut.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from convjax.models import layers
from convjax.models.resnet import GlobalPoolHead

KerasBatchNorm = functools.partial(layers.BatchNorm, momentum=0.99, epsilon=1e-3)

# (pointwise filters, depthwise stride) of MobileNet v1's 13 separable blocks.
MOBILENET_BLOCKS = (
  (64, 1),
  (128, 2),
  (128, 1),
  (256, 2),
  (256, 1),
  (512, 2),
  (512, 1),
  (512, 1),
  (512, 1),
  (512, 1),
  (512, 1),
  (1024, 2),
  (1024, 1),
)


class SeparableConv2D(nn.Module):
  """Depthwise k x k (no bias) then pointwise 1x1, as keras.layers.SeparableConv2D."""

  filters: int
  kernel_size: int = 3
  strides: int = 1
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    k, s = (self.kernel_size, self.kernel_size), (self.strides, self.strides)
    x = nn.Conv(x.shape[-1], k, s, padding="SAME", feature_group_count=x.shape[-1], use_bias=False, name="depthwise")(x)
    return nn.Conv(self.filters, (1, 1), use_bias=self.use_bias, name="pointwise")(x)


class MobileNetFeatures(nn.Module):
  alpha: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(KerasBatchNorm, use_running_average=not train)
    width = lambda f: int(f * self.alpha)  # noqa: E731
    # Keras pads (0, 1) before its strided convolutions ('valid' afterwards).
    pad = lambda y: jnp.pad(y, ((0, 0), (0, 1), (0, 1), (0, 0)))  # noqa: E731
    x = nn.Conv(width(32), (3, 3), (2, 2), padding="VALID", use_bias=False, name="conv1")(pad(x))
    x = nn.relu6(norm(name="conv1_bn")(x))
    for i, (filters, stride) in enumerate(MOBILENET_BLOCKS, start=1):
      if stride == 2:
        x = pad(x)
      c = x.shape[-1]
      x = nn.Conv(
        c,
        (3, 3),
        (stride, stride),
        padding="SAME" if stride == 1 else "VALID",
        feature_group_count=c,
        use_bias=False,
        name=f"conv_dw_{i}",
      )(x)
      x = nn.relu6(norm(name=f"conv_dw_{i}_bn")(x))
      x = nn.Conv(width(filters), (1, 1), use_bias=False, name=f"conv_pw_{i}")(x)
      x = nn.relu6(norm(name=f"conv_pw_{i}_bn")(x))
    return x


class MobileNet(nn.Module):
  num_classes: int = 1000
  alpha: float = 1.0
  dropout_rate: float = 1e-3  # Keras' default

  def setup(self):
    self.features = MobileNetFeatures(self.alpha)
    self.head = GlobalPoolHead(self.num_classes, self.dropout_rate)  # Dense == Keras' 1x1 conv

  def __call__(self, x, train: bool = False):
    return self.head(self.features(x, train=train), train=train)


class XceptionBlock(nn.Module):
  """[ReLU] -> SeparableConv -> BN -> ReLU -> SeparableConv -> BN -> MaxPool 3x3/2, plus a
  strided 1x1 conv + BN shortcut."""

  filters: int
  first_relu: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(KerasBatchNorm, use_running_average=not train)
    shortcut = nn.Conv(self.filters, (1, 1), (2, 2), padding="SAME", use_bias=False, name="shortcut")(x)
    shortcut = norm(name="shortcut_bn")(shortcut)
    y = nn.relu(x) if self.first_relu else x
    y = norm(name="sepconv1_bn")(SeparableConv2D(self.filters, use_bias=False, name="sepconv1")(y))
    y = nn.relu(y)
    y = norm(name="sepconv2_bn")(SeparableConv2D(self.filters, use_bias=False, name="sepconv2")(y))
    y = layers.max_pool(y, (3, 3), (2, 2), "SAME")
    return y + shortcut


class XceptionSmallFeatures(nn.Module):
  stem: int = 32
  block_filters: Sequence[int] = (64, 128, 256)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.stem, (3, 3), (2, 2), padding="SAME", use_bias=False, name="stem")(x)
    x = nn.relu(KerasBatchNorm(use_running_average=not train, name="stem_bn")(x))
    for i, f in enumerate(self.block_filters):
      x = XceptionBlock(f, first_relu=i > 0, name=f"block{i + 1}")(x, train)
    x = SeparableConv2D(self.block_filters[-1] * 2, use_bias=False, name="exit_sepconv")(x)
    return nn.relu(KerasBatchNorm(use_running_average=not train, name="exit_bn")(x))


class XceptionSmall(nn.Module):
  num_classes: int = 10
  stem: int = 32
  block_filters: Sequence[int] = (64, 128, 256)
  dropout_rate: float = 0.5

  def setup(self):
    self.features = XceptionSmallFeatures(self.stem, self.block_filters)
    self.head = GlobalPoolHead(self.num_classes, self.dropout_rate)

  def __call__(self, x, train: bool = False):
    return self.head(self.features(x, train=train), train=train)
