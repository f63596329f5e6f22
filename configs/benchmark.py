r"""The throughput grid of experiments/benchmark.py.

  python -m experiments.benchmark --config=configs/benchmark.py --workdir=/tmp/bench \
      [--config.models=mnist_convnet@28x28x1 --config.batch_sizes='(128,)']

Models x batch sizes x precisions x modes; each row times `steps` (>= 20) steps
after `warmup` untimed ones. A model is NAME@HxWxC (a convjax.models name).
"""
from ml_collections import ConfigDict


def get_config():
  config = ConfigDict()
  config.models = ("mnist_convnet@28x28x1,cats_dogs_convnet@150x150x3,vgg16_base@150x150x3,"
                   "vgg16@224x224x3,resnet50@224x224x3")
  config.batch_sizes = (32, 128)
  config.precisions = ("float32", "bfloat16")
  config.modes = ("train", "inference")
  config.steps = 20
  config.warmup = 3
  # The same rows in Keras 3 and PyTorch (convjax/peers.py), each in its own process:
  # keras_jax, keras_tensorflow, torch_eager, torch_compile (where installed); '' -> none.
  config.peers = "keras_jax,keras_tensorflow,torch_eager,torch_compile"
  # Input-pipeline cost: MODEL:DATA pairs trained through the training loop's real input path
  # (each of pipeline_modes; streaming with each count of grain workers) vs a batch already on
  # the devices, at each batch size; '' -> skip. DATA: a TFDS name (TFDS_DATA_DIR), NAME@DIR
  # (e.g. an ArrayRecord copy, which streams), or folder:PATH[@HxW] (class folders, resized).
  config.pipeline = "mnist_convnet:mnist"
  config.pipeline_modes = ("device", "stream")
  config.workers = (0,)
  return config
