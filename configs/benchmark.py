r"""The throughput grid of experiments/benchmark.py.

  TFDS_DATA_DIR=../shared/datasets/tfds python -m experiments.benchmark --config=configs/benchmark.py \
      --workdir=/tmp/bench [--config.models=mnist_convnet@28x28x1 --config.batch_sizes='(128,)']
  TFDS_DATA_DIR=../shared/datasets/tfds python -m experiments.benchmark --config=configs/benchmark.py:full \
      --workdir=/tmp/bench_full

(`TFDS_DATA_DIR`: where the pipeline rows' TFDS MNIST is prepared; offline here the shared copy.)

Models x batch sizes x precisions x modes; each row times `steps` (>= 20) steps
after `warmup` untimed ones, in `rounds` that alternate with its peers'. A model is NAME@HxWxC (a convjax.models name).

The grid is a preset: `configs/benchmark.py` picks by the platform it runs on ('cpu':
the course's small nets against the CPU peers, minutes on 2 cores; 'gpu' on GPU/TPU:
VGG16-224 and ResNet-50 at batch 128/256 in bfloat16 and float32 too, against PyTorch),
`configs/benchmark.py:NAME` names one (cpu, gpu, full: every model on any platform).
A field set on the command line replaces the preset's.
"""

from ml_collections import ConfigDict, config_dict

PRESETS = {
  "cpu": {
    "models": "mnist_convnet@28x28x1,cats_dogs_convnet@150x150x3",
    "batch_sizes": (32, 128),
    "precisions": ("float32",),
    "modes": ("train", "inference"),
    "peers": "keras_tensorflow,torch_eager",
    "pipeline": "mnist_convnet:mnist",
  },
  "gpu": {
    "models": "mnist_convnet@28x28x1,cats_dogs_convnet@150x150x3,vgg16@224x224x3,resnet50@224x224x3",
    "batch_sizes": (128, 256),
    "precisions": ("bfloat16", "float32"),
    "modes": ("train", "inference"),
    "peers": "torch_eager,torch_compile",
    "pipeline": "",
  },
  "full": {
    "models": (
      "mnist_convnet@28x28x1,cats_dogs_convnet@150x150x3,vgg16_base@150x150x3,vgg16@224x224x3,resnet50@224x224x3"
    ),
    "batch_sizes": (32, 128),
    "precisions": ("float32", "bfloat16"),
    "modes": ("train", "inference"),
    "peers": "keras_jax,keras_tensorflow,torch_eager,torch_compile",
    "pipeline": "mnist_convnet:mnist",
  },
}


def get_config(preset: str = ""):
  config = ConfigDict()
  config.preset = preset or "auto"  # auto: 'cpu' on a CPU, 'gpu' on an accelerator; or cpu, gpu, full
  # Unset (None): the preset's value.
  config.models = config_dict.placeholder(str)
  config.batch_sizes = config_dict.placeholder(tuple)
  config.precisions = config_dict.placeholder(tuple)  # float32, bfloat16
  config.modes = config_dict.placeholder(tuple)  # train, inference, explain
  # explain rows: one per method (convjax.viz.explain.METHODS), maps of a batch of the
  # predicted classes; the torch peers run pytorch-grad-cam's or captum's same method.
  config.explain_methods = "gradcam,integrated_gradients"
  # The same rows in Keras 3 and PyTorch (convjax/peers.py), each in its own process:
  # keras_jax, keras_tensorflow, torch_eager, torch_compile (where installed); '' -> none.
  config.peers = config_dict.placeholder(str)
  # Input-pipeline cost: MODEL:DATA pairs trained through the training loop's real input path
  # (each of pipeline_modes; streaming with each count of grain workers) vs a batch already on
  # the devices, at each batch size; '' -> skip. DATA: a TFDS name (TFDS_DATA_DIR), NAME@DIR
  # (e.g. an ArrayRecord copy, which streams), or folder:PATH[@HxW] (class folders, resized).
  config.pipeline = config_dict.placeholder(str)
  config.pipeline_modes = ("device", "stream")
  # Input readers compared (convjax/input_readers.py): images/s of training batches from each
  # DATA (NAME@DIR, a prepared TFDS dataset, or folder:PATH@HxW) by each of input_readers
  # (convjax: two reader threads; convjax:N: N grain worker processes; grain's DataLoader;
  # tf.data), each reader in its own process; '' -> skip.
  config.input = ""
  config.input_readers = ("convjax", "convjax:2", "grain", "tf.data")
  config.input_batches = 50
  config.workers = (0,)
  config.steps = 20
  config.warmup = 3
  # A row's steps are timed in this many rounds, each of convjax's steps/rounds followed by
  # each peer's (`warmup` untimed steps each before the first round, one before each later
  # round): a convjax/peer ratio is the median of the rounds' ratios, both sides timed
  # seconds apart, so a machine whose speed drifts moves both.
  config.rounds = 4
  # > 0: then trace this many steps of each row with jax.profiler and write where the
  # step's time goes, per HLO instruction and the JAX op it came from, to
  # <workdir>/profile/<row>.md (the trace beside it, for TensorBoard or Perfetto).
  config.profile_steps = 0
  return config


def resolve(config, platform: str) -> str:
  """Fills the unset fields of `config` from its preset ('auto': by `platform`); returns the
  preset's name. An unknown preset is a ValueError."""
  name = config.preset if config.preset != "auto" else ("cpu" if platform == "cpu" else "gpu")
  if name not in PRESETS:
    raise ValueError(f"unknown benchmark preset {config.preset!r}; valid: auto, {', '.join(PRESETS)}")
  for key, value in PRESETS[name].items():
    if config[key] is None:
      config[key] = value
  return name
