"""Pretrained files by name: a local directory first, else a verified download into a cache.

Lookup order for a file name: the explicit path; $CONVJAX_WEIGHTS_DIR/<name>;
the cache (~/.cache/convjax/weights/<name>); else download it from its URL
into the cache, checking the published hash (MD5 or SHA-256, told apart by
length, as keras.utils.get_file does). A failed or mismatched download leaves
nothing in the cache. Offline, set CONVJAX_WEIGHTS_DIR (here ../shared/weights).
"""

import hashlib
import os
import urllib.request
from typing import NamedTuple, Optional

from absl import logging

from convjax import files
from convjax.errors import UserError

KERAS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"


class Remote(NamedTuple):
  url: str
  file_hash: str  # as published: 32 hex digits MD5, 64 SHA-256


# Keras' own URLs and hashes (keras/src/applications/vgg16.py, imagenet_utils.py).
FILES = {
  "vgg16_weights_tf_dim_ordering_tf_kernels.h5": Remote(
    KERAS_BASE + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5", "64373286793e3c8b2b4e3219cbf3544b"
  ),
  "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5": Remote(
    KERAS_BASE + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "6d6bbae143d832006294945121d1f1fc"
  ),
  "vgg19_weights_tf_dim_ordering_tf_kernels.h5": Remote(
    KERAS_BASE + "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels.h5", "cbe5617147190e668d6c5d5026f83318"
  ),
  "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5": Remote(
    KERAS_BASE + "vgg19/vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5", "253f8cb515780f3b799900260a226db6"
  ),
  "imagenet_class_index.json": Remote(
    "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json",
    "c2c37ea517e94d9795004a39431a14cb",
  ),
}


def cache_dir() -> str:
  return os.environ.get("CONVJAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "convjax")


def download(remote: Remote, target: str) -> str:
  """Downloads `remote` to `target` (atomically, through files.output), verifying its hash."""
  digest = (hashlib.md5 if len(remote.file_hash) == 32 else hashlib.sha256)()  # Keras publishes either
  logging.info("downloading %s", remote.url)
  files.make_dir(os.path.dirname(target))
  try:
    with urllib.request.urlopen(remote.url, timeout=60) as response, files.output(target, "wb") as out:
      for chunk in iter(lambda: response.read(1 << 20), b""):
        digest.update(chunk)
        out.write(chunk)
      if digest.hexdigest() != remote.file_hash.lower():
        raise UserError(
          f"download of {remote.url} has hash {digest.hexdigest()}, expected {remote.file_hash}; not kept"
        )
  except OSError as e:
    raise UserError(
      f"cannot download {remote.url} ({e}); offline, set CONVJAX_WEIGHTS_DIR to a "
      f"directory holding {os.path.basename(target)}"
    ) from None
  return target


def get_file(name: str, path: Optional[str] = None, remote: Optional[Remote] = None) -> str:
  """The local path of pretrained file `name` (see the module docstring for the order)."""
  if path:
    if not os.path.isfile(path):
      raise UserError(f"weights file {path!r} does not exist")
    return path
  local_dir = os.environ.get("CONVJAX_WEIGHTS_DIR")
  if local_dir and os.path.isfile(os.path.join(local_dir, name)):
    return os.path.join(local_dir, name)
  cached = os.path.join(cache_dir(), "weights", name)
  if os.path.isfile(cached):
    return cached
  remote = remote or FILES.get(name)
  if remote is None:
    raise UserError(f"no local copy of {name!r} (CONVJAX_WEIGHTS_DIR, {cache_dir()}) and no known URL")
  return download(remote, cached)
