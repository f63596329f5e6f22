"""Reading and shifting layers' outputs of a model, and class scores.

Everything in convjax.viz is a JAX transform of `model.apply`: a layer's output
comes from `capture_intermediates`, and the gradient of a class score with
respect to that output comes from running the model with a shift added to the output
(`nn.intercept_methods`) and differentiating with respect to the shift at zero.
Layers are named by module path, e.g. ('features', 'block5_conv3'). An NNX model (through
convjax.models.own.nnx_model_class()) is read the same way with own.LayerHook: Linen's hooks see only
the bridge.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from convjax.models import own
from convjax.models.summary import layer_table


def layer_paths(model, input_shape: Sequence[int], types=("Conv2D", "MaxPooling2D")) -> list:
  """Module paths of the model's layers of the given Keras types, in call order."""
  return [r.path for r in layer_table(model, input_shape) if r.type_name in types]


def last_conv(model, input_shape: Sequence[int]) -> tuple:
  paths = layer_paths(model, input_shape, types=("Conv2D",))
  if not paths:
    raise ValueError("the model has no Conv2D layer")
  return paths[-1]


def layer_outputs(model, variables, x, paths) -> dict:
  """{path: output} of the layers at `paths` for inputs x (N, H, W, C), from one forward pass.

  When every path lies in the model's `features`, only `features` runs: no head
  compute, and any input size the conv base takes (a Flatten head fixes the size).
  """
  wanted = {tuple(p) for p in paths}
  if own.is_nnx_model(model):  # an NNX model: its submodules' outputs, from own's hook
    with own.LayerHook() as hook:
      model.apply(variables, x)
    return {path: hook.outputs[path] for path in wanted}
  in_features = all(p[0] == "features" for p in wanted)
  _, state = model.apply(
    variables,
    x,
    capture_intermediates=lambda m, _: m.path in wanted,
    mutable=["intermediates"],
    method=(lambda m, x: m.features(x)) if in_features else "__call__",
  )
  out = {}
  for path in wanted:
    node = state["intermediates"]
    for name in path:
      node = node[name]
    out[path] = node["__call__"][-1]  # a layer wrapping nn.Conv records the inner call first
  return out


def layer_output(model, variables, x, path: tuple):
  """The output of the layer at `path` for inputs x (N, H, W, C)."""
  return layer_outputs(model, variables, x, [path])[tuple(path)]


def shifted_logits(model, variables, x, shifts: dict):
  """(the logits with each layer at a path of `shifts` outputting its output plus
  shifts[path], {path: that layer's own output}). A score's gradient with respect to a zero
  shift is its gradient with respect to the layer's output: every layer's, from one forward
  and one backward pass."""
  shifts = {tuple(p): s for p, s in shifts.items()}
  hook = own.LayerHook(shift=shifts)
  if own.is_nnx_model(model):
    with hook:
      logits = model.apply(variables, x)
  else:  # Linen: the same hook around the layers' calls (convjax's Conv2D calls nn.Conv's inside its own)

    def shift(next_fun, args, kwargs, context):
      path = context.module.path if context.method_name == "__call__" else None
      if path not in shifts:
        return next_fun(*args, **kwargs)
      return hook.around(path, lambda: next_fun(*args, **kwargs), type(context.module).__name__)

    with nn.intercept_methods(shift):
      logits = model.apply(variables, x)
  return logits, {path: hook.outputs[path] for path in shifts}


def class_score(logits, class_index):
  """Per-example score of `class_index` (N,): the logit; for one-logit (sigmoid) models,
  the logit for class 1 and its negative for class 0."""
  class_index = jnp.asarray(class_index)
  if logits.shape[-1] == 1:
    return jnp.where(class_index == 1, logits[..., 0], -logits[..., 0])
  return jnp.take_along_axis(logits, jnp.broadcast_to(class_index, logits.shape[:1])[:, None], -1)[:, 0]


def predicted_class(logits):
  return (logits[..., 0] > 0).astype(jnp.int32) if logits.shape[-1] == 1 else jnp.argmax(logits, -1)


def class_probability(logits, class_index):
  """Per-example probability of `class_index` (N,): softmax, or for one-logit models the
  sigmoid of class_score (sigmoid(-z) = 1 - sigmoid(z) for class 0)."""
  if logits.shape[-1] == 1:
    return jax.nn.sigmoid(class_score(logits, class_index))
  return jnp.exp(class_score(jax.nn.log_softmax(logits, -1), class_index))


def normalise(m, axis=None):
  """m / max(m) over `axis` (default: all); a map with no positive value becomes 0, never NaN."""
  peak = jnp.max(m, axis=axis, keepdims=axis is not None)
  return jnp.where(peak > 0, m / jnp.where(peak > 0, peak, 1.0), 0.0)


def resolve_class(model, variables, x, class_index: Optional[int]):
  return (
    predicted_class(model.apply(variables, x)) if class_index is None else jnp.full(x.shape[:1], class_index, jnp.int32)
  )
