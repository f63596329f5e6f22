"""ImageNet conventions of keras.applications: 'caffe' preprocessing and decoded predictions."""
import json
from typing import Optional

import jax.numpy as jnp
import numpy as np

from convjax.pretrained import fetch

# ImageNet channel means in BGR order, as Keras' 'caffe' mode subtracts them.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def preprocess_input(x):
  """RGB pixels in [0, 255] -> BGR minus the ImageNet channel means (no scaling)."""
  return x[..., ::-1] - jnp.asarray(CAFFE_MEAN_BGR, x.dtype)


def class_index(path: Optional[str] = None) -> dict:
  """{index: (wnid, name)} from imagenet_class_index.json (local copy or Keras' URL)."""
  with open(fetch.get_file("imagenet_class_index.json", path)) as f:
    return {int(k): tuple(v) for k, v in json.load(f).items()}


def decode_predictions(probs, top: int = 5, index_path: Optional[str] = None) -> list:
  """For each row of (N, 1000) probabilities, the top `top` (wnid, name, probability)."""
  probs = np.asarray(probs)
  if probs.ndim != 2 or probs.shape[1] != 1000:
    raise ValueError(f"decode_predictions expects (N, 1000) probabilities, got {probs.shape}")
  index = class_index(index_path)
  out = []
  for row in probs:
    best = np.argsort(row)[::-1][:top]
    out.append([(*index[int(i)], float(row[i])) for i in best])
  return out
