"""Image folders, Keras' `flow_from_directory` layout: root/<split>/<class>/*.jpg.

Classes are the sub-folders of the first split read, sorted by name (label i
is the i-th class); every other split must have the same class folders. Files
are decoded (JPEG by libjpeg-turbo through simplejpeg, other formats and the JPEGs
it cannot by Pillow), converted to the requested channel count (grayscale,
RGBA and palette images alike), resized bilinearly to `image_size` and kept
as uint8. A split is decoded once per process and cached in memory; during
training it lives on the devices, so no epoch decodes anything.
"""

import concurrent.futures
import io
import os
import shutil
import tarfile
import tempfile
import zipfile
from typing import NamedTuple, Optional, Sequence

import numpy as np
import pyspng
import simplejpeg
from absl import logging
from PIL import Image

from convjax import files
from convjax.data.preprocess import resize_bilinear, to_uint8
from convjax.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
PIL_MODES = {1: "L", 3: "RGB"}
LABEL_MODES = ("int", "binary", "categorical")


class FolderSplit(NamedTuple):
  """One split's files in label order, before decoding."""

  directory: str
  classes: tuple
  files: tuple  # paths, class by class, each class's files sorted by name
  labels: np.ndarray  # int32, one per file


ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip")


def extracted_root(path: str, cache_dir: Optional[str] = None) -> str:
  """`path` itself if it is a folder; an archive is extracted once into the cache.

  The extraction lands in <cache_dir>/<archive name>-<size>-<mtime>/ (renamed
  into place when complete, so an interrupted run never leaves half of it); if
  the archive holds a single top folder, that folder is the root.
  """
  if not path.endswith(ARCHIVES):
    return path
  if not os.path.isfile(path):
    raise UserError(f"image folder archive {path!r} does not exist")
  cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "convjax")
  stat = os.stat(path)
  target = os.path.join(cache_dir, f"{os.path.basename(path)}-{stat.st_size}-{int(stat.st_mtime)}")
  if not os.path.isdir(target):
    with files.writing(cache_dir):
      files.make_dir(cache_dir)
      staging = tempfile.mkdtemp(prefix=".extract_", dir=cache_dir)
    logging.info("extracting %s into %s (once)", path, target)
    try:
      with files.writing(target):  # a failed write to the cache's disk is one "cannot write" line
        if path.endswith(".zip"):
          with zipfile.ZipFile(path) as archive:
            archive.extractall(staging)
        else:
          with tarfile.open(path) as archive:
            archive.extractall(staging, filter="data")
        os.rename(staging, target)
    except (tarfile.TarError, zipfile.BadZipFile, OSError, UserError) as e:
      shutil.rmtree(staging, ignore_errors=True)
      if os.path.isdir(target):  # another process finished the same extraction first
        return extracted_root(path, cache_dir)
      if isinstance(e, UserError):
        raise
      raise UserError(f"cannot extract image folder archive {path!r}: {e}") from None
  entries = [e for e in os.listdir(target) if not e.startswith(".")]
  if len(entries) == 1 and os.path.isdir(os.path.join(target, entries[0])):
    return os.path.join(target, entries[0])
  return target


def list_split(root: str, split: str, classes: Optional[Sequence[str]] = None) -> FolderSplit:
  """The files of root/split/<class>/; errors name the folder that is missing or empty."""
  directory = os.path.join(root, split) if split else root
  if not os.path.isdir(root):
    raise UserError(f"image folder root {root!r} does not exist")
  if not os.path.isdir(directory):
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    raise UserError(f"split folder {directory!r} does not exist (splits in {root!r}: {', '.join(found) or 'none'})")
  found = tuple(sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d))))
  if not found:
    raise UserError(f"split folder {directory!r} has no class sub-folders (expected {directory}/<class>/*.jpg)")
  if classes is not None and tuple(classes) != found:
    raise UserError(f"split folder {directory!r} has classes {list(found)} but the training split has {list(classes)}")
  files, labels = [], []
  for label, name in enumerate(found):
    class_dir = os.path.join(directory, name)
    names = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
      raise UserError(f"class folder {class_dir!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    files += [os.path.join(class_dir, f) for f in names]
    labels += [label] * len(names)
  return FolderSplit(directory, found, tuple(files), np.asarray(labels, np.int32))


# Pillow's integer modes wider than 8 bits (16-bit PNG and TIFF grayscale): convert() would clip
# them to 255, so they are scaled to 8 bits here (x / 257, 0..65535 -> 0..255).
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_8_bits(img, path: str) -> "Image.Image":
  """An 8-bit Pillow image of `img`; a 16-bit one scaled (not clipped); one that 8 bits cannot
  hold faithfully (32-bit integers beyond 16 bits, floats) is a UserError naming the file."""
  if img.mode in WIDE_MODES:
    wide = np.asarray(img).astype(np.int64)
    if wide.size and (wide.min() < 0 or wide.max() > 65535):
      raise UserError(
        f"image {path!r} has {img.mode} pixels outside 0..65535 "
        f"({wide.min()}..{wide.max()}): convert it to 8 or 16 bits"
      )
    return Image.fromarray(np.rint(wide / 257.0).astype(np.uint8), mode="L")
  if img.mode == "F":
    raise UserError(
      f"image {path!r} has 32-bit float pixels, which 8 bits cannot hold faithfully: convert it to 8 or 16 bits"
    )
  return img


JPEG_SIGNATURE = b"\xff\xd8\xff"


def decode_jpeg(encoded: bytes, channels: int) -> Optional[np.ndarray]:
  """uint8 (H, W, channels) of a JPEG decoded by libjpeg-turbo through simplejpeg, or None
  where Pillow decodes it (not a JPEG, CMYK, damaged bytes: Pillow converts it or names the error).

  Pillow decodes JPEG with the same libjpeg-turbo and settings (the accurate integer DCT,
  fancy upsampling), and its pixels are these: identical on the shared cats-vs-dogs photos
  (tests/test_folders.py) and CIFAR-10 images. What simplejpeg saves is
  Pillow's per-image Python (Image.open's header parsing, the image object): a 32x32
  CIFAR-10 image decodes in ~24 instead of ~100 us here, a 256-px photo in ~220 instead
  of ~360. Grey from a colour JPEG is Pillow's conversion of the RGB pixels (libjpeg's
  own grey, its luma channel, differs by up to 21 levels)."""
  if encoded[:3] != JPEG_SIGNATURE or channels not in PIL_MODES:
    return None
  try:
    space = simplejpeg.decode_jpeg_header(encoded)[2]
    if space not in ("YCbCr", "Gray"):  # CMYK, YCCK: Pillow's conversion, not libjpeg's
      return None
    grey = space == "Gray"
    if channels == 1 and not grey:
      rgb = simplejpeg.decode_jpeg(encoded, colorspace="RGB")
      return np.asarray(Image.fromarray(rgb).convert("L"))[..., None]
    return simplejpeg.decode_jpeg(encoded, colorspace="GRAY" if channels == 1 else "RGB")
  except ValueError:  # damaged bytes: Pillow's error names them
    return None


def read_bytes(path: str) -> bytes:
  """A file's bytes in four system calls (open, fstat, read, close): ~9 us a CIFAR-10 image
  here against ~15 for Python's open().read(), which also asks whether it is a terminal and
  reads once more to find the end."""
  fd = os.open(path, os.O_RDONLY)
  try:
    size = os.fstat(fd).st_size
    data = os.read(fd, size + 1)
    if len(data) != size:  # a short read, or a file that grew: read on to its end
      chunks = [data]
      while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
      data = b"".join(chunks)
    return data
  finally:
    os.close(fd)


def decode_image(path: str, channels: int, image_size: Optional[Sequence[int]]) -> np.ndarray:
  """uint8 (H, W, channels); raises UserError naming the file if it is not a readable image.
  16-bit images are scaled to 8 bits, not clipped."""
  return decode_bytes(_file_bytes(path), path, channels, image_size)


def _unreadable(path: str, e: Exception) -> UserError:
  return UserError(f"cannot read image {path!r}: {e}")


def _file_bytes(path: str) -> bytes:
  try:
    return read_bytes(path)
  except OSError as e:
    raise _unreadable(path, e) from None


def decode_bytes(encoded: bytes, path: str, channels: int, image_size: Optional[Sequence[int]]) -> np.ndarray:
  """decode_image of the bytes `encoded` of the file `path` (named in its error)."""
  try:
    array = decode_pixels(encoded, channels, path)
  except DECODE_ERRORS as e:
    raise _unreadable(path, e) from None
  if image_size and tuple(image_size) != array.shape[:2]:
    array = to_uint8(resize_bilinear(array, tuple(image_size)))
  return array


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# pyspng's output format for a channel count (as tf.io.decode_png(channels=c) decodes).
PNG_FORMATS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
# What decode_pixels raises for bytes that do not decode: pyspng's RuntimeError, Pillow's
# OSError (UnidentifiedImageError among them), ValueError and SyntaxError.
DECODE_ERRORS = (RuntimeError, OSError, ValueError, SyntaxError)


def decode_pixels(encoded: bytes, channels: int, name: str) -> np.ndarray:
  """uint8 (H, W, channels) of an encoded image, the one decoder of image folders and TFRecord
  rows: JPEG by simplejpeg (decode_jpeg), PNG of up to 8 bits a sample by libspng (pyspng,
  ~7 against Pillow's ~30 us an MNIST image, the same pixels), other formats and images those
  do not convert to `channels` (colour PNG to grey, CMYK) by Pillow. 16-bit PNGs go to Pillow
  too: to_8_bits rounds x / 257 where libspng would drop the low byte. Raises DECODE_ERRORS for
  bytes that do not decode, a UserError naming `name` for pixels that 8 bits cannot hold."""
  pixels = None
  if encoded[:8] == PNG_SIGNATURE:
    if encoded[24:25] != b"\x10":  # IHDR's bit depth: 1, 2, 4, 8 or 16
      try:
        pixels = pyspng.load(encoded, PNG_FORMATS.get(channels))
      except RuntimeError:
        pass  # a colour type libspng does not convert, or damaged bytes: Pillow says which
  else:
    pixels = decode_jpeg(encoded, channels)
  if pixels is None:
    with Image.open(io.BytesIO(encoded)) as image:
      mode = PIL_MODES.get(channels)
      image = to_8_bits(image, name)
      pixels = np.asarray(image if image.mode == mode or mode is None else image.convert(mode))
  return pixels.reshape(*pixels.shape[:2], channels)


class FolderRows:
  """Random access to a listing's files for streaming: rows[i] is {'image': uint8 (H, W,
  channels) as stored, 'label'}. An unreadable file is a UserError naming it, or with
  `skip_bad_files` None (the pipeline masks the row out and counts it)."""

  def __init__(self, files: Sequence[str], labels: np.ndarray, channels: int, skip_bad_files: bool = False):
    self.files, self.labels = tuple(files), np.asarray(labels, np.int32)
    self.channels, self.skip_bad_files = channels, skip_bad_files

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int):
    return self.read([i])[0]

  def read(self, indices) -> list:
    """rows[i] for each of `indices`: every file read, then every image decoded. In that order
    a CIFAR-10 image costs ~36 instead of ~42 us of host time here: the system calls of
    reading between two decodes leave the decoder's code and tables cold (BENCHMARKS.md)."""
    files = [self.files[int(i)] for i in indices]
    encoded = [self._unless_skipped(_file_bytes, f) for f in files]
    return [
      None if e is None else self._unless_skipped(self._row, f, e, int(i))
      for f, e, i in zip(files, encoded, indices, strict=True)
    ]

  def _row(self, path: str, encoded: bytes, i: int) -> dict:
    return {"image": decode_bytes(encoded, path, self.channels, None), "label": int(self.labels[i])}

  def _unless_skipped(self, fn, *args):
    """fn(*args), or None for its UserError with skip_bad_files."""
    try:
      return fn(*args)
    except UserError:
      if not self.skip_bad_files:
        raise
      return None


def decode_split(
  split: FolderSplit,
  channels: int = 3,
  image_size: Optional[Sequence[int]] = None,
  skip_bad_files: bool = False,
  num_threads: int = 8,
  fit=None,
) -> dict:
  """{'image': uint8 (n, H, W, channels), 'label': int32 (n,)} for every readable file.

  Without `image_size` all images must share one size; `fit` (convjax.data.preprocess.Fit:
  a centre crop, then the resize) replaces the plain resize to image_size. Unreadable
  files are an error, or with `skip_bad_files` dropped and counted in the log.
  """
  if channels not in PIL_MODES:
    raise UserError(f"channels must be 1 or 3, got {channels}")

  def decode(path):
    try:
      return fit(decode_image(path, channels, None)) if fit else decode_image(path, channels, image_size)
    except UserError:
      if not skip_bad_files:
        raise
      return None

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:  # Pillow decodes without the GIL
    images = list(pool.map(decode, split.files))
  keep = [i for i, x in enumerate(images) if x is not None]
  if len(keep) < len(images):
    bad = [split.files[i] for i, x in enumerate(images) if x is None]
    logging.warning(
      "skipped %d unreadable file(s) in %s: %s%s",
      len(bad),
      split.directory,
      ", ".join(bad[:5]),
      " ..." if len(bad) > 5 else "",
    )
  if not keep:
    raise UserError(f"split folder {split.directory!r} has no readable images")
  first = images[keep[0]].shape
  for i in keep:
    if images[i].shape != first:
      raise UserError(
        f"image {split.files[i]!r} is {images[i].shape[1]}x{images[i].shape[0]} but "
        f"{split.files[keep[0]]!r} is {first[1]}x{first[0]}; set an image size "
        "(--config.data.image_size='(150, 150)') to resize them all"
      )
  return {"image": np.stack([images[i] for i in keep]), "label": split.labels[keep]}


def encode_labels(labels: np.ndarray, num_classes: int, label_mode: str = "int") -> np.ndarray:
  """Keras' class_mode: 'int' (sparse), 'binary' (float 0/1), 'categorical' (one-hot float)."""
  if label_mode == "int":
    return labels
  if label_mode == "binary":
    if num_classes != 2:
      raise UserError(f"label_mode='binary' needs 2 classes, the folder has {num_classes}")
    return labels.astype(np.float32)
  if label_mode == "categorical":
    return np.eye(num_classes, dtype=np.float32)[labels]
  raise UserError(f"unknown label_mode {label_mode!r}; valid: {', '.join(LABEL_MODES)}")


def load_folder(
  root: str,
  split: str,
  image_size: Optional[Sequence[int]] = None,
  channels: int = 3,
  label_mode: str = "int",
  skip_bad_files: bool = False,
) -> tuple:
  """One call for notebooks: (images uint8, labels, class names) of root/split."""
  listing = list_split(root, split)
  arrays = decode_split(listing, channels, image_size, skip_bad_files)
  return arrays["image"], encode_labels(arrays["label"], len(listing.classes), label_mode), listing.classes
