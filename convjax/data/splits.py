"""The train/validation/test splits of a config, from TFDS or an image folder.

`open_splits(config)` returns {'train', 'validation'[, 'test']} -> Split. A
Split knows its size before anything is decoded (TFDS) or after a one-time
decode (folders), and reads any row range as uint8 images and int32 labels,
so the training loop can load each process's rows without knowing the source.
"""
import math
from typing import Callable, NamedTuple

import numpy as np

from convjax.data import folders
from convjax.data import tfds as tfds_data
from convjax.errors import UserError

SPLITS = ("train", "validation", "test")


class Split(NamedTuple):
  size: int
  spec: str                                  # for logs: where the rows come from
  read: Callable[[int, int], dict]           # rows [start, stop) -> {'image', 'label'}
  classes: tuple = ()                        # class names, where the source has them


def _image_size(config) -> tuple:
  size = tuple(config.data.image_size)
  if size and (len(size) != 2 or min(size) <= 0):
    raise UserError(f"config.data.image_size must be (height, width) > 0 or (), got {size}")
  return size


def random_folder_splits(config) -> dict:
  """root/<class>/* split at random: test, then validation from the rest, then train."""
  listing = folders.list_split(config.data.folder, "")
  arrays = folders.decode_split(listing, config.data.channels, _image_size(config),
                                config.data.skip_bad_files)
  n = len(arrays["label"])
  n_test = math.ceil(n * config.data.test_fraction)
  n_val = math.ceil((n - n_test) * config.data.validation_fraction)
  if n - n_test - n_val <= 0 or not n_val:
    raise UserError(f"{config.data.folder!r}: {n} images leave no training or validation rows with "
                    f"test_fraction={config.data.test_fraction} and validation_fraction="
                    f"{config.data.validation_fraction}")
  order = np.random.default_rng(config.data.split_seed).permutation(n)
  parts = {"test": order[:n_test], "validation": order[n_test:n_test + n_val],
           "train": order[n_test + n_val:]}
  out = {}
  for key in SPLITS:
    if key == "test" and not n_test:
      continue
    rows = np.sort(parts[key])
    subset = {k: v[rows] for k, v in arrays.items()}
    out[key] = Split(len(rows), f"{listing.directory} {key} ({len(rows)} of {n} images, seed "
                     f"{config.data.split_seed})",
                     lambda a, b, subset=subset: {k: v[a:b] for k, v in subset.items()},
                     listing.classes)
  return out


def folder_splits(config) -> dict:
  """Folders config.data.folder/<split name>; each decoded once, here."""
  if not config.train_split:
    return random_folder_splits(config)
  if not config.validation_split:
    raise UserError("an image-folder dataset needs config.validation_split (a folder name, "
                    "e.g. 'validation'); carving validation rows off class-ordered files would "
                    "leave classes out")
  names = {"train": config.train_split, "validation": config.validation_split,
           "test": config.test_split}
  out, classes = {}, None
  for key in SPLITS:
    if not names[key]:
      continue
    listing = folders.list_split(config.data.folder, names[key], classes)
    classes = listing.classes
    arrays = folders.decode_split(listing, config.data.channels, _image_size(config),
                                  config.data.skip_bad_files)
    n = len(arrays["label"])
    out[key] = Split(n, f"{listing.directory} ({n} images, {len(classes)} classes)",
                     lambda a, b, arrays=arrays: {k: v[a:b] for k, v in arrays.items()},
                     classes)
  return out


def tfds_splits(config) -> dict:
  builder = tfds_data.get_builder(config.dataset, config.data_dir or None, config.download)
  size = _image_size(config)
  label = builder.info.features["label"]
  classes = tuple(getattr(label, "names", None) or ())
  per_class = tuple(config.data.per_class)
  if per_class:
    if len(per_class) != (3 if config.test_split else 2) or min(per_class) <= 0:
      raise UserError(f"config.data.per_class must give (train, validation[, test]) counts > 0 "
                      f"matching the splits in use, got {per_class}")
    positions = tfds_data.balanced_positions(builder, config.train_split, per_class)
    out = {}
    for key, pos in zip(SPLITS, positions):
      out[key] = Split(len(pos), f"{config.train_split} balanced rows {pos[0]}..{pos[-1]}",
                       lambda a, b, pos=pos: tfds_data.read_positions(builder, config.train_split,
                                                                      pos[a:b], size),
                       classes)
    return out
  ranges = tfds_data.resolve_splits(builder, config.train_split, config.validation_split,
                                    config.validation_size, config.test_split)
  return {key: Split(rows.size, rows.spec(),
                     lambda a, b, rows=rows: tfds_data.read_rows(builder, rows.sub(a, b), image_size=size),
                     classes)
          for key, rows in ranges.items()}


def open_splits(config) -> dict:
  return folder_splits(config) if config.data.folder else tfds_splits(config)
