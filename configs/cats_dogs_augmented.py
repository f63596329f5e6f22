r"""The cats-vs-dogs convnet with Dropout(0.5) and on-device data augmentation.

  python -m experiments.train --config=configs/cats_dogs_augmented.py \
      --workdir=/tmp/cats_dogs_augmented

Expected: validation and test accuracy >= 0.80 after 100 epochs (notes:
~0.82-0.84), with training and validation curves close together. See RESULTS.md.
Augmentation as the notes' ImageDataGenerator: rotation 40 degrees, shifts and
shear and zoom 0.2, horizontal flips, nearest fill; drawn per image, per step.
"""

from ml_collections import ConfigDict

from configs import cats_dogs


def get_config():
  config = cats_dogs.get_config()
  config.model_kwargs = ConfigDict({"dropout_rate": 0.5})
  config.num_epochs = 100
  config.augment.rotation_range = 40.0
  config.augment.width_shift_range = 0.2
  config.augment.height_shift_range = 0.2
  config.augment.shear_range = 0.2
  config.augment.zoom_range = 0.2
  config.augment.horizontal_flip = True
  config.augment.fill_mode = "nearest"
  config.plot_smoothing = 0.8
  return config
