"""LeNet-5 (LeCun et al. 1998): 32x32x1 -> C1 -> S2 -> C3 -> S4 -> C5 -> F6 -> 10.

tanh activations and 2x2 average pooling (the paper's subsampling layers also
had a trainable coefficient and bias per map; like most re-implementations,
these are plain averages here). C3 can use the paper's partial connection
table (Table I): its 16 maps each see 3, 4 or 6 of S2's 6 maps, which breaks
the symmetry between maps and cuts C3 from 2,416 to 1,516 parameters. Only the
connected weights are parameters; they are scattered into a dense kernel.
Totals: 61,706 params (full C3), 60,806 (partial).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convjax.models.layers import Flatten, Layer

# Table I: the S2 maps each C3 map takes.
C3_TABLE = (
  (0, 1, 2),
  (1, 2, 3),
  (2, 3, 4),
  (3, 4, 5),
  (4, 5, 0),
  (5, 0, 1),
  (0, 1, 2, 3),
  (1, 2, 3, 4),
  (2, 3, 4, 5),
  (3, 4, 5, 0),
  (4, 5, 0, 1),
  (5, 0, 1, 2),
  (0, 1, 3, 4),
  (1, 2, 4, 5),
  (0, 2, 3, 5),
  (0, 1, 2, 3, 4, 5),
)


class AveragePooling2D(Layer):
  def __call__(self, x):
    return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))  # keywords: see layers.max_pool


class PartialConv(nn.Module):
  """A 'VALID' convolution where output map j sees only input maps table[j]."""

  table: tuple
  kernel_size: int = 5

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    ins = np.array([i for row in self.table for i in row])
    outs = np.array([j for j, row in enumerate(self.table) for _ in row])
    weights = self.param("kernel", nn.initializers.lecun_normal(), (k, k, len(ins)))
    bias = self.param("bias", nn.initializers.zeros, (len(self.table),))
    kernel = jnp.zeros((k, k, x.shape[-1], len(self.table)), weights.dtype).at[:, :, ins, outs].set(weights)
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


class LeNet5Features(nn.Module):
  partial_c3: bool = False

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(6, (5, 5), padding="VALID", name="c1")(x))
    x = AveragePooling2D(name="s2")(x)
    c3 = PartialConv(C3_TABLE, name="c3") if self.partial_c3 else nn.Conv(16, (5, 5), padding="VALID", name="c3")
    x = jnp.tanh(c3(x))
    x = AveragePooling2D(name="s4")(x)
    return jnp.tanh(nn.Conv(120, (5, 5), padding="VALID", name="c5")(x))


class LeNet5Head(nn.Module):
  num_classes: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Flatten(name="flatten")(x)
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, name="dropout")(x, deterministic=not train)
    x = jnp.tanh(nn.Dense(84, name="f6")(x))
    return nn.Dense(self.num_classes, name="output")(x)


class LeNet5(nn.Module):
  num_classes: int = 10
  partial_c3: bool = False
  dropout_rate: float = 0.0

  def setup(self):
    self.features = LeNet5Features(self.partial_c3)
    self.head = LeNet5Head(self.num_classes, self.dropout_rate)

  def __call__(self, x, train: bool = False):
    return self.head(self.features(x), train=train)
