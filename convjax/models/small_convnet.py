"""Chollet's small convnets (MNIST, cats-vs-dogs) as one configurable module.

  mnist_convnet:      28x28x1 -> Conv32-Pool-Conv64-Pool-Conv64 -> Dense64 -> 10
                      (93,322 params)
  cats_dogs_convnet:  150x150x3 -> Conv32/64/128/128, each followed by a pool
                      -> Dense512 -> 1 sigmoid logit (3,453,121 params)
  notes_cnn:          the notes' sign-language and CIFAR-10 network: Conv32-Conv64-
                      Pool-Drop.25-Conv128-Pool-Conv128-Pool-Drop.25-Dense1024-Drop.5-10

The module is `head(features(x))`: `features` is the conv stack (its output is
the last feature map), `head` flattens, optionally drops out, and classifies;
`convjax.models.apply_features` / `apply_head` run either alone.
"""

from typing import Sequence

import flax.linen as nn

from convjax.models.layers import Conv2D, Dense, Flatten, MaxPooling2D


def keras_name(base: str, index: int) -> str:
  """Keras' automatic layer names: conv2d, conv2d_1, conv2d_2, ..."""
  return base if index == 0 else f"{base}_{index}"


class ConvStack(nn.Module):
  filters: Sequence[int]
  kernel_size: int = 3
  pool_after: Sequence[bool] = ()  # one flag per conv; empty: pool after each
  dropout_after: Sequence[float] = ()  # one rate per conv, after its pool; empty: none

  @nn.compact
  def __call__(self, x, train: bool = False):
    pools = tuple(self.pool_after) or (True,) * len(self.filters)
    drops = tuple(self.dropout_after) or (0.0,) * len(self.filters)
    for name, flags in (("pool_after", pools), ("dropout_after", drops)):
      if len(flags) != len(self.filters):
        raise ValueError(f"{name} has {len(flags)} entries for {len(self.filters)} conv layers")
    n_pool = n_drop = 0
    for i, (f, pool, rate) in enumerate(zip(self.filters, pools, drops, strict=True)):
      k = (self.kernel_size, self.kernel_size)
      x = Conv2D(f, k, activation=nn.relu, name=keras_name("conv2d", i))(x)
      if pool:
        x = MaxPooling2D(name=keras_name("max_pooling2d", n_pool))(x)
        n_pool += 1
      if rate > 0:
        x = nn.Dropout(rate, name=keras_name("dropout", n_drop))(x, deterministic=not train)
        n_drop += 1
    return x


class DenseHead(nn.Module):
  """Flatten -> [Dropout] -> (Dense(relu) -> [Dropout])... -> Dense(num_classes) logits."""

  hidden: Sequence[int]
  num_classes: int
  dropout_rate: float = 0.0  # on the flattened features (Chollet's placement)
  hidden_dropout_rate: float = 0.0  # after each hidden Dense

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Flatten(name="flatten")(x)
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, name="dropout")(x, deterministic=not train)
    for i, width in enumerate(self.hidden):
      x = Dense(width, activation=nn.relu, name=keras_name("dense", i))(x)
      if self.hidden_dropout_rate > 0:
        x = nn.Dropout(self.hidden_dropout_rate, name=f"dropout_hidden_{i}")(x, deterministic=not train)
    return Dense(self.num_classes, name=keras_name("dense", len(self.hidden)))(x)


class SmallConvNet(nn.Module):
  filters: Sequence[int] = (32, 64, 64)
  pool_after: Sequence[bool] = (True, True, False)
  kernel_size: int = 3
  hidden: Sequence[int] = (64,)
  num_classes: int = 10
  dropout_rate: float = 0.0
  conv_dropout: Sequence[float] = ()
  hidden_dropout_rate: float = 0.0

  def setup(self):
    self.features = ConvStack(self.filters, self.kernel_size, self.pool_after, self.conv_dropout)
    self.head = DenseHead(self.hidden, self.num_classes, self.dropout_rate, self.hidden_dropout_rate)

  def __call__(self, x, train: bool = False):
    return self.head(self.features(x, train=train), train=train)
