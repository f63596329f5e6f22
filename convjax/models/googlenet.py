"""GoogLeNet / Inception v1 (Szegedy et al. 2014) as torchvision builds it.

Inception modules run four branches side by side and concatenate them: 1x1;
1x1 bottleneck -> 3x3; 1x1 bottleneck -> "5x5"; 3x3 max pool -> 1x1. The 1x1
bottlenecks cut the channels before the expensive convolutions. As in
torchvision (whose count we match: 6,624,904 params at 1000 classes, without
the auxiliary classifiers), every convolution is followed by BatchNorm and the
"5x5" branch uses a 3x3 kernel; pooling rounds up (ceil_mode); global average
pooling and dropout 0.2 precede the classifier.
"""

import flax.linen as nn
import jax.numpy as jnp

from convjax.models import layers
from convjax.models.resnet import GlobalPoolHead

# (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) per module, from the paper's table 1.
INCEPTION = {
  "inception3a": (64, 96, 128, 16, 32, 32),
  "inception3b": (128, 128, 192, 32, 96, 64),
  "inception4a": (192, 96, 208, 16, 48, 64),
  "inception4b": (160, 112, 224, 24, 64, 64),
  "inception4c": (128, 128, 256, 24, 64, 64),
  "inception4d": (112, 144, 288, 32, 64, 64),
  "inception4e": (256, 160, 320, 32, 128, 128),
  "inception5a": (256, 160, 320, 32, 128, 128),
  "inception5b": (384, 192, 384, 48, 128, 128),
}


def max_pool_ceil(x, window: int, stride: int, padding: int = 0):
  """Max pooling whose output size rounds up, like PyTorch's ceil_mode=True."""
  pads = []
  for n in x.shape[1:3]:
    out = -(-(n + 2 * padding - window) // stride) + 1
    if (out - 1) * stride >= n + padding:  # PyTorch: the last window must start inside
      out -= 1
    pads.append((padding, (out - 1) * stride + window - n - padding))
  return layers.max_pool(x, (window, window), (stride, stride), pads)


class BasicConv(nn.Module):
  """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

  filters: int
  kernel: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    k, s = (self.kernel, self.kernel), (self.strides, self.strides)
    x = nn.Conv(self.filters, k, s, padding=self.kernel // 2, use_bias=False, name="conv")(x)
    x = layers.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


class Inception(nn.Module):
  c1: int
  c3_reduce: int
  c3: int
  c5_reduce: int
  c5: int
  pool_proj: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    b1 = BasicConv(self.c1, 1, name="branch1")(x, train)
    b2 = BasicConv(self.c3_reduce, 1, name="branch2_reduce")(x, train)
    b2 = BasicConv(self.c3, 3, name="branch2")(b2, train)
    b3 = BasicConv(self.c5_reduce, 1, name="branch3_reduce")(x, train)
    b3 = BasicConv(self.c5, 3, name="branch3")(b3, train)  # torchvision: 3x3, not 5x5
    b4 = max_pool_ceil(x, 3, 1, padding=1)
    b4 = BasicConv(self.pool_proj, 1, name="branch4")(b4, train)
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class GoogLeNetFeatures(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = BasicConv(64, 7, 2, name="conv1")(x, train)
    x = max_pool_ceil(x, 3, 2)
    x = BasicConv(64, 1, name="conv2")(x, train)
    x = BasicConv(192, 3, name="conv3")(x, train)
    x = max_pool_ceil(x, 3, 2)
    for name, widths in INCEPTION.items():
      if name in ("inception4a", "inception5a"):
        x = max_pool_ceil(x, 3 if name == "inception4a" else 2, 2)
      x = Inception(*widths, name=name)(x, train)
    return x


class GoogLeNet(nn.Module):
  num_classes: int = 1000
  dropout_rate: float = 0.2

  def setup(self):
    self.features = GoogLeNetFeatures()
    self.head = GlobalPoolHead(self.num_classes, self.dropout_rate)

  def __call__(self, x, train: bool = False):
    return self.head(self.features(x, train=train), train=train)
