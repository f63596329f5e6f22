"""AlexNet (Krizhevsky et al. 2012) as one tower at 227x227.

Five convolutions (96 11x11/4, 256 5x5, 384, 384, 256 3x3) with local response
normalisation after the first two, overlapping 3x3/2 max pooling, then
Dense 4096 -> 4096 -> 1000 with dropout 0.5. The paper split conv2/4/5 over two
GPUs (grouped convolutions); as one tower every filter sees every channel,
which gives the commonly quoted 62,378,344 parameters at 1000 classes
(torchvision's variant, 64/192/384/256/256 filters, has 61,100,840).
"""

import flax.linen as nn
import jax.numpy as jnp

from convjax.models.layers import Layer, max_pool


class LocalResponseNorm(Layer):
  """Across-channel LRN: x / (k + alpha * sum over n neighbours of x^2)^beta (paper's constants)."""

  size: int = 5
  k: float = 2.0
  alpha: float = 1e-4
  beta: float = 0.75

  def __call__(self, x):
    half = self.size // 2
    sq = jnp.pad(jnp.square(x), ((0, 0), (0, 0), (0, 0), (half, half)))
    window = sum(sq[..., i : i + x.shape[-1]] for i in range(self.size))
    return x / (self.k + self.alpha * window) ** self.beta


class AlexNetFeatures(nn.Module):
  @nn.compact
  def __call__(self, x):
    def pool(y):
      return max_pool(y, (3, 3), (2, 2))

    x = nn.relu(nn.Conv(96, (11, 11), (4, 4), padding="VALID", name="conv1")(x))
    x = pool(LocalResponseNorm(name="norm1")(x))
    x = nn.relu(nn.Conv(256, (5, 5), padding=2, name="conv2")(x))
    x = pool(LocalResponseNorm(name="norm2")(x))
    x = nn.relu(nn.Conv(384, (3, 3), padding=1, name="conv3")(x))
    x = nn.relu(nn.Conv(384, (3, 3), padding=1, name="conv4")(x))
    x = nn.relu(nn.Conv(256, (3, 3), padding=1, name="conv5")(x))
    return pool(x)


class AlexNetHead(nn.Module):
  num_classes: int
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    for name in ("fc6", "fc7"):
      x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
      x = nn.relu(nn.Dense(4096, name=name)(x))
    return nn.Dense(self.num_classes, name="fc8")(x)


class AlexNet(nn.Module):
  num_classes: int = 1000
  dropout_rate: float = 0.5

  def setup(self):
    self.features = AlexNetFeatures()
    self.head = AlexNetHead(self.num_classes, self.dropout_rate)

  def __call__(self, x, train: bool = False):
    return self.head(self.features(x), train=train)
