"""Optimizers from config (optax), learning-rate schedules, and freezing by a regex over param paths.

  make_optimizer(config, steps_per_epoch, params) -> (tx, schedule)

tx, outermost first: optax.MultiSteps (grad_accum_steps > 1: average k micro-batch
gradients per update), the freeze mask (config.trainable), optax.apply_if_finite (a
non-finite gradient of the trained params is never applied: they stay finite, and
the loop stops the run), then clipping, weight decay and the optimizer with its
schedule.
schedule(optimizer step) is the learning rate, for logs.
"""

import jax
import optax
from ml_collections import ConfigDict

from convjax.errors import UserError
from convjax.models.summary import trainable_mask

# A run stops at the first non-finite loss or gradient (train/loop.py): apply_if_finite
# only has to keep that step's update out of the params, never to give up skipping.
_NEVER = 2**31 - 1


def learning_rate_schedule(config: ConfigDict, steps_per_epoch: int):
  """optax schedule of optimizer steps: constant, cosine (to 0 at the run's last update) or step
  (times schedule_factor at each of schedule_boundaries), each after warmup_steps of linear warmup."""
  lr, warmup = config.learning_rate, int(config.warmup_steps)
  updates = config.num_epochs * steps_per_epoch // config.grad_accum_steps
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(updates, warmup + 1))
  if config.schedule == "step":
    after = optax.piecewise_constant_schedule(
      lr, {int(b) - warmup: config.schedule_factor for b in config.schedule_boundaries}
    )
  else:
    after = optax.constant_schedule(lr)
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def optimizer(config: ConfigDict, schedule, params) -> optax.GradientTransformation:
  """The optimizer with Keras' defaults (RMSprop rho 0.9, epsilon 1e-7 for RMSprop and Adam(W)),
  weight decay on the params matching config.weight_decay_mask, gradient clipping."""
  decay_mask = trainable_mask(params, config.weight_decay_mask)
  if config.optimizer == "adamw":
    core = optax.adamw(schedule, eps=1e-7, weight_decay=config.weight_decay, mask=decay_mask)
  else:
    core = {
      "rmsprop": lambda: optax.rmsprop(schedule, decay=0.9, eps=1e-7),
      "adam": lambda: optax.adam(schedule, eps=1e-7),
      "sgd": lambda: optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov),
    }[config.optimizer]()
    if config.weight_decay:  # L2 on the gradient (coupled), as torch's weight_decay
      core = optax.chain(optax.add_decayed_weights(config.weight_decay, decay_mask), core)
  if config.grad_clip_norm:
    core = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), core)
  return core


def make_optimizer(config: ConfigDict, steps_per_epoch: int, params) -> tuple:
  """(tx, schedule) for config. With `config.trainable` (a regex over whole paths like
  'head/dense/kernel'), the other params get zero updates and carry no optimizer state.
  params: the params' pytree (shapes suffice)."""
  schedule = learning_rate_schedule(config, steps_per_epoch)
  tx = optax.apply_if_finite(optimizer(config, schedule, params), max_consecutive_errors=_NEVER)
  if config.trainable:  # frozen params' gradients are never looked at: XLA drops them
    mask = trainable_mask(params, config.trainable)
    if not any(jax.tree_util.tree_leaves(mask)):
      raise UserError(f"trainable={config.trainable!r} matches no parameter path")
    labels = jax.tree_util.tree_map(lambda m: "train" if m else "freeze", mask)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  if config.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
  return tx, schedule
