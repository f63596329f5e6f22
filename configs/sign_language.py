r"""The notes' CNN on the Sign Language Digits (2,062 photos, 10 classes), 64x64 grayscale.

  python -m experiments.train --config=configs/sign_language.py --workdir=/tmp/sign

Expected: test accuracy >= 0.90 (notes: 0.9225 after 10 epochs). The folder has
no splits: a fixed seeded split takes 20% for test (413 images), then 10% of
the rest for validation (165); 1,484 train. experiments/baselines.py compares
this CNN with SVM, kNN, logistic regression, random forest and an MLP on the
same split. See RESULTS.md.
"""

from ml_collections import ConfigDict

from convjax.config import default_config


def get_config():
  config = default_config()
  config.model = "notes_cnn"
  config.model_kwargs = ConfigDict({"num_classes": 10})
  config.data.folder = "../shared/datasets/sign_language_digits"
  config.data.image_size = (64, 64)
  config.data.channels = 1
  config.data.train_split = ""  # no split folders: data.test_size / validation_size
  config.data.validation_split = ""
  config.data.test_split = ""
  config.data.test_size = 0.2
  config.data.validation_size = 0.1
  config.data.split_seed = 8
  config.batch_size = 128
  config.eval_batch_size = 128
  config.num_epochs = 30
  config.optimizer = "adam"
  config.learning_rate = 1e-3
  return config
