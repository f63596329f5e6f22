"""TFDS splits as numpy arrays, read by absolute row range or row by row.

The data directory is the caller's, else TFDS_DATA_DIR (read on each call),
else TFDS' default. Offline, point it at a directory holding the prepared
dataset (here: TFDS_DATA_DIR=../shared/datasets/tfds). Online, a missing
dataset is downloaded and prepared by TFDS itself.

A dataset prepared in TFRecord format (TFDS' default) or in ArrayRecord format
(`tfds.builder(name, file_format='array_record').download_and_prepare()`; offline here
../shared/datasets/tfds_array_record) is read row by row (`Rows`) without TensorFlow:
random access to every row, so either streams. tensorflow-datasets itself is imported
only when a TFDS dataset is used (`pip install 'convjax[tfds]'`, no TensorFlow); TensorFlow
(`'convjax[tfds-prepare]'`) only to download and prepare one, or to read another file format
through TFDS' `as_dataset`.
"""

import difflib
import importlib.util
import os
import threading
from typing import NamedTuple, Optional, Sequence

import numpy as np
from absl import logging

from convjax.data import folders, tfrecord
from convjax.data.preprocess import resize_bilinear, to_uint8
from convjax.errors import UserError


def tfds_module():
  """tensorflow_datasets, or one UserError saying what to install."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise UserError(
      f"TFDS datasets need tensorflow-datasets ({e}): pip install 'convjax[tfds]', or "
      "train from an image folder (config.data.folder) or arrays (config.data.arrays)"
    ) from None
  return tfds


class RowRange(NamedTuple):
  """Rows [start, stop) of the TFDS split `split`."""

  split: str
  start: int
  stop: int

  @property
  def size(self) -> int:
    return self.stop - self.start

  def sub(self, start: int, stop: int) -> "RowRange":
    """Rows [start, stop) of this range, clipped to it."""
    a, b = min(self.start + start, self.stop), min(self.start + stop, self.stop)
    return RowRange(self.split, a, b)

  def spec(self) -> str:
    return f"{self.split}[{self.start}:{self.stop}]"


def data_dir_in_use(data_dir: Optional[str]) -> Optional[str]:
  """`data_dir`, else TFDS_DATA_DIR as it is now (TFDS itself reads it once, at import)."""
  return data_dir or os.environ.get("TFDS_DATA_DIR") or None


def run_data_dir(data_dir: str) -> str:
  """The TFDS data directory a run records in its config.json: `data_dir`, else TFDS_DATA_DIR
  as it is now, a local path made absolute ('' for TFDS' default). The run's readers
  (evaluate, explain, predict) then find its data from another shell or working directory,
  where TFDS would otherwise try to download it."""
  where = data_dir_in_use(data_dir) or ""
  return os.path.abspath(where) if where and "://" not in where else where


def recorded_data_dir(where: str) -> str:
  """A run's recorded data directory (run_data_dir) where it is on this machine, else '' (then
  TFDS_DATA_DIR or TFDS' default, as a run that recorded none): a run copied elsewhere."""
  if where and "://" not in where and not os.path.isdir(where):
    logging.warning("the run's data directory %s is not here: reading TFDS_DATA_DIR or TFDS' default", where)
    return ""
  return where


def get_builder(name: str, data_dir: Optional[str] = None, download: bool = True):
  """The prepared TFDS builder for `name`, or one clear UserError."""
  tfds = tfds_module()
  data_dir = data_dir_in_use(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    close = difflib.get_close_matches(name, tfds.list_builders(), n=5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(
      f"unknown dataset {name!r}{hint}; valid names are TFDS datasets, see tfds.list_builders()"
    ) from None
  if builder.is_prepared():
    return builder
  where = data_dir or "TFDS' default data dir"
  if not download:
    raise UserError(
      f"dataset {name!r} is not prepared in {where} and download=False; "
      "set TFDS_DATA_DIR to a directory holding it (offline here: "
      "TFDS_DATA_DIR=../shared/datasets/tfds)"
    )
  try:
    builder.download_and_prepare()
  except Exception as e:  # network, permissions, checksum: all end the same way for the user
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    needs = (
      "; downloading and preparing needs TensorFlow: pip install 'convjax[tfds-prepare]'"
      if importlib.util.find_spec("tensorflow") is None
      else ""
    )
    raise UserError(
      f"dataset {name!r} is not in {where} and could not be downloaded "
      f"({first_line[:200]}{needs}); set TFDS_DATA_DIR to a directory holding it "
      "(offline here: TFDS_DATA_DIR=../shared/datasets/tfds)"
    ) from None
  return builder


ROW_FORMATS = ("tfrecord", "array_record")


def file_format(builder) -> str:
  """'tfrecord', 'array_record' or another of TFDS' file formats, as the builder was prepared."""
  return str(builder.info.file_format).lower().rsplit(".", 1)[-1]


def random_access(builder) -> bool:
  """Whether the prepared dataset reads row by row without TensorFlow: its records are in
  TFRecord or ArrayRecord files. (Records that TFDS serves without files, such as
  tfds.testing.mock_data's, read through as_dataset.)"""
  if file_format(builder) not in ROW_FORMATS:
    return False
  files = [f.filename for split in builder.info.splits.values() for f in split.file_instructions[:1]]
  return bool(files) and all(os.path.exists(f) for f in files)


def _as_dataset(builder, **kwargs):
  """builder.as_dataset(**kwargs) as numpy."""
  _require_tensorflow(builder)
  return tfds_module().as_numpy(builder.as_dataset(**kwargs))


def _require_tensorflow(builder) -> None:
  """Another file format than TFRecord or ArrayRecord reads through TensorFlow: one UserError
  saying so, and how to do without, if it is missing."""
  if importlib.util.find_spec("tensorflow") is None:
    raise UserError(
      f"dataset {builder.name!r} in {builder.data_dir} is prepared as {file_format(builder)}, which "
      "needs TensorFlow to read: pip install 'convjax[tfds-prepare]', or prepare it as ArrayRecord (no "
      f"TensorFlow needed): tfds.builder({builder.name!r}, "
      "file_format='array_record').download_and_prepare()"
    )


def row_range(builder, spec: str) -> RowRange:
  """The absolute rows of a TFDS split spec such as 'train', 'train[:50000]', 'test[-10%:]'."""
  try:
    (instr,) = tfds_module().core.ReadInstruction.from_spec(spec).to_absolute(builder.info.splits)
  except (ValueError, KeyError) as e:
    raise UserError(
      f"bad split {spec!r} for dataset {builder.name!r} (splits: {', '.join(builder.info.splits)}): {e}"
    ) from None
  n = builder.info.splits[instr.splitname].num_examples
  return RowRange(instr.splitname, instr.from_ or 0, n if instr.to is None else instr.to)


class Rows:
  """Random access to rows of a split in TFRecord or ArrayRecord format: `rows[i]` is
  {'image': uint8 (H, W, C) as stored, 'label': int} of absolute row positions[i]. Picklable:
  streaming workers open the files themselves.

  Records are read one at a time (seek + read) from readers without parallelism, one set per
  thread: array_record's batched read hands every call to its 64-thread pool, ~24 us a record
  of CPU on 2 cores against ~5 us (BENCHMARKS.md); a TFRecord file's record offsets are found
  once per process (TFRecordFile). For an encoded image with a class label
  (tfds.features.Image, ClassLabel), a record is parsed with TFDS' own tf.Example proto
  (protobuf's C parser, ~2 us) instead of TFDS' per-feature numpy decoding (25-70 us); the
  image stays encoded until it is decoded here: PNG by libspng (pyspng, ~7 against Pillow's
  ~30 us an MNIST image), other formats by Pillow.
  """

  def __init__(self, builder, split: str, positions: np.ndarray, image_key: str = "image", label_key: str = "label"):
    self.name, self.data_dir, self.split = builder.name, str(builder.data_dir), split
    self.positions, self.keys = np.asarray(positions, np.int64), (image_key, label_key)
    features = builder.info.features
    self.channels = features[image_key].shape[-1]
    tfds = tfds_module()
    self.as_proto = isinstance(features[image_key], tfds.features.Image) and isinstance(
      features[label_key], tfds.features.ClassLabel
    )
    self.tfrecord = file_format(builder) == "tfrecord"
    self._opened = None

  def __getstate__(self):
    return {**self.__dict__, "_opened": None}

  def _open(self) -> tuple:
    """(the split's features, the first row of each shard file, this thread's reader of each
    file), opened on first use."""
    if self._opened is None:
      info = tfds_module().builder_from_directory(self.data_dir).info
      shards = info.splits[self.split].file_instructions
      starts = np.cumsum([0] + [s.take for s in shards[:-1]])
      offsets = {s.filename: tfrecord.record_offsets(s.filename) for s in shards} if self.tfrecord else {}
      self._opened = info.features, starts, [(s.filename, s.skip) for s in shards], offsets, threading.local()
    features, starts, files, offsets, local = self._opened
    if not hasattr(local, "readers"):
      if self.tfrecord:
        local.readers = [(tfrecord.TFRecordFile(f, offsets[f]), skip) for f, skip in files]
      else:
        from array_record.python.array_record_module import ArrayRecordReader

        options = "readahead_buffer_size:0,max_parallelism:0"
        local.readers = [(ArrayRecordReader(f, options), skip) for f, skip in files]
    return features, starts, local.readers

  def _records(self, positions: Sequence[int]) -> list:
    """The serialized records at absolute row `positions` of the split."""
    _, starts, readers = self._open()
    out = []
    for shard, position in zip(np.searchsorted(starts, positions, side="right") - 1, positions, strict=True):
      reader, skip = readers[shard]
      reader.seek(int(position - starts[shard] + skip))
      out.append(reader.read())
    return out

  def _examples(self, positions: Sequence[int]) -> list:
    """{image key: encoded bytes, label key: int} of the rows at `positions`."""
    records = self._records(positions)
    image, label = self.keys
    if not self.as_proto:
      skip = {image: tfds_module().decode.SkipDecoding()}
      return [self._open()[0].deserialize_example_np(r, decoders=skip) for r in records]
    from google.protobuf.message import DecodeError

    example, out = tfrecord.example_proto(), []
    for record, position in zip(records, positions, strict=True):
      try:
        feature = example.FromString(record).features.feature
      except DecodeError as e:  # a record that is not a tf.Example
        raise UserError(
          f"row {position} of {self.name}'s {self.split!r} split in {self.data_dir}: its record does not parse ({e})"
        ) from None
      out.append({image: feature[image].bytes_list.value[0], label: feature[label].int64_list.value[0]})
    return out

  def _row(self, example, position: int) -> dict:
    try:
      pixels = folders.decode_pixels(example[self.keys[0]], self.channels, f"row {position}")
    except folders.DECODE_ERRORS as e:
      raise UserError(
        f"row {position} of {self.name}'s {self.split!r} split in {self.data_dir}: its image does not decode ({e})"
      ) from None
    return {"image": pixels, "label": int(example[self.keys[1]])}

  def __len__(self) -> int:
    return len(self.positions)

  def __getitem__(self, i: int) -> dict:
    return self.read([i])[0]

  def read(self, indices: Sequence[int]) -> list:
    """Many rows at once."""
    positions = self.positions[np.asarray(indices, np.int64)]
    return [self._row(e, p) for e, p in zip(self._examples(positions), positions, strict=True)]


def stack_rows(rows: list, image_size: tuple = ()) -> dict:
  """{'image': uint8 (n, H, W, C), 'label': int32 (n,)} of row dicts, resized bilinearly to
  image_size (as tf.image.resize) when given."""
  images = [
    r["image"]
    if not image_size or r["image"].shape[:2] == tuple(image_size)
    else to_uint8(resize_bilinear(r["image"], tuple(image_size)))
    for r in rows
  ]
  return {"image": np.stack(images), "label": np.asarray([r["label"] for r in rows], np.int32)}


def read_rows(
  builder, rows: RowRange, image_key: str = "image", label_key: str = "label", image_size: tuple = ()
) -> dict:
  """{'image': uint8 (n, H, W, C), 'label': int32 (n,)} for `rows`, in split order.

  With `image_size` (height, width), images are resized bilinearly (tf.image.resize)
  and rounded back to uint8, so datasets of mixed image sizes can be batched.
  """
  n = rows.size
  if random_access(builder):
    source = Rows(builder, rows.split, np.arange(rows.start, rows.stop), image_key, label_key)
    if n:
      return stack_rows(source.read(range(n)), image_size)
    first = stack_rows(Rows(builder, rows.split, [0], image_key, label_key).read([0]), image_size)
    return {k: v[:0] for k, v in first.items()}
  # An empty range (a process whose rows are all padding) reads one row for the shapes.
  spec = rows.spec() if rows.size else f"{rows.split}[0:1]"
  if not image_size:
    arrays = _as_dataset(builder, split=spec, batch_size=-1, shuffle_files=False)
    return {"image": np.asarray(arrays[image_key])[:n], "label": np.asarray(arrays[label_key], np.int32)[:n]}
  _require_tensorflow(builder)
  import tensorflow as tf  # TFDS' own dependency for its other formats; only this path needs it directly

  def resize(example):
    image = tf.image.resize(example[image_key], image_size, method="bilinear")
    return {
      "image": tf.cast(tf.round(tf.clip_by_value(image, 0, 255)), tf.uint8),
      "label": tf.cast(example[label_key], tf.int32),
    }

  ds = builder.as_dataset(split=spec, shuffle_files=False).map(resize).batch(1024)
  parts = list(tfds_module().as_numpy(ds))
  return {k: np.concatenate([p[k] for p in parts])[:n] for k in ("image", "label")}


def labels_of(builder, rows: RowRange, label_key: str = "label") -> np.ndarray:
  """The labels of `rows` without decoding images."""
  if random_access(builder):
    source = Rows(builder, rows.split, np.arange(rows.start, rows.stop), label_key=label_key)
    return np.asarray([e[label_key] for e in source._examples(source.positions)], np.int64)
  skip = {k: tfds_module().decode.SkipDecoding() for k in builder.info.features if k != label_key}
  ds = _as_dataset(builder, split=rows.spec(), shuffle_files=False, decoders=skip)
  return np.fromiter((ex[label_key] for ex in ds), np.int64, count=rows.size)


def balanced_positions(builder, spec: str, per_class: tuple, label_key: str = "label") -> list:
  """Row positions in `spec`'s split for class-balanced subsets taken in order.

  Walking the rows of `spec` in order, each class's first per_class[0] rows go
  to the first subset, its next per_class[1] to the second, and so on (the way
  Chollet's cats_and_dogs_small takes cats and dogs 1-1000, 1001-1500, ...).
  Returns one sorted int64 array of absolute rows per subset.
  """
  rows = row_range(builder, spec)
  labels = labels_of(builder, rows, label_key)
  bounds = np.cumsum((0,) + tuple(per_class))
  subsets = [[] for _ in per_class]
  for c in np.unique(labels):
    where = np.flatnonzero(labels == c)
    if len(where) < bounds[-1]:
      raise UserError(
        f"{spec!r} of dataset {builder.name!r} has {len(where)} rows of class {c}, "
        f"fewer than the {bounds[-1]} that per_class={tuple(per_class)} takes"
      )
    for i, subset in enumerate(subsets):
      subset.append(where[bounds[i] : bounds[i + 1]])
  return [np.sort(np.concatenate(s)) + rows.start for s in subsets]


def read_positions(builder, spec: str, positions: np.ndarray, image_size: tuple = ()) -> dict:
  """read_rows for arbitrary sorted rows of `spec`'s split (reads the range that covers them)."""
  split = row_range(builder, spec).split
  if random_access(builder) and len(positions):
    return stack_rows(Rows(builder, split, positions).read(range(len(positions))), image_size)
  if len(positions) == 0:
    first = read_rows(builder, RowRange(split, 0, 1), image_size=image_size)
    return {k: v[:0] for k, v in first.items()}
  start = int(positions[0])
  arrays = read_rows(builder, RowRange(split, start, int(positions[-1]) + 1), image_size=image_size)
  return {k: v[positions - start] for k, v in arrays.items()}


def resolve_splits(
  builder, train_split: str, validation_split: Optional[str], validation_size: int, test_split: Optional[str]
) -> dict:
  """{'train': RowRange, 'validation': RowRange, ['test': RowRange]}.

  Without a validation_split, the last `validation_size` rows of train_split
  become the validation set (Keras' validation_split, but deterministic).
  """
  splits = {"train": row_range(builder, train_split)}
  if validation_split:
    splits["validation"] = row_range(builder, validation_split)
  else:
    train = splits["train"]
    if not 0 < validation_size < train.size:
      raise UserError(
        f"validation_size={validation_size} must be in (0, {train.size}) for "
        f"train split {train_split!r}, or set validation_split"
      )
    splits["train"] = train.sub(0, train.size - validation_size)
    splits["validation"] = train.sub(train.size - validation_size, train.size)
  if test_split:
    splits["test"] = row_range(builder, test_split)
  return splits
