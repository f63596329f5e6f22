"""The train state: a plain pytree of arrays (what orbax saves, what jit donates), and the
weights a fresh run starts from (config.pretrained, config.init_from)."""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from convjax import run
from convjax.errors import UserError
from convjax.models import get_model
from convjax.pretrained import keras_h5, transfer


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # train steps taken (micro-steps with gradient accumulation)
  params: Any
  model_state: Any  # non-param collections (e.g. batch_stats); {} when none
  opt_state: Any
  ema_params: Any = None  # config.ema_decay: the exponential moving average of params


def create_train_state(
  model: nn.Module, tx: optax.GradientTransformation, input_shape, rng: jax.Array, ema: bool = False
) -> TrainState:
  variables = model.init(rng, jnp.zeros((1, *input_shape), jnp.float32))
  variables = dict(variables)
  params = variables.pop("params")
  return create_from(jnp.zeros((), jnp.int32), params, variables, tx, ema)


def create_from(step, params, model_state, tx, ema: bool = False) -> TrainState:
  """A train state starting from given params: a fresh optimizer state (and EMA) for them."""
  return TrainState(
    step=step, params=params, model_state=model_state, opt_state=tx.init(params), ema_params=params if ema else None
  )


def eval_params(state: TrainState):
  """The params evaluation uses: the EMA where the run keeps one."""
  return state.params if state.ema_params is None else state.ema_params


def _same_structure(a, b, what: str):
  sa = jax.tree_util.tree_map(lambda x: tuple(x.shape), a)
  sb = jax.tree_util.tree_map(lambda x: tuple(x.shape), b)
  if sa != sb:
    raise UserError(f"{what} does not fit the model (different parameter names or shapes)")


def starting_params(config, params, model_state):
  """(params, model_state) to start a fresh run from, after config.init_from (another run's
  latest checkpoint) or config.pretrained (a Keras .h5); else the given ones."""
  if config.init_from:
    try:
      start = dict(run.read_run(config.init_from, "latest").variables)
    except UserError as e:
      raise UserError(f"config.init_from={config.init_from!r}: {e}") from None
    start_params = start.pop("params")
    _same_structure(start_params, jax.device_get(params), f"config.init_from={config.init_from!r}")
    return start_params, start or model_state
  if config.pretrained.weights:
    path = transfer.weights_file(
      config.pretrained.weights, config.model, get_model(config.model, **config.model_kwargs)
    )
    return keras_h5.load_into(params, path, under=config.pretrained.under), model_state
  return params, model_state
