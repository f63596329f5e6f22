"""A config's data source, and its train/validation/test splits: TFDS, an image folder, arrays or TFRecord.

`open_source(config.data)` looks at the data without decoding it: the class names,
the shape of one image, how many rows there are and where each split comes from.
Its `splits(stream)` then returns {'train', 'validation'[, 'test']} -> Split. A
Split knows its size and reads any row range as uint8 images and int32 labels,
so the on-device pipeline can load each process's rows without knowing the
source; `rows` gives random access to single rows as stored, which is what
the streaming pipeline reads. A folder is decoded whole by `splits()` (the
on-device path) and row by row by `splits(stream=True)`.
"""

import math
import os
from typing import Any, Callable, NamedTuple

import numpy as np

from convjax.config import holdout_count
from convjax.data import arrays as arrays_lib
from convjax.data import folders
from convjax.data import tfds as tfds_data
from convjax.data import tfrecord
from convjax.data.preprocess import Fit
from convjax.errors import UserError

SPLITS = ("train", "validation", "test")


class Split(NamedTuple):
  size: int
  spec: str  # for logs: where the rows come from
  read: Callable[[int, int], dict]  # rows [start, stop) -> {'image', 'label'} at the image size
  classes: tuple = ()  # class names, where the source has them
  rows: Any = None  # rows[i] -> {'image' as stored, 'label'} (or None: a bad
  # file skipped); None when the source reads only ranges


class Source(NamedTuple):
  """A dataset before decoding: what set-up checks need, and `splits(stream)` for the rows."""

  description: str
  classes: tuple  # class names; label i is classes[i]
  image_shape: tuple  # (H, W, C) of one image as the model sees it
  num_rows: int  # rows over all splits (bytes = num_rows * image size)
  splits: Callable[..., dict]  # (stream=False) -> {'train', 'validation'[, 'test']}: Split
  streams: bool = True  # whether splits(stream=True) works


def _in_memory(arrays: dict, rows: np.ndarray, spec: str, classes: tuple) -> Split:
  subset = {k: v[rows] for k, v in arrays.items()}
  return Split(len(rows), spec, lambda a, b: {k: v[a:b] for k, v in subset.items()}, classes)


def _from_rows(rows, fit: Fit, spec: str, classes: tuple, shape: tuple) -> Split:
  """A Split over random-access `rows` of images of `shape` (fitted); `read` decodes a range."""

  def read(a: int, b: int) -> dict:
    indices = range(a, min(b, len(rows)))
    got = rows.read(indices) if hasattr(rows, "read") else [rows[i] for i in indices]
    got = [r for r in got if r is not None]
    if not got:
      return {"image": np.zeros((0, *shape), np.uint8), "label": np.zeros(0, np.int32)}
    return tfds_data.stack_rows([{**r, "image": fit(r["image"])} for r in got])

  return Split(len(rows), spec, read, classes, rows)


def _holdouts(n: int, data, with_test: bool) -> dict:
  """{'test'?, 'validation', 'train'}: sorted row indices of a seeded random split of n rows
  (test_size first when `with_test`, then validation_size of the rest)."""
  n_test = holdout_count(data.test_size, n) if with_test else 0
  n_val = holdout_count(data.validation_size, n - n_test)
  order = np.random.default_rng(data.split_seed).permutation(n)
  parts = {"test": order[:n_test], "validation": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
  return {k: np.sort(v) for k, v in parts.items() if len(v) or k == "train"}


def _check_holdout(where: str, n: int, parts: dict, data) -> None:
  if not len(parts["train"]) or "validation" not in parts:
    raise UserError(
      f"{where!r}: {n} images leave no training or validation rows with "
      f"test_size={data.test_size} and validation_size={data.validation_size}"
    )


def fit_for(data) -> Fit:
  """config.data's crops and resize, as one Fit."""
  return Fit(tuple(data.image_size), tuple(data.random_resized_crop), tuple(data.crop_ratio), data.center_crop)


def folder_source(data) -> Source:
  """Folders data.folder/<split name> (or an archive of them), listed now, decoded by `splits()`.

  Without a validation_split, a seeded random validation_size of the training
  images is held out (not the last files: those are one class). A folder with no
  split sub-folders (train_split '') is split at random: test_size, then
  validation_size of the rest.
  """
  root = folders.extracted_root(data.folder, data.cache_dir or None)
  decode = lambda listing: folders.decode_split(
    listing,
    data.channels,
    tuple(data.image_size),  # noqa: E731
    data.skip_bad_files,
    fit=fit_for(data) if data.center_crop else None,
  )
  names = {"train": data.train_split, "validation": data.validation_split, "test": data.test_split}
  if not data.train_split:  # no split folders: one listing, split at random
    names = {"": ""}
  listings, classes = {}, None
  for key, name in names.items():
    if name or key == "":
      listings[key] = folders.list_split(root, name, classes)
      classes = listings[key].classes
  first = next(iter(listings.values()))
  image_shape = (
    (*data.image_size, data.channels)
    if data.image_size
    else folders.decode_image(first.files[0], data.channels, None).shape
  )

  def parts_of(key: str, n: int) -> dict:
    """{split: rows of the listing `key`} for n rows (decoded images, or files)."""
    if key == "":
      parts = _holdouts(n, data, with_test=True)
      _check_holdout(root, n, parts, data)
      return parts
    if key == "train" and not names["validation"]:
      n_val = holdout_count(data.validation_size, n)
      if not 0 < n_val < n:
        raise UserError(
          f"no validation_split and validation_size={data.validation_size} leaves "
          f"{n_val} of {n} training images for validation; set one of them"
        )
      order = np.random.default_rng(data.split_seed).permutation(n)
      return {"validation": np.sort(order[:n_val]), "train": np.sort(order[n_val:])}
    return {key: np.arange(n)}

  def spec(key: str, part: str, listing, rows: np.ndarray, n: int) -> str:
    if key == "":
      return f"{listing.directory} {part} ({len(rows)} of {n} images, seed {data.split_seed})"
    if len(rows) == n:
      return f"{listing.directory} ({n} images, {len(classes)} classes)"
    held = part == "validation"
    return f"{listing.directory}, seed {data.split_seed}: " + (
      f"{len(rows)} images held out" if held else f"the other {len(rows)} images"
    )

  def splits(stream: bool = False) -> dict:
    out = {}
    for key, listing in listings.items():
      if stream:
        n = len(listing.files)
        for part, rows in parts_of(key, n).items():
          source_rows = folders.FolderRows(
            [listing.files[i] for i in rows], listing.labels[rows], data.channels, data.skip_bad_files
          )
          out[part] = _from_rows(source_rows, fit_for(data), spec(key, part, listing, rows, n), classes, image_shape)
      else:
        arrays = decode(listing)
        n = len(arrays["label"])
        for part, rows in parts_of(key, n).items():
          out[part] = _in_memory(arrays, rows, spec(key, part, listing, rows, n), classes)
    return {key: out[key] for key in SPLITS if key in out}

  num_files = sum(len(listing.files) for listing in listings.values())
  return Source(root, classes, tuple(image_shape), num_files, splits)


def tfds_source(data) -> Source:
  builder = tfds_data.get_builder(data.dataset, data.data_dir or None, data.download)
  size = tuple(data.image_size)
  label = builder.info.features["label"]
  classes = tuple(getattr(label, "names", None) or ())
  stored = tuple(builder.info.features["image"].shape)
  image_shape = (*size, stored[-1]) if size else stored
  if None in image_shape:
    raise UserError(
      f"dataset {data.dataset!r} has images of varying size {stored}: set config.data.image_size, e.g. '(224, 224)'"
    )
  streams = tfds_data.random_access(builder)
  fit = fit_for(data)
  per_class = tuple(data.per_class)
  if per_class:
    if len(per_class) != (3 if data.test_split else 2) or min(per_class) <= 0:
      raise UserError(
        f"config.data.per_class must give (train, validation[, test]) counts > 0 "
        f"matching the splits in use, got {per_class}"
      )

    def balanced_splits(stream: bool = False):
      positions = tfds_data.balanced_positions(builder, data.train_split, per_class)
      split = tfds_data.row_range(builder, data.train_split).split
      out = {}
      for key, pos in zip(SPLITS, positions, strict=True):
        spec = f"{data.train_split} balanced rows {pos[0]}..{pos[-1]}"
        out[key] = (
          _from_rows(tfds_data.Rows(builder, split, pos), fit, spec, classes, image_shape)
          if streams
          else Split(
            len(pos),
            spec,
            lambda a, b, pos=pos: tfds_data.read_positions(builder, data.train_split, pos[a:b], size),
            classes,
          )
        )
      return out

    return Source(
      f"TFDS {data.dataset}", classes, image_shape, sum(per_class) * max(len(classes), 1), balanced_splits, streams
    )
  n_val = (
    0
    if data.validation_split
    else holdout_count(data.validation_size, tfds_data.row_range(builder, data.train_split).size)
  )
  ranges = tfds_data.resolve_splits(builder, data.train_split, data.validation_split, n_val, data.test_split)
  if streams:
    out = {
      key: _from_rows(
        tfds_data.Rows(builder, rows.split, np.arange(rows.start, rows.stop)), fit, rows.spec(), classes, image_shape
      )
      for key, rows in ranges.items()
    }
  else:
    out = {
      key: Split(
        rows.size,
        rows.spec(),
        lambda a, b, rows=rows: tfds_data.read_rows(builder, rows.sub(a, b), image_size=size),
        classes,
      )
      for key, rows in ranges.items()
    }
  return Source(
    f"TFDS {data.dataset}",
    classes,
    image_shape,
    sum(r.size for r in ranges.values()),
    lambda stream=False: out,
    streams,
  )


def _listed_source(data, description: str, sizes: dict, rows_of: Callable, classes: tuple, stored: tuple) -> Source:
  """A Source over splits given as files (arrays, TFRecord): `sizes` {'train', 'validation'?,
  'test'?: row count}, rows_of(key, indices) their random-access rows. Without a validation
  split a seeded random validation_size of train is held out."""
  image_shape = (*data.image_size, stored[-1]) if data.image_size else tuple(stored)
  parts = {key: {key: np.arange(n)} for key, n in sizes.items()}
  if "validation" not in sizes:
    n = sizes["train"]
    n_val = holdout_count(data.validation_size, n)
    if not 0 < n_val < n:
      raise UserError(
        f"no validation_split and validation_size={data.validation_size} leaves "
        f"{n_val} of {n} training rows for validation; set one of them"
      )
    order = np.random.default_rng(data.split_seed).permutation(n)
    parts["train"] = {"validation": np.sort(order[:n_val]), "train": np.sort(order[n_val:])}
  out = {}
  for key, split_parts in parts.items():
    for part, rows in split_parts.items():
      rows_ = rows_of(key, rows)
      out[part] = _from_rows(
        rows_, fit_for(data), f"{rows_.where} ({len(rows)} of {sizes[key]} rows)", classes, image_shape
      )
  out = {key: out[key] for key in SPLITS if key in out}
  return Source(description, classes, image_shape, sum(s.size for s in out.values()), lambda stream=False: out)


def _split_names(data, source: str) -> dict:
  names = {"train": data.train_split, "validation": data.validation_split, "test": data.test_split}
  if not names["train"]:
    raise UserError(f"config.data.{source} needs config.data.train_split (the training split's files)")
  return {key: name for key, name in names.items() if name}


def array_source(data) -> Source:
  """Arrays in data.arrays (convjax.data.arrays): the *_split fields name the files."""
  opened = {key: arrays_lib.open_split(data.arrays, name) for key, name in _split_names(data, "arrays").items()}
  classes = arrays_lib.class_names(data.arrays, [s.labels for s in opened.values()])
  return _listed_source(
    data,
    data.arrays,
    {key: len(s.labels) for key, s in opened.items()},
    lambda key, rows: arrays_lib.ArrayRows(opened[key], rows),
    classes,
    opened["train"].images.shape[1:],
  )


def tfrecord_source(data) -> Source:
  """tf.Example TFRecord files in data.tfrecord (convjax.data.tfrecord): the *_split fields are
  globs; classes from classes.txt, else the labels' range."""
  opened = {key: tfrecord.open_split(data.tfrecord, name) for key, name in _split_names(data, "tfrecord").items()}
  rows_of = lambda key, rows: tfrecord.ExampleRows(
    opened[key], rows, data.image_feature, data.label_feature, data.channels
  )
  listed = os.path.join(data.tfrecord, "classes.txt")
  labels = [] if os.path.isfile(listed) else [rows_of(k, np.arange(s.size)).labels() for k, s in opened.items()]
  classes = arrays_lib.class_names(data.tfrecord, labels)
  first = rows_of("train", [0])[0]["image"] if opened["train"].size else None
  if first is None:
    raise UserError(f"the training files {opened['train'].paths[0]}... hold no records")
  return _listed_source(data, data.tfrecord, {key: s.size for key, s in opened.items()}, rows_of, classes, first.shape)


# The config.data fields that name a source other than TFDS (the default).
OTHER_SOURCES = ("folder", "arrays", "tfrecord")


def uses_tfds(data) -> bool:
  return not any(data[key] for key in OTHER_SOURCES)


def open_source(data) -> Source:
  """The source config.data names: an image folder (`folder`), arrays (`arrays`), TFRecord
  files (`tfrecord`), else TFDS."""
  chosen = [key for key in OTHER_SOURCES if data[key]]
  if len(chosen) > 1:
    both = "both" if len(chosen) == 2 else "all"
    raise UserError(f"config.data.{' and config.data.'.join(chosen)} are {both} set: choose one source")
  if data.folder:
    return folder_source(data)
  if data.tfrecord:
    return tfrecord_source(data)
  return array_source(data) if data.arrays else tfds_source(data)


def image_bytes(source: Source) -> int:
  """Bytes of every split's images as uint8 (what the on-device pipeline holds)."""
  return source.num_rows * math.prod(source.image_shape)
