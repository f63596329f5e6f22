"""ImageNet's class names as keras.applications gives them: `decode_predictions`.

(The 'caffe' input preprocessing is data: convjax.data.preprocess.preprocess_input.)"""

import json
from typing import Optional

import numpy as np

from convjax.pretrained import fetch


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
