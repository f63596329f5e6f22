"""Dense baselines: Flatten -> Dense(512, relu) -> Dense(10) for MNIST; the notes'
sign-language MLP: Dense 512 -> Drop .2 -> Dense 512 -> Drop .2 -> Dense 10."""

from typing import Sequence

import flax.linen as nn

from convjax.models.small_convnet import DenseHead


class MLP(nn.Module):
  hidden: Sequence[int] = (512,)
  num_classes: int = 10
  dropout_rate: float = 0.0
  hidden_dropout_rate: float = 0.0

  def setup(self):
    self.head = DenseHead(self.hidden, self.num_classes, self.dropout_rate, self.hidden_dropout_rate)

  def features(self, x):  # no feature extractor: the head sees the pixels
    return x

  def __call__(self, x, train: bool = False):
    return self.head(x, train=train)
