"""TFRecord files without TensorFlow: record offsets, reading by index, tf.Example rows.

TFRecord has no index: `record_offsets` finds each record once from the headers and keeps
the offsets in the cache directory. `TFRecordFile` then reads any record by index, which is
what TFDS' TFRecord datasets (convjax/data/tfds.py) and a user's own tf.Example files
(`config.data.tfrecord`, `ExampleRows` below) stream with. Records are parsed with TFDS' own
tf.Example proto (protobuf's C parser), so this needs tensorflow-datasets, not TensorFlow.

A user's folder `config.data.tfrecord=DIR` holds TFRecord files of tf.Example records, each
with an encoded image (PNG, JPEG or any format Pillow reads; feature `data.image_feature`)
and an int64 label (`data.label_feature`); the *_split fields are globs of the files in DIR
('train-*.tfrecord'); DIR/classes.txt names the classes (line i: label i), else they are
'0'..the largest label.
"""

import functools
import glob
import hashlib
import os
import struct
import threading
from typing import NamedTuple, Sequence

import numpy as np
from absl import logging

from convjax import files
from convjax.data.folders import DECODE_ERRORS, decode_pixels
from convjax.errors import UserError


def masked_crc32c(data: bytes) -> int:
  """TFRecord's checksum of `data`: CRC-32C (google-crc32c's C code, ~4 us per 100 kB), rotated
  right by 15 bits plus a constant, as TensorFlow's record writer masks it."""
  import google_crc32c

  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(record: bytes) -> bytes:
  """One TFRecord record: 8-byte length, its masked CRC-32C, the data, its masked CRC-32C."""
  header = struct.pack("<Q", len(record))
  return b"".join((header, struct.pack("<I", masked_crc32c(header)), record, struct.pack("<I", masked_crc32c(record))))


class TFRecordFile:
  """The records of one TFRecord file by index (`seek(i)`, then `read()`), the reader API of
  ArrayRecord's, at the offsets of `record_offsets(path)`; each record's data CRC is checked
  (one UserError naming the file and record). Hand-written because no maintained reader
  without TensorFlow gives random access to TFRecord."""

  def __init__(self, path: str, offsets: np.ndarray):
    self.path, self.offsets, self._file, self._next = path, offsets, open(path, "rb"), 0

  def seek(self, index: int) -> None:
    self._next = index

  def read(self) -> bytes:
    index = self._next
    start, stop = self.offsets[index], self.offsets[index + 1] - 12
    self._file.seek(start)
    self._next += 1
    data = self._file.read(stop - start)
    data, crc = data[:-4], data[-4:]
    if len(crc) != 4 or struct.unpack("<I", crc)[0] != masked_crc32c(data):
      raise UserError(
        f"{self.path}: record {index} (byte {start - 12}) has damaged data (its CRC-32C does not match); "
        "the file is not intact"
      )
    return data


def record_offsets(path: str) -> np.ndarray:
  """Where each record's data starts in the TFRecord file `path`, and where a record after the
  last would start (each record: 8-byte length, 4-byte length CRC, data, 4-byte data CRC):
  TFRecord has no index, so one pass over the headers, each length's CRC checked. The index
  is kept in the cache directory (`index_path`; never beside the data, which may be
  read-only), rebuilt when the file's size or modification time changes, and once per
  process in memory (the splits of a run share files)."""
  status = os.stat(path)
  return _record_offsets(os.path.abspath(path), status.st_size, status.st_mtime_ns)


def index_path(path: str, size: int, mtime_ns: int) -> str:
  """<cache dir>/tfrecord-index/<hash of the absolute path>-<size>-<mtime>.npy (the cache dir:
  CONVJAX_CACHE_DIR, default ~/.cache/convjax)."""
  from convjax.pretrained.fetch import cache_dir

  name = hashlib.sha256(path.encode()).hexdigest()[:20]
  return os.path.join(cache_dir(), "tfrecord-index", f"{name}-{size}-{mtime_ns}.npy")


@functools.lru_cache(maxsize=4096)
def _record_offsets(path: str, size: int, mtime_ns: int) -> np.ndarray:
  cached = index_path(path, size, mtime_ns)
  try:
    offsets = np.load(cached)
    if offsets.ndim == 1 and len(offsets) and offsets[-1] == size + 12 and (np.diff(offsets) > 0).all():
      return offsets
  except (OSError, ValueError):
    pass  # none yet, or unreadable: rebuilt below
  offsets = _scan_offsets(path, size)
  try:
    files.make_dir(os.path.dirname(cached))
    with files.output(cached, "wb") as out:
      np.save(out, offsets)
  except (UserError, OSError) as e:  # the index is a cache: reading goes on without it
    logging.warning("TFRecord index not kept (%s); %s is read again next time", e, path)
  return offsets


def _scan_offsets(path: str, size: int) -> np.ndarray:
  offsets, position = [], 0
  with open(path, "rb", buffering=1 << 16) as f:
    while position < size:
      header = f.read(12)
      (length,) = struct.unpack("<Q", header[:8]) if len(header) == 12 else (None,)
      if length is None or struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
        raise UserError(f"{path}: record {len(offsets)} (byte {position}) has a damaged header; the file is not intact")
      offsets.append(position + 12)
      position += 12 + length + 4
      f.seek(position)
  if position != size:
    raise UserError(f"{path}: the last record ends past the file's end ({position} > {size} bytes); it is truncated")
  return np.asarray(offsets + [position + 12], np.int64)


def example_proto():
  """TFDS' tf.Example message class, or one UserError saying what to install."""
  try:
    from tensorflow_datasets.proto import tf_example_pb2
  except ImportError as e:
    raise UserError(
      f"TFRecord files need tensorflow-datasets ({e}) for the tf.Example proto: pip install 'convjax[tfds]' "
      "(TensorFlow itself is not needed)"
    ) from None
  return tf_example_pb2.Example


class TFRecordSplit(NamedTuple):
  """The TFRecord files one split's glob (`pattern`: the folder joined with it) matched, in name
  order, and how many records each has."""

  pattern: str
  paths: tuple
  counts: tuple

  @property
  def size(self) -> int:
    return sum(self.counts)


def open_split(directory: str, pattern: str) -> TFRecordSplit:
  """The files of `pattern` in `directory`, each indexed (record_offsets); one UserError naming
  the glob when it matches nothing, or a file that is not intact."""
  paths = tuple(sorted(p for p in glob.glob(os.path.join(directory, pattern)) if os.path.isfile(p)))
  if not paths:
    found = sorted(os.listdir(directory))[:10] if os.path.isdir(directory) else None
    raise UserError(
      f"no TFRecord files match {os.path.join(directory, pattern)!r} "
      f"({'found: ' + ', '.join(found) if found else 'the folder does not exist' if found is None else 'the folder is empty'})"
    )
  return TFRecordSplit(os.path.join(directory, pattern), paths, tuple(len(record_offsets(p)) - 1 for p in paths))


class ExampleRows:
  """Random access to tf.Example records of a TFRecordSplit at `positions` (over its files in
  order): rows[i] = {'image': uint8 (H, W, channels), 'label': int}. Picklable: streaming
  workers open the files themselves, one reader per file and thread."""

  def __init__(self, split: TFRecordSplit, positions, image_feature: str, label_feature: str, channels: int):
    self.split, self.positions = split, np.asarray(positions, np.int64)
    self.features, self.channels = (image_feature, label_feature), channels
    self.starts = np.cumsum((0,) + split.counts[:-1])
    self.where = split.pattern
    self._local = None

  def __getstate__(self):
    return {**self.__dict__, "_local": None}

  def __len__(self) -> int:
    return len(self.positions)

  def __getitem__(self, i: int) -> dict:
    return self.read([i])[0]

  def _where(self, position: int) -> tuple:
    """(file index, record index in it) of a position of the split."""
    shard = int(np.searchsorted(self.starts, position, side="right") - 1)
    return shard, int(position - self.starts[shard])

  def _record(self, position: int) -> bytes:
    if self._local is None:
      self._local = threading.local()
    if not hasattr(self._local, "readers"):
      self._local.readers = [TFRecordFile(p, record_offsets(p)) for p in self.split.paths]
    shard, index = self._where(position)
    reader = self._local.readers[shard]
    reader.seek(index)
    return reader.read()

  def _example(self, position: int, with_image: bool = True) -> dict:
    from google.protobuf.message import DecodeError

    image_key, label_key = self.features
    shard, index = self._where(position)
    where = f"{self.split.paths[shard]}: record {index}"
    try:
      feature = example_proto().FromString(self._record(position)).features.feature
    except DecodeError as e:  # intact bytes (the CRC matched) of something else
      raise UserError(f"{where} is not a tf.Example ({e})") from None
    for key, kind in ((label_key, "int64_list"), (image_key, "bytes_list")):
      if key not in feature or feature[key].WhichOneof("kind") != kind or not getattr(feature[key], kind).value:
        raise UserError(
          f"{where} has no {kind.split('_')[0]} feature {key!r} (its features: {', '.join(sorted(feature)) or 'none'}); "
          "set config.data.image_feature and config.data.label_feature"
        )
    label = int(feature[label_key].int64_list.value[0])
    if not with_image:
      return {"label": label}
    try:
      image = decode_pixels(feature[image_key].bytes_list.value[0], self.channels, f"{where} ({image_key})")
    except DECODE_ERRORS as e:
      raise UserError(f"{where}: its image {image_key!r} does not decode ({e})") from None
    return {"image": image, "label": label}

  def read(self, indices: Sequence[int]) -> list:
    """Many rows at once."""
    return [self._example(int(p)) for p in self.positions[np.asarray(indices, np.int64)]]

  def labels(self) -> np.ndarray:
    """Every row's label, without decoding images."""
    return np.asarray([self._example(int(p), with_image=False)["label"] for p in self.positions], np.int64)
