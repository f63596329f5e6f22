"""Plain arrays as a data source, for users who bring their own (no TFDS, no TensorFlow).

`config.data.arrays=DIR` holds one of, per split name (the *_split fields):

  DIR/<split>.npz                          arrays 'image' (N, H, W, C) uint8, 'label' (N,) int
                                           (read whole when opened: for data that fits memory)
  DIR/<split>_image.npy, <split>_label.npy the same as two .npy files (images read row by
                                           row, so a split larger than host memory streams)

and optionally DIR/classes.txt, one class name per line (label i is line i);
without it the classes are '0', '1', ... up to the largest label.
"""

import os
import zipfile
from typing import NamedTuple

import numpy as np

from convjax.errors import UserError


class NpyFile:
  """The rows of a .npy file, read with os.pread as they are asked for: nothing is mapped or
  kept, so host memory does not grow with the file, and it pickles small (grain workers)."""

  def __init__(self, path: str):
    with open(path, "rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      shape, fortran, dtype = read_header(f)
      self.offset = f.tell()
    if fortran and len(shape) > 1:
      raise UserError(f"{path!r} is stored in Fortran order; save it with np.save of a C-ordered array")
    self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
    self.ndim, self.row_bytes = len(shape), int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
    self._fd = None

  def __getstate__(self):
    return {**self.__dict__, "_fd": None}

  def __len__(self) -> int:
    return self.shape[0]

  def _read(self, start: int, count: int) -> np.ndarray:
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    data = os.pread(self._fd, count * self.row_bytes, self.offset + start * self.row_bytes)
    if len(data) != count * self.row_bytes:
      raise UserError(f"{self.path!r} is truncated: rows {start}..{start + count - 1} of {self.shape[0]} are missing")
    return np.frombuffer(data, self.dtype).reshape(count, *self.shape[1:])

  def __getitem__(self, index):
    if np.isscalar(index):
      return self._read(int(index), 1)[0]
    index = np.asarray(index, np.int64)
    if len(index) and np.all(np.diff(index) == 1):  # a range: one read
      return self._read(int(index[0]), len(index))
    return (
      np.stack([self._read(int(i), 1)[0] for i in index]) if len(index) else np.zeros((0, *self.shape[1:]), self.dtype)
    )


class ArraySplit(NamedTuple):
  """A split's arrays (.npy images: nothing is read until rows are)."""

  path: str
  images: object  # (N, H, W, C) uint8: an array (.npz) or an NpyFile
  labels: np.ndarray


def open_split(directory: str, split: str) -> ArraySplit:
  """The arrays of `split` in `directory`; a missing file or a bad shape is a UserError naming it."""
  npz = os.path.join(directory, f"{split}.npz")
  npy = [os.path.join(directory, f"{split}_{k}.npy") for k in ("image", "label")]
  if os.path.isfile(npz):
    try:
      archive = np.load(npz)
      images, labels, path = archive["image"], np.asarray(archive["label"]), npz
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
      raise UserError(f"cannot read {npz!r} (expected arrays 'image' and 'label'): {e}") from None
  elif all(os.path.isfile(p) for p in npy):
    try:
      images, labels, path = NpyFile(npy[0]), np.load(npy[1]), npy[0]
    except (ValueError, OSError) as e:
      raise UserError(f"cannot read {npy[0]!r} / {npy[1]!r}: {e}") from None
  else:
    found = sorted(f for f in os.listdir(directory)) if os.path.isdir(directory) else None
    raise UserError(
      f"no arrays for split {split!r}: expected {npz!r} or {npy[0]!r} with {npy[1]!r} "
      f"({'found: ' + ', '.join(found) if found else 'the folder does not exist' if found is None else 'the folder is empty'})"
    )
  if images.ndim != 4 or images.dtype != np.uint8 or labels.shape != (images.shape[0],):
    raise UserError(
      f"{path!r}: expected image uint8 (N, H, W, C) and label (N,), got image "
      f"{images.dtype} {images.shape} and label {labels.shape}"
    )
  return ArraySplit(path, images, labels.astype(np.int32))


def class_names(directory: str, labels: list) -> tuple:
  """DIR/classes.txt, else '0'..str(max label) over the splits' `labels` arrays."""
  listed = os.path.join(directory, "classes.txt")
  if os.path.isfile(listed):
    with open(listed) as f:
      return tuple(line.strip() for line in f if line.strip())
  top = max(int(split.max()) for split in labels if len(split))
  return tuple(str(i) for i in range(top + 1))


class ArrayRows:
  """Random access to rows `index` of an ArraySplit: rows[i] = {'image', 'label'} (streaming)."""

  def __init__(self, split: ArraySplit, index: np.ndarray):
    self.split, self.index = split, np.asarray(index, np.int64)
    self.where = split.path

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int) -> dict:
    j = int(self.index[i])
    return {"image": np.asarray(self.split.images[j]), "label": int(self.split.labels[j])}

  def read(self, indices) -> list:
    """Many rows at once (a range of the file is one read)."""
    rows = self.index[np.asarray(indices, np.int64)]
    images = np.asarray(self.split.images[rows])
    return [{"image": image, "label": int(label)} for image, label in zip(images, self.split.labels[rows], strict=True)]
