"""The config every experiment starts from, and its checks.

Experiment files in configs/ call `default_config()` and change what differs.
Strings use '' for "unset" and counts use 0 for "derive it", so that every
field can be overridden from the command line (--config.FIELD=VALUE).
"""
import json
from typing import Optional

from ml_collections import ConfigDict

from convjax.data import augment as augment_lib
from convjax.errors import UserError
from convjax.train.optim import OPTIMIZERS, SCHEDULES

# Fields that change how a run executes, not what it computes: a workdir may be
# resumed with other values (e.g. a checkpoint written on 8 devices, resumed on 1).
RUNTIME_FIELDS = ("overwrite", "num_devices", "data_dir", "download")


def input_transform(config: ConfigDict):
  """float pixels (0-255) -> model input: x * rescale, then config.preprocess."""
  rescale = config.rescale
  if config.preprocess == "caffe":
    from convjax.pretrained.imagenet import preprocess_input
    return lambda x: preprocess_input(x * rescale)
  return lambda x: x * rescale


def default_config() -> ConfigDict:
  c = ConfigDict()
  c.model = "mnist_convnet"        # a name in convjax.models.MODELS
  c.model_kwargs = ConfigDict()    # overrides of the model's fields, e.g. dropout_rate
  # Data (TFDS). The validation set is validation_split, or else the last
  # validation_size rows of train_split.
  c.dataset = "mnist"
  c.data_dir = ""                  # '' -> TFDS_DATA_DIR or TFDS' default
  c.download = True                # let TFDS download and prepare a missing dataset
  c.train_split = "train"
  c.validation_split = ""
  c.validation_size = 10_000
  c.test_split = "test"            # '' when the dataset has none
  c.data = ConfigDict()
  c.data.folder = ""               # root of an image folder (root/<split>/<class>/*.jpg); replaces
                                   # `dataset`, and the *_split fields name sub-folders
  c.data.image_size = ()           # (height, width): bilinear resize on loading; () -> as stored
  c.data.channels = 3              # folders: 1 (grayscale) or 3 (RGB); every file is converted
  c.data.skip_bad_files = False    # folders: skip (and log) unreadable files instead of failing
  c.data.per_class = ()            # TFDS: class-balanced (train, validation[, test]) subsets, taken
                                   # in order from train_split, e.g. (1000, 500, 500)
  # A folder with no split sub-folders (train_split=''): root/<class>/*, split at random.
  c.data.test_fraction = 0.2       # of all images (rounded up, as sklearn's train_test_split)
  c.data.validation_fraction = 0.1  # of the rest (rounded up); also held out of a train
                                   # folder when there is no validation_split
  c.data.split_seed = 0
  c.data.cache_dir = ""            # where a data.folder archive (.tar.gz, .zip) is extracted once;
                                   # '' -> ~/.cache/convjax
  c.rescale = 1 / 255
  c.preprocess = ""                # '' or 'caffe' (ImageNet VGG: RGB->BGR minus channel means,
                                   # on 0-255 pixels: set rescale=1)
  # On-device augmentation of training batches (Keras ImageDataGenerator semantics:
  # degrees, fractions of the image size, zoom in [1 - z, 1 + z]); all 0 -> off.
  c.augment = ConfigDict()
  c.augment.rotation_range = 0.0
  c.augment.width_shift_range = 0.0
  c.augment.height_shift_range = 0.0
  c.augment.shear_range = 0.0
  c.augment.zoom_range = 0.0
  c.augment.horizontal_flip = False
  c.augment.fill_mode = "nearest"  # nearest, constant, reflect, wrap
  c.augment.cval = 0.0
  # Training.
  c.batch_size = 64                # global, over all devices
  c.eval_batch_size = 0            # 0 -> batch_size
  c.steps_per_epoch = 0            # 0 -> one pass: train size // batch_size
  c.num_epochs = 5
  c.optimizer = "rmsprop"
  c.learning_rate = 1e-3
  c.momentum = 0.9                 # sgd only
  c.schedule = "constant"
  c.warmup_epochs = 0.0            # cosine only
  c.trainable = ""                 # regex over param paths; '' -> all train
  # Starting weights (a fresh run only; a resumed run continues from its checkpoint).
  c.pretrained = ConfigDict()
  c.pretrained.weights = ""        # '' | 'imagenet' | a Keras .h5 file
  c.pretrained.under = "features"  # the params subtree that takes them
  c.init_from = ""                 # a workdir whose latest checkpoint gives params (fine-tuning)
  # Fast feature extraction: a frozen pretrained conv base runs once over every split
  # (cached in <workdir>/features); `model` then trains on its outputs.
  c.feature_extractor = ConfigDict()
  c.feature_extractor.model = ""   # e.g. 'vgg16'; '' -> off
  c.feature_extractor.weights = "imagenet"
  c.seed = 0
  # Keras' EarlyStopping(monitor='val_loss'): stop after `patience` epochs without a
  # val_loss improvement greater than min_delta; 0 -> off. Evaluates the last weights.
  c.early_stopping_patience = 0
  c.early_stopping_min_delta = 0.0
  # Time to accuracy (the benchmark's, MLPerf-style): after each epoch evaluate
  # `target_split` ('validation' | 'test'), log the wall seconds since the run
  # started (loading and compilation included) and stop once its accuracy reaches
  # `target_accuracy`; 0 -> off.
  c.target_accuracy = 0.0
  c.target_split = "test"
  # Which weights the final test evaluation uses: 'last' (the final epoch's) or 'best'
  # (the kept checkpoint of highest val_accuracy: model selection on validation, as
  # Keras' ModelCheckpoint(save_best_only=True) then load). The test record names the epoch.
  c.test_weights = "last"
  # Execution.
  c.num_devices = 0                # 0 -> all devices of all processes
  c.plot_smoothing = 0.0           # EMA factor for extra learning-curve lines (0.8 in the notes)
  c.overwrite = False              # replace a workdir that holds a run of another config
  return c


def validate(config: ConfigDict) -> None:
  """Raises UserError naming the first bad field; cheap, runs before any data or compilation.

  (An unknown model name is refused by `get_model`, called just after.)
  """
  positive = ("batch_size", "num_epochs", "learning_rate")
  for key in positive:
    if not config[key] > 0:
      raise UserError(f"config.{key} must be positive, got {config[key]!r}")
  for key in ("eval_batch_size", "steps_per_epoch", "num_devices", "validation_size",
              "warmup_epochs", "plot_smoothing", "early_stopping_patience", "early_stopping_min_delta",
              "target_accuracy"):
    if config[key] < 0:
      raise UserError(f"config.{key} must be >= 0, got {config[key]!r}")
  if not config.plot_smoothing < 1:
    raise UserError(f"config.plot_smoothing must be in [0, 1), got {config.plot_smoothing!r}")
  if not config.target_accuracy <= 1:
    raise UserError(f"config.target_accuracy must be in [0, 1], got {config.target_accuracy!r}")
  if config.target_split not in ("validation", "test"):
    raise UserError(f"config.target_split must be 'validation' or 'test', got {config.target_split!r}")
  if config.test_weights not in ("last", "best"):
    raise UserError(f"config.test_weights must be 'last' or 'best', got {config.test_weights!r}")
  for key in ("rotation_range", "width_shift_range", "height_shift_range", "shear_range",
              "zoom_range"):
    if config.augment[key] < 0:
      raise UserError(f"config.augment.{key} must be >= 0, got {config.augment[key]!r}")
  if config.augment.fill_mode not in augment_lib.FILL_MODES:
    raise UserError(f"unknown config.augment.fill_mode {config.augment.fill_mode!r}; valid: "
                    f"{', '.join(augment_lib.FILL_MODES)}")
  for key in ("test_fraction", "validation_fraction"):
    if not 0 <= config.data[key] < 1:
      raise UserError(f"config.data.{key} must be in [0, 1), got {config.data[key]!r}")
  if config.preprocess not in ("", "caffe"):
    raise UserError(f"unknown config.preprocess {config.preprocess!r}; valid: '', 'caffe'")
  if config.preprocess == "caffe" and config.rescale != 1:
    raise UserError(f"config.preprocess='caffe' works on 0-255 pixels: set config.rescale=1 "
                    f"(got {config.rescale!r})")
  if config.feature_extractor.model and make_augment(config) is not None:
    raise UserError("feature extraction computes features once, so it cannot augment: turn "
                    "config.augment off or clear config.feature_extractor.model")
  if config.data.channels not in (1, 3):
    raise UserError(f"config.data.channels must be 1 or 3, got {config.data.channels!r}")
  if config.optimizer not in OPTIMIZERS:
    raise UserError(f"unknown optimizer {config.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
  if config.schedule not in SCHEDULES:
    raise UserError(f"unknown schedule {config.schedule!r}; valid: {', '.join(SCHEDULES)}")


def make_augment(config: ConfigDict):
  """The configured `augment(rng, images)`, or None when every range is 0 and flips are off."""
  a = config.augment
  kwargs = {k: a[k] for k in ("rotation_range", "width_shift_range", "height_shift_range",
                              "shear_range", "zoom_range")}
  if not any(kwargs.values()) and not a.horizontal_flip:
    return None
  return augment_lib.make_augment(**kwargs, horizontal_flip=a.horizontal_flip,
                                  fill_mode=a.fill_mode, cval=a.cval)


def from_stored(stored: dict) -> ConfigDict:
  """A run's config.json as a ConfigDict; fields it predates take their defaults."""
  config = default_config()

  def merge(target: ConfigDict, values: dict):
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(target.get(key), ConfigDict) and key != "model_kwargs":
        merge(target[key], value)
      elif isinstance(value, list) and isinstance(target.get(key), tuple):
        target[key] = tuple(value)
      else:
        target[key] = value

  merge(config, stored)
  return config


def copy_config(config: ConfigDict) -> ConfigDict:
  """An unlocked deep copy to derive another run's config from."""
  return ConfigDict(to_dict(config))


def to_dict(config: ConfigDict) -> dict:
  """The resolved config as plain JSON values (tuples become lists)."""
  return json.loads(config.to_json())


def differences(stored: dict, current: dict, defaults: Optional[dict] = None) -> list:
  """Dotted keys whose values differ, ignoring RUNTIME_FIELDS.

  A key missing from `stored` whose current value is its default (a field added
  to convjax after the run began) is no difference, so such runs still resume.
  """
  defaults = to_dict(default_config()) if defaults is None else defaults
  keys = set(stored) | set(current)
  out = []
  for k in sorted(keys - set(RUNTIME_FIELDS)):
    a, b = stored.get(k, "<missing>"), current.get(k, "<missing>")
    if a == "<missing>" and k in defaults and b == defaults[k]:
      continue
    if isinstance(a, dict) and isinstance(b, dict):
      sub_defaults = defaults.get(k) if isinstance(defaults.get(k), dict) else {}
      out += [f"{k}.{sub}" for sub in differences(a, b, sub_defaults)]
    elif a != b:
      out.append(k)
  return out
