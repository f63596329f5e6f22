r"""Transfer learning 3: fine-tuning. From the frozen-base run's checkpoint, unfreeze
block5_conv1..3 and train them with the classifier at RMSprop 1e-5.

  CONVJAX_WEIGHTS_DIR=../shared/weights python -m experiments.train \
      --config=configs/cats_dogs_vgg16_finetune.py --config.init_from=/tmp/cd_vgg_frozen \
      --workdir=/tmp/cd_vgg_finetune

Expected: test >= 0.94 (notes 0.939-0.968). The notes fine-tune for 100 epochs;
epochs here are set by what the hardware allows (see RESULTS.md).
"""

from configs import cats_dogs_vgg16_frozen


def get_config():
  config = cats_dogs_vgg16_frozen.get_config()
  config.pretrained.weights = ""  # the weights come from init_from
  config.init_from = ""  # the frozen-base run's workdir (required)
  config.trainable = "features/block5_conv[123]/.*|head/.*"
  config.learning_rate = 1e-5
  config.num_epochs = 30
  config.plot_smoothing = 0.8
  return config
