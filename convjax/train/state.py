"""The train state: a plain pytree of arrays (what orbax saves, what jit donates)."""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array         # optimizer steps taken
  params: Any
  model_state: Any        # non-param collections (e.g. batch_stats); {} when none
  opt_state: Any


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       input_shape, rng: jax.Array) -> TrainState:
  variables = model.init(rng, jnp.zeros((1, *input_shape), jnp.float32))
  variables = dict(variables)
  params = variables.pop("params")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    model_state=variables, opt_state=tx.init(params))
