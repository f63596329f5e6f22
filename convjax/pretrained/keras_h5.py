"""Keras HDF5 weights (the legacy `save_weights` layout), loaded by layer name.

The file's root attribute `layer_names` lists the layers; each layer's group has
an attribute `weight_names` ('block1_conv1/kernel' or '.../kernel:0'). A Flax
layer whose module name equals a Keras layer name ('block1_conv1', 'fc1',
'predictions') takes that layer's kernel and bias, every shape checked. No
pickle: h5py reads arrays only.
"""

from typing import Optional

import h5py
import jax
import numpy as np
from flax import traverse_util

from convjax.errors import UserError


def read(path: str) -> dict:
  """{layer name: {'kernel': array, 'bias': array, ...}} for layers that have weights."""
  try:
    with h5py.File(path, "r") as f:
      if "layer_names" not in f.attrs:
        raise UserError(f"{path!r} is not a Keras HDF5 weights file (no 'layer_names' attribute)")
      out = {}
      for layer in f.attrs["layer_names"]:
        layer = layer.decode() if isinstance(layer, bytes) else str(layer)
        group = f[layer]
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs.get("weight_names", [])]
        if names:
          out[layer] = {n.split("/")[-1].split(":")[0]: np.asarray(group[n]) for n in names}
      return out
  except UserError:
    raise
  except (OSError, KeyError, ValueError) as e:
    raise UserError(f"cannot read Keras weights {path!r}: {e}") from None


def load_into(params, path: str, under: str = "", strict: bool = True):
  """`params` with every layer under the subtree `under` (e.g. 'features') taken from `path`.

  Each Flax module whose params are {kernel, bias} and whose name is a layer in
  the file is replaced; one UserError lists layers the model has and the file
  lacks, mis-shaped weights, and (strict) file layers the subtree lacks.
  """
  weights = read(path)
  flat = traverse_util.flatten_dict(jax.device_get(params))
  prefix = tuple(under.split("/")) if under else ()
  modules = {}
  for key in flat:
    if key[: len(prefix)] == prefix:
      modules.setdefault(key[:-1], []).append(key[-1])
  missing, misshaped, used = [], [], set()
  for module, leaves in modules.items():
    layer = module[-1]
    if layer not in weights:
      missing.append("/".join(module))
      continue
    used.add(layer)
    for leaf in leaves:
      value = weights[layer].get(leaf)
      if value is None or value.shape != flat[module + (leaf,)].shape:
        misshaped.append(
          f"{layer}/{leaf}: model {tuple(flat[module + (leaf,)].shape)}, file "
          f"{None if value is None else tuple(value.shape)}"
        )
      else:
        flat[module + (leaf,)] = value.astype(
          flat[module + (leaf,)].dtype, copy=False
        )  # no copy of a matching array (fc1: 411 MB)
  extra = sorted(set(weights) - used) if strict else []
  if missing or misshaped or extra:
    parts = [
      f"missing in the file: {', '.join(missing)}" if missing else "",
      f"mis-shaped: {'; '.join(misshaped)}" if misshaped else "",
      f"in the file but not in the model: {', '.join(extra)}" if extra else "",
    ]
    raise UserError(f"weights {path!r} do not fit the model: {' | '.join(p for p in parts if p)}")
  return traverse_util.unflatten_dict(flat)


def write(path: str, layers: dict, layer_order: Optional[list] = None) -> None:
  """Writes {layer: {'kernel', 'bias'}} in Keras' legacy layout (for tests and exports)."""
  order = layer_order or list(layers)
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = np.array([n.encode() for n in order])
    for name in order:
      group = f.create_group(name)
      weights = layers.get(name, {})
      group.attrs["weight_names"] = np.array([f"{name}/{k}".encode() for k in weights])
      for k, v in weights.items():
        group.create_dataset(f"{name}/{k}", data=np.asarray(v))
