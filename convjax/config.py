"""The config every experiment starts from, its checks, and a run's stored copy of it.

Experiment files in configs/ call `default_config()` and change what differs.
Strings use '' for "unset" and counts use 0 for "derive it", so that every
field can be overridden from the command line (--config.FIELD=VALUE).

Groups: the model (`model`, `model_kwargs`), the data (`data.*`: source,
splits, decoding, pixel preprocessing), on-device augmentation (`augment.*`),
optimisation, starting weights, stopping rules and execution. The names each
field accepts (optimizers, fill modes, ...) are defined here; the modules that
implement them import them from here.
"""

import json
import math
import re
from typing import Optional

from ml_collections import ConfigDict

from convjax.errors import UserError

OPTIMIZERS = ("rmsprop", "adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step")
COMPUTE_DTYPES = ("float32", "bfloat16")
FILL_MODES = ("nearest", "constant", "reflect", "wrap")
PREPROCESSING = ("", "caffe")
AUGMENT_RANGES = ("rotation_range", "width_shift_range", "height_shift_range", "shear_range", "zoom_range")

# Fields that change how a run executes, not what it computes: a workdir may be
# resumed with other values (e.g. a checkpoint written on 8 devices, resumed on 1).
RUNTIME_FIELDS = (
  "overwrite",
  "num_devices",
  "data.data_dir",
  "data.download",
  "data.pipeline",
  "data.device_fraction",
  "data.workers",
  "data.prefetch",
  "log_every_steps",
  "log_every_seconds",
  "checkpoint_every_steps",
  "profile_steps",
  "plot_smoothing",
  "eval_batch_size",
  "test_weights",
  "keep_checkpoints",
)
# Fields a run may raise when it is resumed: it continues (a finished run too).
EXTENDABLE_FIELDS = ("num_epochs",)
PIPELINES = ("auto", "device", "stream")

# Fields that moved, old dotted name -> new one: a run's stored config.json of an
# earlier convjax is read with them moved; on the command line the old name is refused
# with an error naming the new one.
RENAMED = {
  "dataset": "data.dataset",
  "data_dir": "data.data_dir",
  "download": "data.download",
  "train_split": "data.train_split",
  "validation_split": "data.validation_split",
  "test_split": "data.test_split",
  "validation_size": "data.validation_size",
  "rescale": "data.rescale",
  "preprocess": "data.preprocess",
  "data.validation_fraction": "data.validation_size",
  "data.test_fraction": "data.test_size",
  "warmup_epochs": "warmup_steps",
}


def default_config() -> ConfigDict:
  c = ConfigDict()
  c.model = "mnist_convnet"  # a name in convjax.models.MODELS
  c.model_kwargs = ConfigDict()  # overrides of the model's fields, e.g. dropout_rate; a run
  # records num_classes here (the dataset's, unless set)
  c.data = d = ConfigDict()
  # Where the images come from: an image folder, else a TFDS dataset.
  d.dataset = "mnist"  # a TFDS name (used when `folder` is '')
  d.folder = ""  # root of an image folder (root/<split>/<class>/*.jpg or an archive
  # of it); the *_split fields then name sub-folders
  d.data_dir = ""  # TFDS: '' -> TFDS_DATA_DIR or TFDS' default
  d.download = True  # TFDS: download and prepare a missing dataset
  d.train_split = "train"  # TFDS split spec ('train[:50000]') or sub-folder; a folder with no
  # split sub-folders: '' (then test_size is split off at random)
  d.validation_split = ""  # '' -> validation_size of train_split is held out
  d.test_split = "test"  # '' when there is none
  # The validation hold-out when validation_split is '': a count (>= 1) or a fraction (< 1) of
  # train_split. TFDS takes its last rows (TFDS shuffles at preparation); a folder a seeded
  # random subset (its files are in class order). Fractions round up, as sklearn's do.
  d.validation_size = 0.1  # the validation hold-out (above)
  d.test_size = 0.2  # a folder with no split sub-folders: the test hold-out, likewise
  d.split_seed = 0  # the seed of the folder hold-outs
  d.per_class = ()  # TFDS: class-balanced (train, validation[, test]) subsets, taken
  # in order from train_split, e.g. (1000, 500, 500)
  # Decoding.
  d.image_size = ()  # (height, width): bilinear resize on loading; () -> as stored
  d.channels = 3  # folders: 1 (grayscale) or 3 (RGB); every file is converted
  d.skip_bad_files = False  # folders: skip (and log) unreadable files instead of failing
  d.cache_dir = ""  # where a folder archive (.tar.gz, .zip) is extracted once;
  # '' -> ~/.cache/convjax
  d.arrays = ""  # a folder of <split>.npz (or <split>_image.npy + _label.npy): the
  # source instead of TFDS (convjax/data/arrays.py)
  d.tfrecord = ""  # a folder of TFRecord files of tf.Example records: the source instead of
  # TFDS; the *_split fields are globs in it ('train-*.tfrecord'); convjax/data/tfrecord.py
  d.image_feature = "image"  # tfrecord: the feature holding the encoded image (PNG, JPEG, ...)
  d.label_feature = "label"  # tfrecord: the int64 feature holding the class index
  # Crops (with image_size): training takes torchvision's RandomResizedCrop of (min, max) of the
  # area, e.g. (0.08, 1.0), aspect ratio log-uniform in crop_ratio (streaming only); evaluation
  # a centred crop of center_crop of the shorter side (ImageNet: 0.875). Then the resize.
  d.random_resized_crop = ()  # training: (min, max) area fraction; () -> off
  d.crop_ratio = (3 / 4, 4 / 3)  # training: (min, max) aspect ratio of the random crop
  d.center_crop = 0.0  # 0 -> no crop: the whole image is resized
  # The input pipeline: 'device' decodes every split once and keeps it on the devices; 'stream'
  # reads, decodes and batches rows with grain as training goes (host memory bounded); 'auto'
  # picks 'device' when the images fit device_fraction of the smallest device's free memory
  # (on CPU of free host RAM). Both give the same batches in the same order.
  d.pipeline = "auto"  # auto, device, stream (above)
  d.device_fraction = 0.25  # auto: of the smallest device's free memory (CPU: host RAM)
  d.workers = 0  # stream: grain worker processes decoding; 0 -> 2 threads (nice 19)
  d.prefetch = 2  # stream: batches put on the devices ahead of the step
  # Pixels (0-255) -> model input, inside the step: x * rescale, then preprocess.
  d.rescale = 1 / 255  # pixels * rescale
  d.preprocess = ""  # '' or 'caffe' (ImageNet VGG: RGB->BGR minus channel means,
  # on 0-255 pixels: set rescale=1)
  # On-device augmentation of training batches (Keras ImageDataGenerator semantics:
  # degrees, fractions of the image size, zoom in [1 - z, 1 + z]); all 0 -> off.
  c.augment = ConfigDict()
  c.augment.rotation_range = 0.0  # degrees
  c.augment.width_shift_range = 0.0  # fraction of the width (>= 1: pixels)
  c.augment.height_shift_range = 0.0  # fraction of the height (>= 1: pixels)
  c.augment.shear_range = 0.0  # degrees
  c.augment.zoom_range = 0.0  # zoom in [1 - z, 1 + z]
  c.augment.horizontal_flip = False  # mirror half the images
  c.augment.fill_mode = "nearest"  # nearest, constant, reflect, wrap
  c.augment.cval = 0.0  # fill value of fill_mode 'constant'
  # Training.
  c.batch_size = 64  # global, over all devices (with grad_accum_steps: per micro-step)
  c.eval_batch_size = 0  # 0 -> batch_size
  c.steps_per_epoch = 0  # 0 -> one pass: train size // batch_size
  c.num_epochs = 5  # raise it to extend a finished or interrupted run
  c.optimizer = "rmsprop"  # rmsprop, adam, adamw, sgd (optax; Keras' epsilon 1e-7)
  c.learning_rate = 1e-3  # the peak learning rate of the schedule
  c.momentum = 0.9  # sgd
  c.nesterov = False  # sgd
  c.weight_decay = 0.0  # adamw: decoupled; other optimizers: L2 added to the gradient
  c.weight_decay_mask = ".*/kernel"  # regex over param paths that decay (not biases, BatchNorm)
  c.schedule = "constant"  # constant, cosine (to 0 at the last step), step (piecewise)
  c.warmup_steps = 0  # linear warmup from 0 over this many optimizer steps
  c.schedule_boundaries = ()  # step: optimizer steps at which the rate is multiplied ...
  c.schedule_factor = 0.1  # ... by this factor
  c.label_smoothing = 0.0  # of the cross-entropy targets
  c.grad_clip_norm = 0.0  # clip gradients to this global norm; 0 -> off
  c.grad_accum_steps = 1  # average gradients over k micro-batches per update (optax.MultiSteps)
  c.ema_decay = 0.0  # keep an exponential moving average of the params, evaluated and
  # tested instead of them; 0 -> off
  c.compute_dtype = "float32"  # float32 or bfloat16 (params, optimizer state, loss, softmax and
  # BatchNorm statistics stay float32)
  c.trainable = ""  # regex over param paths; '' -> all train (BatchNorm layers whose
  # params are frozen run in inference mode, as Keras does)
  # Starting weights (a fresh run only; a resumed run continues from its checkpoint).
  c.pretrained = ConfigDict()
  c.pretrained.weights = ""  # '' | 'imagenet' | a Keras .h5 file
  c.pretrained.under = "features"  # the params subtree that takes them
  c.init_from = ""  # a workdir whose latest checkpoint gives params (fine-tuning)
  # Fast feature extraction: a frozen pretrained conv base runs once over every split
  # (cached in <workdir>/features); `model` then trains on its outputs.
  c.feature_extractor = ConfigDict()
  c.feature_extractor.model = ""  # e.g. 'vgg16'; '' -> off
  c.feature_extractor.weights = "imagenet"  # 'imagenet' or a Keras .h5 file
  c.seed = 0  # params' init, data order, dropout, augmentation
  # Keras' EarlyStopping(monitor='val_loss'): stop after `patience` epochs without a
  # val_loss improvement greater than min_delta; 0 -> off. Evaluates the last weights.
  c.early_stopping_patience = 0  # epochs without improvement before stopping; 0 -> off
  c.early_stopping_min_delta = 0.0  # the smallest val_loss decrease that counts
  # Time to accuracy (the benchmark's, MLPerf-style): after each epoch evaluate
  # `target_split` ('validation' | 'test'), log the wall seconds since the run
  # started (loading and compilation included) and stop once its accuracy reaches
  # `target_accuracy`; 0 -> off.
  c.target_accuracy = 0.0  # stop once target_split reaches it; 0 -> off
  c.target_split = "test"  # validation or test
  # Which weights the final test evaluation uses: 'last' (the final epoch's) or 'best'
  # (the kept checkpoint of highest val_accuracy: model selection on validation, as
  # Keras' ModelCheckpoint(save_best_only=True) then load). The test record names the epoch.
  c.test_weights = "last"  # last or best
  # Execution.
  c.num_devices = 0  # 0 -> all devices of all processes
  c.log_every_steps = 100  # a progress line (and TensorBoard scalars) every N steps ...
  c.log_every_seconds = 60.0  # ... or every this many seconds, whichever comes first
  c.checkpoint_every_steps = 0  # 0 -> at epoch ends only (and on SIGTERM/SIGINT, always)
  c.keep_checkpoints = 1  # the latest N checkpoints are kept, and the best epoch end
  c.profile_steps = ()  # (start, stop): a jax.profiler trace of these steps in tensorboard/
  c.plot_smoothing = 0.0  # EMA factor for extra learning-curve lines (0.8 in the notes)
  c.overwrite = False  # replace a workdir that holds a run of another config
  return c


def holdout_count(size, n: int) -> int:
  """A hold-out of `size` (a count >= 1, or a fraction < 1 rounded up) from n rows."""
  return int(size) if size >= 1 else math.ceil(n * size)


def validate(config: ConfigDict) -> None:
  """Raises UserError naming the first bad field; cheap, runs before any data or compilation.

  (An unknown model name is refused by `get_model`, an unknown dataset or split by the
  data source, both also before anything is read or compiled.)
  """
  for key in ("batch_size", "num_epochs", "learning_rate"):
    if not config[key] > 0:
      raise UserError(f"config.{key} must be positive, got {config[key]!r}")
  for key in (
    "eval_batch_size",
    "steps_per_epoch",
    "num_devices",
    "warmup_steps",
    "plot_smoothing",
    "early_stopping_patience",
    "early_stopping_min_delta",
    "target_accuracy",
    "weight_decay",
    "label_smoothing",
    "grad_clip_norm",
    "ema_decay",
    "checkpoint_every_steps",
    "log_every_seconds",
  ):
    if config[key] < 0:
      raise UserError(f"config.{key} must be >= 0, got {config[key]!r}")
  for key in ("grad_accum_steps", "log_every_steps", "keep_checkpoints"):
    if not config[key] >= 1:
      raise UserError(f"config.{key} must be >= 1, got {config[key]!r}")
  for key in ("label_smoothing", "ema_decay"):
    if not config[key] < 1:
      raise UserError(f"config.{key} must be in [0, 1), got {config[key]!r}")
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise UserError(f"unknown config.compute_dtype {config.compute_dtype!r}; valid: {', '.join(COMPUTE_DTYPES)}")
  profile = tuple(config.profile_steps)
  if profile and not (len(profile) == 2 and 0 <= profile[0] < profile[1]):
    raise UserError(f"config.profile_steps must be (start, stop) steps with start < stop, got {profile}")
  if config.schedule == "step" and not tuple(config.schedule_boundaries):
    raise UserError("config.schedule='step' needs config.schedule_boundaries, e.g. '(3000, 6000)' optimizer steps")
  for pattern in ("trainable", "weight_decay_mask"):
    try:
      re.compile(config[pattern])
    except re.error as e:
      raise UserError(f"config.{pattern}={config[pattern]!r} is not a regular expression: {e}") from None
  if not config.plot_smoothing < 1:
    raise UserError(f"config.plot_smoothing must be in [0, 1), got {config.plot_smoothing!r}")
  if not config.target_accuracy <= 1:
    raise UserError(f"config.target_accuracy must be in [0, 1], got {config.target_accuracy!r}")
  if config.target_split not in ("validation", "test"):
    raise UserError(f"config.target_split must be 'validation' or 'test', got {config.target_split!r}")
  if config.target_accuracy and config.target_split == "test" and not config.data.test_split:
    raise UserError("config.target_split='test', but this run has no test split (config.data.test_split is '')")
  if config.test_weights not in ("last", "best"):
    raise UserError(f"config.test_weights must be 'last' or 'best', got {config.test_weights!r}")
  for key in AUGMENT_RANGES:
    if config.augment[key] < 0:
      raise UserError(f"config.augment.{key} must be >= 0, got {config.augment[key]!r}")
  if config.augment.fill_mode not in FILL_MODES:
    raise UserError(f"unknown config.augment.fill_mode {config.augment.fill_mode!r}; valid: {', '.join(FILL_MODES)}")
  if config.feature_extractor.model and augments(config.augment):
    raise UserError(
      "feature extraction computes features once, so it cannot augment: turn "
      "config.augment off or clear config.feature_extractor.model"
    )
  if config.optimizer not in OPTIMIZERS:
    raise UserError(f"unknown optimizer {config.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
  if config.schedule not in SCHEDULES:
    raise UserError(f"unknown schedule {config.schedule!r}; valid: {', '.join(SCHEDULES)}")
  validate_data(config.data)


def validate_data(data: ConfigDict) -> None:
  """The checks of config.data alone (also for binaries that read data without training)."""
  for key, least in (("validation_size", "(0, 1)"), ("test_size", "[0, 1)")):
    value = data[key]
    if not (0 < value < 1 or value >= 1 and value == int(value) or key == "test_size" and value == 0):
      raise UserError(f"config.data.{key} must be a count >= 1 or a fraction in {least}, got {value!r}")
  size = tuple(data.image_size)
  if size and (len(size) != 2 or min(size) <= 0):
    raise UserError(f"config.data.image_size must be (height, width) > 0 or (), got {size}")
  if data.channels not in (1, 3):
    raise UserError(f"config.data.channels must be 1 or 3, got {data.channels!r}")
  if data.pipeline not in PIPELINES:
    raise UserError(f"unknown config.data.pipeline {data.pipeline!r}; valid: {', '.join(PIPELINES)}")
  if not 0 < data.device_fraction <= 1:
    raise UserError(f"config.data.device_fraction must be in (0, 1], got {data.device_fraction!r}")
  for key in ("workers", "prefetch"):
    if data[key] < 0:
      raise UserError(f"config.data.{key} must be >= 0, got {data[key]!r}")
  crop = tuple(data.random_resized_crop)
  if crop and not (len(crop) == 2 and 0 < crop[0] <= crop[1] <= 1):
    raise UserError(f"config.data.random_resized_crop must be (min, max) area fractions in (0, 1], got {crop}")
  ratio = tuple(data.crop_ratio)
  if not (len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
    raise UserError(f"config.data.crop_ratio must be (min, max) aspect ratios > 0, got {ratio}")
  if not 0 <= data.center_crop <= 1:
    raise UserError(f"config.data.center_crop must be in [0, 1], got {data.center_crop!r}")
  if (crop or data.center_crop) and not size:
    raise UserError("config.data.random_resized_crop and center_crop need config.data.image_size")
  if crop and data.pipeline == "device":
    raise UserError(
      "config.data.random_resized_crop draws a new crop every epoch: it needs "
      "config.data.pipeline='stream' (or 'auto'), not 'device'"
    )
  if data.preprocess not in PREPROCESSING:
    raise UserError(f"unknown config.data.preprocess {data.preprocess!r}; valid: '', 'caffe'")
  if data.preprocess == "caffe" and data.rescale != 1:
    raise UserError(
      f"config.data.preprocess='caffe' works on 0-255 pixels: set config.data.rescale=1 (got {data.rescale!r})"
    )


def augments(augment: ConfigDict) -> bool:
  """Whether config.augment changes images at all."""
  return any(augment[k] for k in AUGMENT_RANGES) or augment.horizontal_flip


def _move_renamed(stored: dict) -> dict:
  """A stored config with the fields of RENAMED at their new places.

  The validation hold-out was two fields (validation_size rows for TFDS,
  data.validation_fraction for folders): the one the run's source used is kept.
  """
  stored = json.loads(json.dumps(stored))
  data = stored.setdefault("data", {})
  folder = data.get("folder", "")
  for old, new in RENAMED.items():
    *parents, leaf = old.split(".")
    node = stored
    for p in parents:
      node = node.get(p, {})
    if leaf not in node:
      continue
    if old == "warmup_epochs" and node[leaf]:
      continue  # in epochs, not steps: left as it is, so that the run is refused naming it
    value = node.pop(leaf)
    if new == "data.validation_size" and (old == "validation_size") == bool(folder):
      continue  # the other source's hold-out field
    if old == "warmup_epochs":
      continue  # 0: no warmup either way
    *new_parents, new_leaf = new.split(".")
    target = stored
    for p in new_parents:
      target = target.setdefault(p, {})
    target[new_leaf] = value
  return stored


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

  merge(config, _move_renamed(stored))
  return config


def read_stored(path: str) -> dict:
  """A run's config.json as plain values, renamed fields moved; bad JSON is a UserError."""
  with open(path) as f:
    try:
      return to_dict(from_stored(json.load(f)))
    except json.JSONDecodeError as e:
      raise UserError(f"{path} is not valid JSON ({e}); fix it or set --config.overwrite=True") from None


def copy_config(config: ConfigDict) -> ConfigDict:
  """An unlocked deep copy to derive another run's config from."""
  return ConfigDict(to_dict(config))


def to_dict(config: ConfigDict) -> dict:
  """The resolved config as plain JSON values (tuples become lists)."""
  return json.loads(config.to_json())


def differences(stored: dict, current: dict, defaults: Optional[dict] = None, prefix: str = "") -> list:
  """Dotted keys whose values differ, ignoring RUNTIME_FIELDS.

  A key missing from `stored` whose current value is its default (a field added
  to convjax after the run began) is no difference, so such runs still resume; nor
  is a raised EXTENDABLE_FIELDS value (the run continues), unless a cosine schedule
  depends on it;
  so is a model_kwargs.num_classes that a run of an earlier convjax did not record
  (it took the dataset's, as the current config does).
  """
  defaults = to_dict(default_config()) if defaults is None else defaults
  out = []
  for k in sorted(set(stored) | set(current)):
    name = prefix + k
    if name in RUNTIME_FIELDS:
      continue
    a, b = stored.get(k, "<missing>"), current.get(k, "<missing>")
    if a == "<missing>" and (k in defaults and b == defaults[k] or name == "model_kwargs.num_classes"):
      continue
    if isinstance(a, dict) and isinstance(b, dict):
      sub_defaults = defaults.get(k) if isinstance(defaults.get(k), dict) else {}
      out += differences(a, b, sub_defaults, name + ".")
    elif name in EXTENDABLE_FIELDS and a != "<missing>" and b != "<missing>" and b > a:
      if stored.get("schedule") == "cosine":  # its decay spans the run: a longer run is another schedule
        out.append(f"{name} (the cosine schedule decays over it)")
    elif a != b:
      out.append(name)
  return out
