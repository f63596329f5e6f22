r"""Chollet's MNIST convnet (93,322 params), RMSprop, batch 64, as in the notes.

  python -m experiments.train --config=configs/mnist.py --workdir=/tmp/mnist

Expected: test accuracy >= 0.990 (notes: 0.9902-0.9913). See RESULTS.md for the
measured number, epochs and wall time. Validation: the last 10,000 of train; the
test uses the weights of the epoch with the best validation accuracy (Keras'
ModelCheckpoint(save_best_only=True), then load), `--config.test_weights=last`
the final epoch's as the notes do.
"""

from ml_collections import ConfigDict

from convjax.config import default_config


def get_config():
  config = default_config()
  config.model = "mnist_convnet"
  config.model_kwargs = ConfigDict({"dropout_rate": 0.0})
  config.data.dataset = "mnist"
  config.data.validation_size = 10_000  # the last 10,000 of train
  config.batch_size = 64
  config.eval_batch_size = 1000
  config.num_epochs = 5
  config.optimizer = "rmsprop"
  config.learning_rate = 1e-3
  config.test_weights = "best"
  return config
