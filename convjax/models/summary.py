"""A Keras-style model summary: one row per layer, in call order.

    Layer (type)                   Output Shape               Param #
    conv2d (Conv2D)                (None, 26, 26, 32)         320

Shapes come from `jax.eval_shape` (nothing is computed), layers from Linen's
`capture_intermediates`, parameter counts from the variables under each layer.
"""

import re
from typing import NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from convjax.models.layers import Layer

LAYER_TYPES = (nn.Conv, nn.ConvTranspose, nn.Dense, nn.BatchNorm, nn.LayerNorm, nn.Dropout, Layer)
TYPE_NAMES = {"Conv": "Conv2D", "BatchNorm": "BatchNormalization", "Linear": "Dense"}
NNX_LAYER_TYPES = ("Conv", "ConvTranspose", "Linear", "BatchNorm", "LayerNorm", "Dropout")
WIDTHS = (31, 27, 12)


class Row(NamedTuple):
  path: tuple
  type_name: str
  output_shape: tuple  # batch dimension is None
  trainable: int
  non_trainable: int


def trainable_mask(params, trainable: Optional[str]):
  """Pytree of bools: True where the '/'-joined parameter path matches `trainable`."""
  pattern = re.compile(trainable) if trainable else None
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict({k: pattern is None or pattern.fullmatch(k) is not None for k in flat}, sep="/")


def layer_table(model: nn.Module, input_shape: Sequence[int], trainable: Optional[str] = None):
  """Rows for `model` on inputs of shape (None, *input_shape).

  `trainable` is a regex matched against whole parameter paths such as
  'features/conv2d/kernel' (None: every param trains). Other collections
  (BatchNorm statistics) count as non-trainable, as Keras counts them.
  """
  from convjax.models import own

  types = {}

  def capture(module, method_name):
    if method_name == "__call__" and isinstance(module, LAYER_TYPES):
      name = type(module).__name__
      types.setdefault(module.path, TYPE_NAMES.get(name, name))  # dict order = call order
      return True
    return False

  def init_and_capture(x):
    variables = model.init(jax.random.key(0), x)
    if own.is_nnx_model(model):  # flax.nnx layers, by their class, from own's hook
      with own.LayerHook() as hook:
        model.apply(variables, x)
      for path, name in hook.types.items():
        if name in NNX_LAYER_TYPES:
          types.setdefault(path, TYPE_NAMES.get(name, name))
      return variables, traverse_util.unflatten_dict({(*p, "__call__"): (o,) for p, o in hook.outputs.items()})
    _, state = model.apply(variables, x, capture_intermediates=capture, mutable=["intermediates"])
    return variables, state["intermediates"]

  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  variables, intermediates = jax.eval_shape(init_and_capture, x)
  variables = dict(variables)
  params = traverse_util.flatten_dict(variables.pop("params", {}))
  mask = traverse_util.flatten_dict(trainable_mask(traverse_util.unflatten_dict(params), trainable))
  others = {k: v for c in variables.values() for k, v in traverse_util.flatten_dict(c).items()}

  outputs_at = {k[:-1]: v for k, v in traverse_util.flatten_dict(intermediates).items()}
  size = lambda v: int(np.prod(v.shape))
  rows = []
  for path, type_name in types.items():
    under = lambda k, path=path: k[: len(path)] == path
    n_train = sum(size(v) for k, v in params.items() if under(k) and mask[k])
    n_frozen = sum(size(v) for k, v in params.items() if under(k) and not mask[k])
    n_other = sum(size(v) for k, v in others.items() if under(k))
    rows.append(Row(path, type_name, (None, *outputs_at[path][0].shape[1:]), n_train, n_frozen + n_other))
  return rows


def layer_labels(rows: list) -> list:
  """Each row's layer name: its own (Keras' conv2d_1) where those are unique, else its path."""
  leaf_names = [r.path[-1] for r in rows]
  unique = len(set(leaf_names)) == len(leaf_names)
  return [r.path[-1] if unique else "/".join(r.path) for r in rows]


def summary(model: nn.Module, input_shape: Sequence[int], name: str = "model", trainable: Optional[str] = None) -> str:
  """The Keras `model.summary()` text for `model` on inputs (None, *input_shape)."""
  rows = layer_table(model, input_shape, trainable)
  w1, w2, w3 = WIDTHS
  line = lambda a, b, c: f" {a:<{w1}}{b:<{w2}}{c:<{w3}}".rstrip()
  total = w1 + w2 + w3 + 1
  out = [f'Model: "{name}"', "_" * total, line("Layer (type)", "Output Shape", "Param #"), "=" * total]
  for i, (r, label) in enumerate(zip(rows, layer_labels(rows), strict=True)):
    out.append(
      line(
        f"{label} ({r.type_name})", str(r.output_shape).replace("None,)", "None)"), f"{r.trainable + r.non_trainable:,}"
      )
    )
    out.append("_" * total if i + 1 < len(rows) else "=" * total)
  n_train = sum(r.trainable for r in rows)
  n_frozen = sum(r.non_trainable for r in rows)
  out += [
    f"Total params: {n_train + n_frozen:,}",
    f"Trainable params: {n_train:,}",
    f"Non-trainable params: {n_frozen:,}",
    "_" * total,
  ]
  return "\n".join(out) + "\n"
