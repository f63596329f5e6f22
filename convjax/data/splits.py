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


def _in_memory(arrays: dict, rows: np.ndarray, spec: str, classes: tuple) -> Split:
  subset = {k: v[rows] for k, v in arrays.items()}
  return Split(len(rows), spec, lambda a, b: {k: v[a:b] for k, v in subset.items()}, classes)


def _decode(config, listing) -> dict:
  return folders.decode_split(listing, config.data.channels, _image_size(config),
                              config.data.skip_bad_files)


def random_folder_splits(config, root: str) -> dict:
  """root/<class>/* split at random: test, then validation from the rest, then train."""
  listing = folders.list_split(root, "")
  arrays = _decode(config, listing)
  n = len(arrays["label"])
  n_test = math.ceil(n * config.data.test_fraction)
  n_val = math.ceil((n - n_test) * config.data.validation_fraction)
  if n - n_test - n_val <= 0 or not n_val:
    raise UserError(f"{root!r}: {n} images leave no training or validation rows with "
                    f"test_fraction={config.data.test_fraction} and validation_fraction="
                    f"{config.data.validation_fraction}")
  order = np.random.default_rng(config.data.split_seed).permutation(n)
  parts = {"test": order[:n_test], "validation": order[n_test:n_test + n_val],
           "train": order[n_test + n_val:]}
  return {key: _in_memory(arrays, np.sort(parts[key]), f"{listing.directory} {key} "
                          f"({len(parts[key])} of {n} images, seed {config.data.split_seed})",
                          listing.classes)
          for key in SPLITS if len(parts[key])}


def folder_splits(config) -> dict:
  """Folders config.data.folder/<split name> (or an archive of them); each decoded once, here.

  Without a validation_split, a seeded random validation_fraction of the
  training images is held out (not the last files: those are one class).
  """
  root = folders.extracted_root(config.data.folder, config.data.cache_dir or None)
  if not config.train_split:
    return random_folder_splits(config, root)
  names = {"train": config.train_split, "validation": config.validation_split,
           "test": config.test_split}
  out, classes = {}, None
  for key in SPLITS:
    if not names[key]:
      continue
    listing = folders.list_split(root, names[key], classes)
    classes = listing.classes
    arrays = _decode(config, listing)
    n = len(arrays["label"])
    out[key] = _in_memory(arrays, np.arange(n), f"{listing.directory} ({n} images, "
                          f"{len(classes)} classes)", classes)
    if key == "train" and not names["validation"]:
      n_val = math.ceil(n * config.data.validation_fraction)
      if not 0 < n_val < n:
        raise UserError(f"no validation_split and validation_fraction="
                        f"{config.data.validation_fraction} leaves {n_val} of {n} training images "
                        "for validation; set one of them")
      order = np.random.default_rng(config.data.split_seed).permutation(n)
      where = f"{listing.directory}, seed {config.data.split_seed}"
      out["validation"] = _in_memory(arrays, np.sort(order[:n_val]),
                                     f"{where}: {n_val} images held out", classes)
      out["train"] = _in_memory(arrays, np.sort(order[n_val:]),
                                f"{where}: the other {n - n_val} images", classes)
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
