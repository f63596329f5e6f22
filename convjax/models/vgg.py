"""VGG11/13/16/19 (Simonyan & Zisserman 2014, configurations A/B/D/E) with Keras' layer names.

Blocks of 3x3 'same' convolutions + ReLU, each block closed by a 2x2 max pool:
block1_conv1 ... block5_pool. With `include_top` the head is Keras' (Flatten,
fc1 4096, fc2 4096, predictions; 224x224 input); without it the model is the
convolutional base at any input size, optionally pooled ('avg' or 'max').
Params: VGG16 base 14,714,688, with top 138,357,544 (as keras.applications).
Names match Keras' HDF5 weight files so they load by name.
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from convjax.models.layers import Conv2D, Dense, Flatten, MaxPooling2D

# Convolutions per block for each depth (the paper's configurations A, B, D, E).
BLOCKS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
WIDTHS = (64, 128, 256, 512, 512)


class VGGFeatures(nn.Module):
  """The convolutional base; `return_blocks=True` returns every block's pooled output too."""

  depth: int = 16

  @nn.compact
  def __call__(self, x, return_blocks: bool = False):
    blocks = []
    for b, (n, width) in enumerate(zip(BLOCKS[self.depth], WIDTHS, strict=True), start=1):
      for i in range(1, n + 1):
        x = Conv2D(width, (3, 3), padding="SAME", activation=nn.relu, name=f"block{b}_conv{i}")(x)
      x = MaxPooling2D(name=f"block{b}_pool")(x)
      blocks.append(x)
    return (x, blocks) if return_blocks else x


class VGGHead(nn.Module):
  """Keras' top (Flatten, fc1, fc2, predictions) or, without it, optional global pooling."""

  include_top: bool = True
  num_classes: int = 1000
  pooling: str = ""  # '', 'avg' or 'max' (include_top=False only)
  hidden: Sequence[int] = (4096, 4096)
  dropout_rate: float = 0.0  # before fc1 and fc2 (the paper: 0.5; Keras: none)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if not self.include_top:
      if self.pooling == "avg":
        return jnp.mean(x, axis=(1, 2))
      if self.pooling == "max":
        return jnp.max(x, axis=(1, 2))
      return x
    x = Flatten(name="flatten")(x)
    for i, width in enumerate(self.hidden, start=1):
      if self.dropout_rate > 0:
        x = nn.Dropout(self.dropout_rate, name=f"dropout{i}")(x, deterministic=not train)
      x = Dense(width, activation=nn.relu, name=f"fc{i}")(x)
    return Dense(self.num_classes, name="predictions")(x)  # logits; Keras applies softmax here


class VGG(nn.Module):
  depth: int = 16
  include_top: bool = True
  num_classes: int = 1000
  pooling: str = ""
  dropout_rate: float = 0.0

  def setup(self):
    if self.depth not in BLOCKS:
      raise ValueError(f"VGG depth must be one of {sorted(BLOCKS)}, got {self.depth}")
    if self.pooling not in ("", "avg", "max"):
      raise ValueError(f"pooling must be '', 'avg' or 'max', got {self.pooling!r}")
    self.features = VGGFeatures(self.depth)
    self.head = VGGHead(self.include_top, self.num_classes, self.pooling, dropout_rate=self.dropout_rate)

  def __call__(self, x, train: bool = False):
    return self.head(self.features(x), train=train)


class VGGClassifier(nn.Module):
  """A VGG conv base under a new small classifier (Chollet's transfer-learning model):
  features = the VGG base (Keras names, takes ImageNet weights), head = Flatten ->
  Dense(hidden, relu) -> Dropout -> Dense(num_classes)."""

  depth: int = 16
  hidden: Sequence[int] = (256,)
  num_classes: int = 1
  dropout_rate: float = 0.0
  hidden_dropout_rate: float = 0.5

  def setup(self):
    from convjax.models.small_convnet import DenseHead

    self.features = VGGFeatures(self.depth)
    self.head = DenseHead(self.hidden, self.num_classes, self.dropout_rate, self.hidden_dropout_rate)

  def __call__(self, x, train: bool = False):
    return self.head(self.features(x), train=train)
