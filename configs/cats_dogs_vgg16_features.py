r"""Transfer learning 1: fast feature extraction with the ImageNet VGG16 conv base.

  CONVJAX_WEIGHTS_DIR=../shared/weights python -m experiments.train \
      --config=configs/cats_dogs_vgg16_features.py --workdir=/tmp/cd_vgg_features

The frozen VGG16 base (weights: Keras' ImageNet notop file) runs once over the
2,000/1,000/1,000 cats-vs-dogs images at 150x150 ('caffe' preprocessing) and its
(4, 4, 512) outputs are cached in <workdir>/features; a classifier Flatten ->
Dense 256 relu -> Dropout 0.5 -> Dense 1 then trains on them: RMSprop 2e-5,
batch 20, 30 epochs. Expected: validation >= 0.88 (notes ~0.90). RESULTS.md.
Online the weights download from Keras' URL into ~/.cache/convjax.
"""

from ml_collections import ConfigDict

from configs import cats_dogs


def get_config():
  config = cats_dogs.get_config()
  config.feature_extractor.model = "vgg16"
  config.feature_extractor.weights = "imagenet"
  config.data.rescale = 1.0
  config.data.preprocess = "caffe"
  config.model = "mlp"
  config.model_kwargs = ConfigDict({"hidden": (256,), "hidden_dropout_rate": 0.5, "num_classes": 1})
  config.steps_per_epoch = 0  # one pass over the 2,000 features: 100 steps of 20
  config.num_epochs = 30
  config.learning_rate = 2e-5
  return config
