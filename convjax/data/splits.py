"""A config's data source, and its train/validation/test splits, from TFDS or an image folder.

`open_source(config.data)` looks at the data without decoding it: the class names,
the shape of one image and where each split comes from. Its `splits()` then
returns {'train', 'validation'[, 'test']} -> Split. A Split knows its size and
reads any row range as uint8 images and int32 labels, so the input pipeline can
load each process's rows without knowing the source. TFDS splits read lazily;
a folder is decoded once, when `splits()` is called.
"""
from typing import Callable, NamedTuple

import numpy as np

from convjax.config import holdout_count
from convjax.data import folders
from convjax.data import tfds as tfds_data
from convjax.errors import UserError

SPLITS = ("train", "validation", "test")


class Split(NamedTuple):
  size: int
  spec: str                                  # for logs: where the rows come from
  read: Callable[[int, int], dict]           # rows [start, stop) -> {'image', 'label'}
  classes: tuple = ()                        # class names, where the source has them


class Source(NamedTuple):
  """A dataset before decoding: what set-up checks need, and `splits()` for the rows."""
  description: str
  classes: tuple                             # class names; label i is classes[i]
  image_shape: tuple                         # (H, W, C) of one decoded image
  splits: Callable[[], dict]                 # -> {'train', 'validation'[, 'test']}: Split


def _in_memory(arrays: dict, rows: np.ndarray, spec: str, classes: tuple) -> Split:
  subset = {k: v[rows] for k, v in arrays.items()}
  return Split(len(rows), spec, lambda a, b: {k: v[a:b] for k, v in subset.items()}, classes)


def _held_out(arrays: dict, n_out: int, seed: int, where: str, classes: tuple) -> dict:
  """{'validation': a seeded random n_out of the rows, 'train': the rest}, each in file order."""
  n = len(arrays["label"])
  order = np.random.default_rng(seed).permutation(n)
  return {"validation": _in_memory(arrays, np.sort(order[:n_out]), f"{where}: {n_out} images held out",
                                   classes),
          "train": _in_memory(arrays, np.sort(order[n_out:]), f"{where}: the other {n - n_out} images",
                              classes)}


def _folder_image_shape(data, listing: folders.FolderSplit) -> tuple:
  if data.image_size:
    return (*data.image_size, data.channels)
  return folders.decode_image(listing.files[0], data.channels, None).shape


def folder_source(data) -> Source:
  """Folders data.folder/<split name> (or an archive of them), listed now, decoded by `splits()`.

  Without a validation_split, a seeded random validation_size of the training
  images is held out (not the last files: those are one class). A folder with no
  split sub-folders (train_split '') is split at random: test_size, then
  validation_size of the rest.
  """
  root = folders.extracted_root(data.folder, data.cache_dir or None)
  decode = lambda listing: folders.decode_split(listing, data.channels, tuple(data.image_size),  # noqa: E731
                                                data.skip_bad_files)
  if not data.train_split:
    listing = folders.list_split(root, "")

    def random_splits():
      arrays = decode(listing)
      n = len(arrays["label"])
      n_test = holdout_count(data.test_size, n)
      n_val = holdout_count(data.validation_size, n - n_test)
      if n - n_test - n_val <= 0 or not n_val:
        raise UserError(f"{root!r}: {n} images leave no training or validation rows with "
                        f"test_size={data.test_size} and validation_size={data.validation_size}")
      order = np.random.default_rng(data.split_seed).permutation(n)
      parts = {"test": order[:n_test], "validation": order[n_test:n_test + n_val],
               "train": order[n_test + n_val:]}
      return {key: _in_memory(arrays, np.sort(parts[key]), f"{listing.directory} {key} "
                              f"({len(parts[key])} of {n} images, seed {data.split_seed})", listing.classes)
              for key in SPLITS if len(parts[key])}

    return Source(f"{root} (random splits)", listing.classes, _folder_image_shape(data, listing),
                  random_splits)

  names = {"train": data.train_split, "validation": data.validation_split, "test": data.test_split}
  listings, classes = {}, None
  for key in SPLITS:
    if names[key]:
      listings[key] = folders.list_split(root, names[key], classes)
      classes = listings[key].classes

  def folder_splits():
    out = {}
    for key, listing in listings.items():
      arrays = decode(listing)
      n = len(arrays["label"])
      out[key] = _in_memory(arrays, np.arange(n), f"{listing.directory} ({n} images, "
                            f"{len(classes)} classes)", classes)
      if key == "train" and not names["validation"]:
        n_val = holdout_count(data.validation_size, n)
        if not 0 < n_val < n:
          raise UserError(f"no validation_split and validation_size={data.validation_size} leaves "
                          f"{n_val} of {n} training images for validation; set one of them")
        out.update(_held_out(arrays, n_val, data.split_seed, f"{listing.directory}, seed {data.split_seed}",
                             classes))
    return {key: out[key] for key in SPLITS if key in out}

  return Source(root, classes, _folder_image_shape(data, listings["train"]), folder_splits)


def tfds_source(data) -> Source:
  builder = tfds_data.get_builder(data.dataset, data.data_dir or None, data.download)
  size = tuple(data.image_size)
  label = builder.info.features["label"]
  classes = tuple(getattr(label, "names", None) or ())
  stored = tuple(builder.info.features["image"].shape)
  image_shape = (*size, stored[-1]) if size else stored
  if None in image_shape:
    raise UserError(f"dataset {data.dataset!r} has images of varying size {stored}: set "
                    "config.data.image_size, e.g. '(224, 224)'")
  per_class = tuple(data.per_class)
  if per_class:
    if len(per_class) != (3 if data.test_split else 2) or min(per_class) <= 0:
      raise UserError(f"config.data.per_class must give (train, validation[, test]) counts > 0 "
                      f"matching the splits in use, got {per_class}")

    def balanced_splits():
      positions = tfds_data.balanced_positions(builder, data.train_split, per_class)
      return {key: Split(len(pos), f"{data.train_split} balanced rows {pos[0]}..{pos[-1]}",
                         lambda a, b, pos=pos: tfds_data.read_positions(builder, data.train_split,
                                                                        pos[a:b], size),
                         classes)
              for key, pos in zip(SPLITS, positions)}

    return Source(f"TFDS {data.dataset}", classes, image_shape, balanced_splits)
  n_val = 0 if data.validation_split else holdout_count(
      data.validation_size, tfds_data.row_range(builder, data.train_split).size)
  ranges = tfds_data.resolve_splits(builder, data.train_split, data.validation_split, n_val,
                                    data.test_split)
  splits = {key: Split(rows.size, rows.spec(),
                       lambda a, b, rows=rows: tfds_data.read_rows(builder, rows.sub(a, b), image_size=size),
                       classes)
            for key, rows in ranges.items()}
  return Source(f"TFDS {data.dataset}", classes, image_shape, lambda: splits)


def open_source(data) -> Source:
  """The source config.data names: an image folder if `folder` is set, else TFDS `dataset`."""
  return folder_source(data) if data.folder else tfds_source(data)
