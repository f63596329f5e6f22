r"""Chollet's cats-vs-dogs convnet (3,453,121 params) on 2,000 images, no augmentation.

  python -m experiments.train --config=configs/cats_dogs.py --workdir=/tmp/cats_dogs

Expected (the notes): training accuracy approaches 1.0 while validation stalls
around 0.70-0.75 -- overfitting. See RESULTS.md for the measured run.

Data: the image folders of Chollet's cats_and_dogs_small (train 2,000,
validation 1,000, test 1,000; cats and dogs). Offline it is in
../shared/datasets; build it from Kaggle's train.zip with
experiments/prepare_data.py, or take the same balanced subset from TFDS:

  --config.data.folder= --config.data.dataset=cats_vs_dogs --config.data.train_split=train \
  --config.data.per_class='(1000, 500, 500)'
"""

from ml_collections import ConfigDict

from convjax.config import default_config


def get_config():
  config = default_config()
  config.model = "cats_dogs_convnet"
  config.model_kwargs = ConfigDict({"dropout_rate": 0.0})
  config.data.dataset = "cats_vs_dogs"  # used when data.folder is ''
  config.data.folder = "../shared/datasets/cats_and_dogs_small"
  config.data.image_size = (150, 150)
  config.data.train_split = "train"
  config.data.validation_split = "validation"
  config.data.test_split = "test"
  config.batch_size = 20
  config.eval_batch_size = 50
  config.steps_per_epoch = 100
  config.num_epochs = 30
  config.optimizer = "rmsprop"
  config.learning_rate = 1e-4
  return config
