r"""Transfer learning 2: the frozen ImageNet VGG16 base + a new classifier, end to end
with data augmentation (only the classifier learns).

  CONVJAX_WEIGHTS_DIR=../shared/weights python -m experiments.train \
      --config=configs/cats_dogs_vgg16_frozen.py --workdir=/tmp/cd_vgg_frozen

Model: VGG16 conv base (features/block*, from Keras' notop file) -> Flatten ->
Dense 256 -> Dropout 0.5 -> Dense 1; `trainable='head/.*'`: the 14.7M base params
stay bit-identical and carry no optimizer state. RMSprop 2e-5, batch 20, 100
steps/epoch, augmentation as configs/cats_dogs_augmented.py. Expected:
validation >= 0.88. Each epoch runs VGG16 forward and backward over 2,000
images at 150x150: minutes on a GPU, about an hour on 2 CPU cores.
"""

from ml_collections import ConfigDict

from configs import cats_dogs_augmented


def get_config():
  config = cats_dogs_augmented.get_config()
  config.model = "vgg16_classifier"
  config.model_kwargs = ConfigDict({"hidden_dropout_rate": 0.5})
  config.pretrained.weights = "imagenet"
  config.pretrained.under = "features"
  config.trainable = "head/.*"
  config.data.rescale = 1.0
  config.data.preprocess = "caffe"
  config.num_epochs = 30
  config.learning_rate = 2e-5
  return config
