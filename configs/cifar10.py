r"""The notes' CIFAR-10 network (Conv32-Conv64-Pool-Drop-Conv128-Pool-Conv128-Pool-Drop-
Dense1024-Drop-Dense10), Adam 1e-4, batch 128, early stopping on val_loss
(min_delta 0.001, patience 3), at most 250 epochs.

  python -m experiments.train --config=configs/cifar10.py --workdir=/tmp/cifar10

Data offline: ../shared/datasets/cifar10_jpeg.tar.gz (extracted once into
~/.cache/convjax), a JPEG (quality ~75) copy of CIFAR-10, so accuracies are not
exactly comparable with published CIFAR-10 figures. Online, the original from
TFDS: --config.data.folder= --config.data.dataset=cifar10 (validation: the last 5,000
of train). The notes validated (and early-stopped) on the test set; here 5,000
training images (10%, seeded) are held out instead, and test is touched once.
Keras' decay=1e-6 is left out (it lowers the rate by ~2% over 20k steps).
"""

from ml_collections import ConfigDict

from convjax.config import default_config


def get_config():
  config = default_config()
  config.model = "notes_cnn"
  config.model_kwargs = ConfigDict({"num_classes": 10})
  config.data.dataset = "cifar10"  # used when data.folder is ''
  config.data.folder = "../shared/datasets/cifar10_jpeg.tar.gz"
  config.data.train_split = "train"
  config.data.validation_split = ""
  config.data.validation_size = 0.1  # folder: a seeded random 5,000; TFDS: the last 5,000 of train
  config.data.test_split = "test"
  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 250
  config.optimizer = "adam"
  config.learning_rate = 1e-4
  config.early_stopping_patience = 3
  config.early_stopping_min_delta = 0.001
  return config
