"""The weights both sides of the parity tests use: He-normal kernels and small biases drawn
with numpy's PCG64 from a seed (stable across numpy versions and CPUs), in convjax's
parameter layout, so the fixtures store the seed instead of the cats-vs-dogs convnet's
3.4M weights."""

import numpy as np


def he_weights(shapes: dict, seed: int) -> dict:
  """{path: array} for {path: shape} (paths as tuples, kernels ending in 'kernel'), in the
  sorted order of the paths."""
  rng = np.random.default_rng(seed)
  out = {}
  for path in sorted(shapes):
    shape = shapes[path]
    if path[-1] == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      out[path] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    else:
      out[path] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
  return out


def paths(tree, prefix=()):
  """(path, leaf) of a nested dict, paths as tuples."""
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from paths(value, (*prefix, key))
    else:
      yield (*prefix, key), value


def nested(flat: dict) -> dict:
  """{path tuple: value} -> the nested dict."""
  out = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out
