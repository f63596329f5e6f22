"""Optimizers from config, and freezing by a regex over parameter paths."""
import jax
import optax
from ml_collections import ConfigDict

from convjax.config import OPTIMIZERS, SCHEDULES
from convjax.errors import UserError
from convjax.models.summary import trainable_mask


def learning_rate_schedule(config: ConfigDict, steps_per_epoch: int):
  lr = config.learning_rate
  if config.schedule == "constant":
    return lr
  if config.schedule == "cosine":
    total = config.num_epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total)
  raise UserError(f"unknown schedule {config.schedule!r}; valid: {', '.join(SCHEDULES)}")


def make_optimizer(config: ConfigDict, steps_per_epoch: int, params) -> optax.GradientTransformation:
  """Keras-default hyperparameters (RMSprop rho 0.9, epsilon 1e-7 for RMSprop and Adam).

  With `config.trainable` (a regex over whole paths like 'head/dense/kernel'),
  the other params get zero updates and carry no optimizer state.
  """
  lr = learning_rate_schedule(config, steps_per_epoch)
  if config.optimizer == "rmsprop":
    tx = optax.rmsprop(lr, decay=0.9, eps=1e-7)
  elif config.optimizer == "adam":
    tx = optax.adam(lr, eps=1e-7)
  elif config.optimizer == "sgd":
    tx = optax.sgd(lr, momentum=config.momentum or None)
  else:
    raise UserError(f"unknown optimizer {config.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
  if config.trainable:
    mask = trainable_mask(params, config.trainable)
    if not any(jax.tree_util.tree_leaves(mask)):
      raise UserError(f"trainable={config.trainable!r} matches no parameter path")
    labels = jax.tree_util.tree_map(lambda m: "train" if m else "freeze", mask)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  return tx
