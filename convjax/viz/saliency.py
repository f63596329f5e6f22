"""Input-gradient attributions: vanilla gradient, SmoothGrad, Integrated Gradients,
guided backprop. Each returns attributions shaped like the input (N, H, W, C);
`saliency_map` turns them into (N, H, W) maps in [0, 1]."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from convjax.models.layers import Conv2D, Dense
from convjax.viz import layers


def _score_fn(model, variables, classes):
  return lambda x: jnp.sum(layers.class_score(model.apply(variables, x), classes))


def vanilla_gradient(model, variables, x, class_index: Optional[int] = None):
  classes = layers.resolve_class(model, variables, x, class_index)
  return jax.grad(_score_fn(model, variables, classes))(x)


def smoothgrad(model, variables, x, rng, class_index: Optional[int] = None, samples: int = 25, noise: float = 0.15):
  """Mean gradient over `samples` copies with Gaussian noise of std noise * (max - min)."""
  classes = layers.resolve_class(model, variables, x, class_index)
  grad = jax.grad(_score_fn(model, variables, classes))
  sigma = noise * (jnp.max(x, axis=(1, 2, 3), keepdims=True) - jnp.min(x, axis=(1, 2, 3), keepdims=True))
  eps = jax.random.normal(rng, (samples, *x.shape), x.dtype)
  return jnp.mean(jax.lax.map(lambda e: grad(x + sigma * e), eps), axis=0)


def integrated_gradients(model, variables, x, class_index: Optional[int] = None, baseline=None, steps: int = 64):
  """(x - baseline) times the path-average gradient (trapezoid rule, `steps` intervals).

  Completeness: the attributions sum to score(x) - score(baseline), up to the
  quadrature error.
  """
  classes = layers.resolve_class(model, variables, x, class_index)
  baseline = jnp.zeros_like(x) if baseline is None else jnp.broadcast_to(baseline, x.shape)
  grad = jax.grad(_score_fn(model, variables, classes))
  alphas = jnp.linspace(0.0, 1.0, steps + 1)
  weights = jnp.full(steps + 1, 1.0 / steps).at[jnp.array([0, steps])].set(0.5 / steps)
  grads = jax.lax.map(lambda a: grad(baseline + a * (x - baseline)), alphas)
  return (x - baseline) * jnp.tensordot(weights, grads, axes=1)


@jax.custom_vjp
def _guided_relu(x):
  return jax.nn.relu(x)


def _guided_fwd(x):
  return jax.nn.relu(x), x


def _guided_bwd(x, g):
  return (jnp.where((x > 0) & (g > 0), g, 0.0),)  # only positive signal through active units


_guided_relu.defvjp(_guided_fwd, _guided_bwd)


def guided_backprop(model, variables, x, class_index: Optional[int] = None):
  """Springenberg et al. 2015: ReLUs pass back only positive gradients of active units.

  Applies to the ReLUs fused into Keras-shaped Conv2D / Dense layers (the small
  convnets and VGG); other activations keep their usual gradient.
  """
  classes = layers.resolve_class(model, variables, x, class_index)
  inside = set()

  def guide(next_fun, args, kwargs, context):
    module = context.module
    if (
      context.method_name == "__call__"
      and isinstance(module, (Conv2D, Dense))
      and module.activation is nn.relu
      and module.path not in inside
    ):
      inside.add(module.path)
      try:
        base = nn.Conv if isinstance(module, Conv2D) else nn.Dense
        return _guided_relu(base.__call__(module, *args, **kwargs))
      finally:
        inside.discard(module.path)
    return next_fun(*args, **kwargs)

  def score(inputs):
    with nn.intercept_methods(guide):
      return jnp.sum(layers.class_score(model.apply(variables, inputs), classes))

  return jax.grad(score)(x)


def saliency_map(attributions):
  """(N, H, W, C) -> (N, H, W): max |attribution| over channels, normalised per image."""
  return layers.normalise(jnp.max(jnp.abs(attributions), axis=-1), axis=(1, 2))
