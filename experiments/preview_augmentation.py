r"""Writes a grid of random augmentations of one image, as the notes show them.

  python -m experiments.preview_augmentation --config=configs/cats_dogs_augmented.py \
      --image=../shared/datasets/cats_and_dogs_small/train/cats/cat.3.jpg --output=/tmp/aug.png

The image is loaded like the training data (config.data.image_size and
channels) and passed through the configured augmentation (config.augment),
the same jitted function the train step runs; the first tile is the original.
"""

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from convjax import cli
from convjax import config as config_lib
from convjax.data import augment as augment_lib
from convjax.data.folders import decode_image
from convjax.errors import UserError
from convjax.viz.plots import image_grid

config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("image", None, "Image file to augment.")
flags.DEFINE_string("output", None, "PNG to write.")
flags.DEFINE_integer("num", 7, "Number of augmented versions.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.mark_flags_as_required(["config", "image", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  config = f.config
  config_lib.validate(config)
  augment = augment_lib.from_config(config.augment)
  if augment is None:
    raise UserError("the config has no augmentation (every config.augment range is 0 and horizontal_flip is off)")
  image = decode_image(f.image, config.data.channels, tuple(config.data.image_size) or None)
  batch = np.repeat(image[None].astype(np.float32), f.num, axis=0)
  out = np.asarray(jax.jit(augment)(jax.random.key(f.seed), batch))
  image_grid(
    np.concatenate([image[None], out]),
    f.output,
    cols=4,
    titles=["original"] + [f"augmented {i + 1}" for i in range(f.num)],
  )
  logging.info("wrote %s", f.output)


if __name__ == "__main__":
  cli.run(main)
