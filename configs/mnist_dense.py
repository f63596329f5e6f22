r"""The dense baseline of the notes: Dense(512, relu) -> Dense(10), RMSprop, batch 128.

  python -m experiments.train --config=configs/mnist_dense.py --workdir=/tmp/mnist_dense

Expected: test accuracy >= 0.975 (notes: 0.978). See RESULTS.md.
"""

from ml_collections import ConfigDict

from convjax.config import default_config


def get_config():
  config = default_config()
  config.model = "mnist_dense"
  config.model_kwargs = ConfigDict({"dropout_rate": 0.0})
  config.data.dataset = "mnist"
  config.data.validation_size = 10_000  # the last 10,000 of train
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.num_epochs = 5
  config.optimizer = "rmsprop"
  config.learning_rate = 1e-3
  return config
